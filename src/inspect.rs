//! `inspect-queue`: one report of the store, the same whether it comes from a stopped store
//! or from the running daemon over its admin socket.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::store::{CatalogSize, Envelope, Queue, Store, StoreError};

/// Longest payload summary shown per item.
const SUMMARY_CHARS: usize = 100;

/// What the report lists items of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Section {
    Indicators,
    Sightings,
    Imports,
    Dead,
}

impl Section {
    pub const ALL: [Section; 4] = [
        Section::Indicators,
        Section::Sightings,
        Section::Imports,
        Section::Dead,
    ];

    pub fn parse(name: &str) -> Option<Section> {
        match name {
            "indicators" => Some(Section::Indicators),
            "sightings" => Some(Section::Sightings),
            "imports" => Some(Section::Imports),
            "dead" => Some(Section::Dead),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Section::Indicators => "indicators",
            Section::Sightings => "sightings",
            Section::Imports => "imports",
            Section::Dead => "dead",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Query {
    /// Only list items of this section; `None` lists the head of each.
    pub section: Option<Section>,
    /// Items listed per section.
    pub limit: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// `daemon` when the running daemon answered, `store` when the store was opened.
    pub source: String,
    pub store_path: String,
    pub format_version: u32,
    pub stream_position: Option<String>,
    /// The stream reader's state when the daemon answered (why it is paused, if it is).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_state: Option<String>,
    /// What the bridge has told Threat Bus: active indicators and every id ever sent.
    pub catalog: CatalogSize,
    pub queues: Vec<QueueStats>,
    pub items: Vec<ItemView>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueueStats {
    pub queue: Section,
    pub count: u64,
    /// Items that failed at least once and wait for another attempt (not for `dead`).
    pub retrying: Option<u64>,
    pub oldest_age_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ItemView {
    pub queue: Section,
    pub key: u64,
    pub age_ms: u64,
    pub attempts: u32,
    /// Until the next attempt; `None` when due now.
    pub next_attempt_in_ms: Option<u64>,
    pub last_error: Option<String>,
    /// Why it is a dead letter, and which queue it came from.
    pub dead_reason: Option<String>,
    pub origin: Option<String>,
    pub summary: String,
}

/// Builds the report from an open store.
pub fn report(
    store: &Store,
    query: &Query,
    source: &str,
    now_ms: u64,
) -> Result<Report, StoreError> {
    let mut queues = Vec::new();
    for queue in Queue::ALL {
        queues.push(QueueStats {
            queue: section_of(queue),
            count: store.len(queue),
            retrying: Some(store.retrying(queue)),
            oldest_age_ms: store
                .oldest_received_ms(queue)?
                .map(|t| now_ms.saturating_sub(t)),
        });
    }
    queues.push(QueueStats {
        queue: Section::Dead,
        count: store.dead_len(),
        retrying: None,
        oldest_age_ms: store.oldest_dead_ms()?.map(|t| now_ms.saturating_sub(t)),
    });
    let mut items = Vec::new();
    for section in Section::ALL {
        if query.section.is_none_or(|s| s == section) {
            items.extend(list(store, section, query.limit, now_ms)?);
        }
    }
    Ok(Report {
        source: source.to_string(),
        store_path: store.path().display().to_string(),
        format_version: crate::store::CURRENT_FORMAT,
        stream_position: store.position()?,
        stream_state: None,
        catalog: store.catalog_size(),
        queues,
        items,
    })
}

fn list(
    store: &Store,
    section: Section,
    limit: usize,
    now_ms: u64,
) -> Result<Vec<ItemView>, StoreError> {
    let queue = match section {
        Section::Indicators => Queue::Indicators,
        Section::Sightings => Queue::Sightings,
        Section::Imports => Queue::Imports,
        Section::Dead => {
            return Ok(store
                .dead_letters(None, limit)?
                .into_iter()
                .map(|d| {
                    let mut view = item_view(section, d.key, &d.letter.envelope, now_ms);
                    view.age_ms = now_ms.saturating_sub(d.letter.dead_at_ms);
                    view.dead_reason = Some(d.letter.reason);
                    view.origin = Some(match d.letter.original_key {
                        Some(k) => format!("{} #{k}", d.letter.queue),
                        None => format!("{} (on arrival)", d.letter.queue),
                    });
                    view
                })
                .collect())
        }
    };
    Ok(store
        .scan(queue, None, limit)?
        .into_iter()
        .map(|i| item_view(section, i.key, &i.envelope, now_ms))
        .collect())
}

fn section_of(queue: Queue) -> Section {
    match queue {
        Queue::Indicators => Section::Indicators,
        Queue::Sightings => Section::Sightings,
        Queue::Imports => Section::Imports,
    }
}

fn item_view(queue: Section, key: u64, envelope: &Envelope, now_ms: u64) -> ItemView {
    ItemView {
        queue,
        key,
        age_ms: now_ms.saturating_sub(envelope.received_at_ms),
        attempts: envelope.attempts,
        next_attempt_in_ms: (envelope.next_attempt_ms > now_ms)
            .then(|| envelope.next_attempt_ms - now_ms),
        last_error: envelope.last_error.clone(),
        dead_reason: None,
        origin: None,
        summary: summarize(&envelope.payload),
    }
}

/// A one-line description of a payload: its STIX type, id and the most telling field.
pub fn summarize(payload: &[u8]) -> String {
    let text = match serde_json::from_slice::<serde_json::Value>(payload) {
        Ok(value) => {
            let field = |name: &str| value.get(name).and_then(|v| v.as_str());
            let parts: Vec<&str> = [
                field("x_threatbus_update"),
                field("id"),
                field("pattern")
                    .or(field("sighting_of_ref"))
                    .or(field("name")),
            ]
            .into_iter()
            .flatten()
            .collect();
            if parts.is_empty() {
                format!("JSON {}", first_chars(&value.to_string(), SUMMARY_CHARS))
            } else {
                parts.join(" ")
            }
        }
        Err(_) => format!("not JSON: {}", String::from_utf8_lossy(payload)),
    };
    first_chars(&text, SUMMARY_CHARS)
}

fn first_chars(text: &str, n: usize) -> String {
    let mut chars = text.chars();
    let head: String = chars.by_ref().take(n).collect();
    if chars.next().is_some() {
        format!("{head}…")
    } else {
        head
    }
}

/// The human-readable form of a report.
pub fn render_table(report: &Report) -> String {
    let mut out = String::new();
    let source = if report.source == "daemon" {
        "asked the running daemon"
    } else {
        "read from the stopped store"
    };
    let _ = writeln!(
        out,
        "Store: {} (format {}, {source})",
        report.store_path, report.format_version
    );
    let _ = writeln!(
        out,
        "Stream position: {}",
        report
            .stream_position
            .as_deref()
            .unwrap_or("none (first start)")
    );
    if let Some(state) = &report.stream_state {
        let _ = writeln!(out, "Stream reader: {state}");
    }
    let _ = writeln!(
        out,
        "Indicator catalog: {} active ({} ids forwarded, removed ones included)",
        report.catalog.active, report.catalog.total
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<11} {:>9} {:>9}  OLDEST",
        "QUEUE", "ITEMS", "RETRYING"
    );
    for q in &report.queues {
        let retrying = q.retrying.map_or("-".to_string(), |r| r.to_string());
        let oldest = q.oldest_age_ms.map_or("-".to_string(), human_duration);
        let _ = writeln!(
            out,
            "{:<11} {:>9} {:>9}  {oldest}",
            q.queue.name(),
            q.count,
            retrying
        );
    }
    for section in Section::ALL {
        let items: Vec<&ItemView> = report.items.iter().filter(|i| i.queue == section).collect();
        if items.is_empty() {
            continue;
        }
        let _ = writeln!(out, "\n{} (first {}):", section.name(), items.len());
        let _ = writeln!(
            out,
            "{:>8}  {:>8}  {:>8}  {:>8}  DETAIL",
            "KEY", "AGE", "ATTEMPTS", "NEXT TRY"
        );
        for item in items {
            let next = item
                .next_attempt_in_ms
                .map_or("now".to_string(), human_duration);
            let _ = writeln!(
                out,
                "{:>8}  {:>8}  {:>8}  {:>8}  {}",
                item.key,
                human_duration(item.age_ms),
                item.attempts,
                next,
                item.summary
            );
            if let Some(origin) = &item.origin {
                let _ = writeln!(out, "{:>40}from {origin}", "");
            }
            if let Some(reason) = &item.dead_reason {
                let _ = writeln!(out, "{:>40}reason: {reason}", "");
            }
            if let Some(error) = &item.last_error {
                let _ = writeln!(out, "{:>40}last error: {error}", "");
            }
        }
    }
    out
}

/// `42s`, `3m05s`, `2h07m`, `3d04h`: short, and exact enough for an operator.
pub fn human_duration(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86_400, (s % 86_400) / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_naturally() {
        assert_eq!(human_duration(999), "0s");
        assert_eq!(human_duration(59_000), "59s");
        assert_eq!(human_duration(185_000), "3m05s");
        assert_eq!(human_duration(7_620_000), "2h07m");
        assert_eq!(human_duration(273_600_000), "3d04h");
    }

    #[test]
    fn summaries_pick_the_telling_fields() {
        let ind = br#"{"type":"indicator","id":"indicator--1","pattern":"[ipv4-addr:value = '1.2.3.4']","x_threatbus_update":"REMOVE"}"#;
        assert_eq!(
            summarize(ind),
            "REMOVE indicator--1 [ipv4-addr:value = '1.2.3.4']"
        );
        let s = br#"{"type":"sighting","id":"sighting--2","sighting_of_ref":"indicator--1"}"#;
        assert_eq!(summarize(s), "sighting--2 indicator--1");
        assert_eq!(summarize(b"\xff\xfe"), "not JSON: \u{fffd}\u{fffd}");
        let long = format!("{{\"id\":\"{}\"}}", "x".repeat(300));
        assert_eq!(
            summarize(long.as_bytes()).chars().count(),
            SUMMARY_CHARS + 1
        );
    }
}
