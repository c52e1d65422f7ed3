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
        Some(Response::Health(health)) => Ok(serde_json::to_string(&health)? + "\n"),
        Some(other) => Err(unexpected(other)),
        None => bail!("no daemon answers on {}", socket.display()),
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
