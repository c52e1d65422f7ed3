//! The maintenance commands: each asks the running daemon over its admin socket, or opens
//! the stopped store itself, and gets the very same answer either way.

use std::path::Path;

use anyhow::{anyhow, bail, Context};

use crate::admin::{self, Request, Response, Status};
use crate::inspect::{self, Query};
use crate::store::{Queue, Store, StoreOptions, STORE_SUBDIR};

pub fn inspect(data_dir: &Path, query: &Query, json: bool) -> anyhow::Result<String> {
    match request(data_dir, Request::Inspect(query.clone()))? {
        Response::Report(report) if json => Ok(serde_json::to_string_pretty(&report)? + "\n"),
        Response::Report(report) => Ok(inspect::render_table(&report)),
        other => Err(unexpected(other)),
    }
}

pub fn requeue_dead(
    data_dir: &Path,
    queue: Option<Queue>,
    keys: Vec<u64>,
) -> anyhow::Result<String> {
    match request(data_dir, Request::RequeueDead { queue, keys })? {
        Response::Count { count } => Ok(format!("requeued {count} dead letter(s)\n")),
        other => Err(unexpected(other)),
    }
}

pub fn purge_dead(data_dir: &Path, queue: Option<Queue>, keys: Vec<u64>) -> anyhow::Result<String> {
    match request(data_dir, Request::PurgeDead { queue, keys })? {
        Response::Count { count } => Ok(format!("purged {count} dead letter(s)\n")),
        other => Err(unexpected(other)),
    }
}

/// Only the daemon can be healthy: a stopped store is not.
pub fn health(data_dir: &Path) -> anyhow::Result<String> {
    let socket = admin::socket_path(data_dir);
    match admin::ask(data_dir, &Request::Health)? {
        Some(Response::Health(health)) if !health.unhealthy.is_empty() => bail!(
            "the daemon answers but is unhealthy: {}",
            serde_json::to_string(&health)?
        ),
        Some(Response::Health(health)) => Ok(serde_json::to_string(&health)? + "\n"),
        Some(other) => Err(unexpected(other)),
        None => bail!("no daemon answers on {}", socket.display()),
    }
}

/// Only the daemon can reconcile: it holds the OpenCTI client and queues the REMOVEs.
pub fn reconcile(data_dir: &Path, json: bool) -> anyhow::Result<String> {
    let socket = admin::socket_path(data_dir);
    let report = match admin::ask(data_dir, &Request::Reconcile)? {
        Some(Response::Reconcile(report)) => report,
        Some(other) => return Err(unexpected(other)),
        None => bail!(
            "no daemon answers on {}: reconcile asks the running bridge",
            socket.display()
        ),
    };
    if json {
        return Ok(serde_json::to_string_pretty(&report)? + "\n");
    }
    let mut out = format!(
        "checked {} active indicator(s) against OpenCTI in {:.1} s: {} REMOVE(s) queued",
        report.checked,
        report.duration_ms as f64 / 1000.0,
        report.removed
    );
    if !report.by_reason.is_empty() {
        let reasons: Vec<String> = report
            .by_reason
            .iter()
            .map(|(reason, n)| format!("{reason} {n}"))
            .collect();
        out.push_str(&format!(" ({})", reasons.join(", ")));
    }
    out.push('\n');
    for id in &report.removed_ids {
        out.push_str(&format!("  removed {id}\n"));
    }
    if report.removed_ids.len() < report.removed as usize {
        out.push_str(&format!(
            "  … and {} more\n",
            report.removed as usize - report.removed_ids.len()
        ));
    }
    if report.changed_meanwhile > 0 {
        out.push_str(&format!(
            "{} found gone but changed on the stream since: left as the stream says\n",
            report.changed_meanwhile
        ));
    }
    if report.unusable > 0 {
        out.push_str(&format!(
            "{} catalog entr(ies) could not be turned into a REMOVE (see the daemon's log)\n",
            report.unusable
        ));
    }
    match report.error {
        Some(error) => bail!("{out}the pass stopped early: {error}"),
        None => Ok(out),
    }
}

fn request(data_dir: &Path, request: Request) -> anyhow::Result<Response> {
    if let Some(response) = admin::ask(data_dir, &request)? {
        return Ok(response);
    }
    if !data_dir.join(STORE_SUBDIR).exists() {
        bail!(
            "there is no store in {} (the bridge has not run with this data directory yet)",
            data_dir.display()
        );
    }
    let store = Store::open(data_dir, &StoreOptions::default())
        .with_context(|| format!("opening the store in {}", data_dir.display()))?;
    let response = admin::handle(&store, &Status::default(), request, "store");
    store.close()?;
    Ok(response)
}

fn unexpected(response: Response) -> anyhow::Error {
    match response {
        Response::Error { message } => anyhow!(message),
        other => anyhow!("unexpected answer: {other:?}"),
    }
}
