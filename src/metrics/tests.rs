//! The exposition through `prometheus-client`: the names, labels, help texts and bucket
//! bounds the hand-written exposition exported, in both text formats; and the choice of
//! format from a scraper's `Accept` header.

use std::collections::BTreeSet;

use super::*;
use crate::store::StoreOptions;

fn store_with_position() -> (Store, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
    drop(store.set_position("1700000000000-0").unwrap());
    (store, dir)
}

/// `name{labels}` of every sample line, without its value, and without `le` (bucket bounds
/// are checked on their own).
fn series(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.rsplit_once(' ').map(|(series, _)| series))
        .filter(|s| !s.contains("le=\""))
        .map(str::to_string)
        .collect()
}

/// Every series the hand-written exposition exported (with a stored position), verbatim.
fn series_before_prometheus_client() -> BTreeSet<String> {
    let mut expected = BTreeSet::new();
    for name in ["received", "delivered", "retried", "dead", "dropped"] {
        for queue in ["indicators", "sightings"] {
            expected.insert(format!(
                "opencti_threatbus_{name}_total{{queue=\"{queue}\"}}"
            ));
        }
    }
    for queue in ["indicators", "sightings", "dead"] {
        expected.insert(format!(
            "opencti_threatbus_queue_depth{{queue=\"{queue}\"}}"
        ));
    }
    for queue in ["indicators", "sightings"] {
        expected.insert(format!(
            "opencti_threatbus_queue_oldest_age_seconds{{queue=\"{queue}\"}}"
        ));
        for suffix in ["sum", "count"] {
            expected.insert(format!(
                "opencti_threatbus_delivery_latency_seconds_{suffix}{{queue=\"{queue}\"}}"
            ));
        }
    }
    for name in [
        "stream_lag_seconds",
        "stream_events_total",
        "stream_reconnects_total",
        "stream_gaps_total",
        "threatbus_resubscriptions_total",
    ] {
        expected.insert(format!("opencti_threatbus_{name}"));
    }
    expected
}

/// What the import queue (store format 3) added: the same per-queue series as the others.
fn series_of_the_import_queue() -> BTreeSet<String> {
    let mut added = BTreeSet::new();
    for name in ["received", "delivered", "retried", "dead", "dropped"] {
        added.insert(format!(
            "opencti_threatbus_{name}_total{{queue=\"imports\"}}"
        ));
    }
    added.insert("opencti_threatbus_queue_depth{queue=\"imports\"}".to_owned());
    added.insert("opencti_threatbus_queue_oldest_age_seconds{queue=\"imports\"}".to_owned());
    for suffix in ["sum", "count"] {
        added.insert(format!(
            "opencti_threatbus_delivery_latency_seconds_{suffix}{{queue=\"imports\"}}"
        ));
    }
    for name in ["imports_unchanged_total", "imports_skipped_total"] {
        added.insert(format!("opencti_threatbus_{name}"));
    }
    added
}

/// What the indicator catalog, snapshot answers (store format 2) and reconciliation added.
fn series_of_the_catalog() -> BTreeSet<String> {
    let mut added = BTreeSet::new();
    for state in ["active", "removed"] {
        added.insert(format!(
            "opencti_threatbus_catalog_indicators{{state=\"{state}\"}}"
        ));
    }
    for name in [
        "snapshot_requests_total",
        "snapshots_answered_total",
        "snapshot_indicators_total",
        // Gap reconciliation.
        "reconcile_runs_total",
        "reconcile_checked_total",
        "reconcile_removed_total",
        "reconcile_overtaken_total",
        // Damaged stores rebuilt at start, and what they took with them.
        "store_rebuilds_total",
        "store_damage_lost_total",
    ] {
        added.insert(format!("opencti_threatbus_{name}"));
    }
    added
}

/// What the hardening (poison on the stream never loops silently) added.
fn series_of_the_hardening() -> BTreeSet<String> {
    BTreeSet::from(["opencti_threatbus_stream_repeated_failures".to_string()])
}

/// What the full-disk watermark (issue 8 item 3) added.
fn series_of_the_full_disk() -> BTreeSet<String> {
    BTreeSet::from([
        "opencti_threatbus_disk_free_bytes".to_string(),
        "opencti_threatbus_stream_paused_disk".to_string(),
    ])
}

#[test]
fn both_formats_export_the_series_of_the_hand_written_exposition() {
    let (store, _dir) = store_with_position();
    let metrics = Metrics::default();
    let mut expected = series_before_prometheus_client();
    expected.extend(series_of_the_catalog());
    expected.extend(series_of_the_import_queue());
    expected.extend(series_of_the_hardening());
    expected.extend(series_of_the_full_disk());
    assert_eq!(series(&metrics.render(&store)), expected);
    assert_eq!(series(&metrics.render_openmetrics(&store)), expected);
}

#[test]
fn the_stream_lag_exists_only_once_there_is_a_position() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
    let text = Metrics::default().render(&store);
    assert!(!text.contains("stream_lag"), "{text}");
    drop(store.set_position("1700000000000-0").unwrap());
    let text = Metrics::default().render(&store);
    assert!(
        text.contains("\nopencti_threatbus_stream_lag_seconds "),
        "{text}"
    );
}

#[test]
fn the_text_format_keeps_the_type_and_help_lines() {
    let (store, _dir) = store_with_position();
    let metrics = Metrics::default();
    metrics.indicators.delivered.add(7);
    metrics.stream_gaps.inc();
    let text = metrics.render(&store);
    for line in [
        "# HELP opencti_threatbus_delivered_total Items confirmed delivered and removed from the outbox.",
        "# TYPE opencti_threatbus_delivered_total counter",
        "opencti_threatbus_delivered_total{queue=\"indicators\"} 7",
        "opencti_threatbus_delivered_total{queue=\"sightings\"} 0",
        "# TYPE opencti_threatbus_queue_depth gauge",
        "opencti_threatbus_queue_depth{queue=\"dead\"} 0",
        "# TYPE opencti_threatbus_queue_oldest_age_seconds gauge",
        "# TYPE opencti_threatbus_delivery_latency_seconds histogram",
        "# TYPE opencti_threatbus_stream_gaps_total counter",
        "opencti_threatbus_stream_gaps_total 1",
        "# TYPE opencti_threatbus_stream_lag_seconds gauge",
    ] {
        assert!(text.lines().any(|l| l == line), "{line:?} missing in\n{text}");
    }
    assert!(!text.contains("# EOF"), "{text}");
}

#[test]
fn openmetrics_names_counter_families_without_total_and_ends_in_eof() {
    let (store, _dir) = store_with_position();
    let metrics = Metrics::default();
    metrics.sightings.received.add(3);
    let text = metrics.render_openmetrics(&store);
    for line in [
        "# TYPE opencti_threatbus_received counter",
        "opencti_threatbus_received_total{queue=\"sightings\"} 3",
        "# TYPE opencti_threatbus_delivery_latency_seconds histogram",
        "# UNIT opencti_threatbus_delivery_latency_seconds seconds",
        "# UNIT opencti_threatbus_queue_oldest_age_seconds seconds",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "{line:?} missing in\n{text}"
        );
    }
    assert!(text.ends_with("# EOF\n"), "{text}");
}

#[test]
fn latency_buckets_are_cumulative() {
    let (store, _dir) = store_with_position();
    let metrics = Metrics::default();
    let h = &metrics.sightings.latency;
    for ms in [3, 40, 40, 7_000, 10_000_000] {
        h.observe_ms(ms);
    }
    assert_eq!(h.count(), 5);
    let text = metrics.render(&store);
    let name = "opencti_threatbus_delivery_latency_seconds";
    // The bounds are written as the hand-written exposition (and Go's client) wrote them.
    let bounds = [
        "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5", "5", "10", "60", "300",
        "3600", "+Inf",
    ];
    let counts = [1, 1, 1, 3, 3, 3, 3, 3, 3, 3, 4, 4, 4, 4, 5];
    for (bound, count) in bounds.iter().zip(counts) {
        let line = format!("{name}_bucket{{queue=\"sightings\",le=\"{bound}\"}} {count}");
        assert!(
            text.lines().any(|l| l == line),
            "{line:?} missing in\n{text}"
        );
    }
    let sum = format!("{name}_sum{{queue=\"sightings\"}} ");
    let sum: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix(&sum))
        .unwrap()
        .parse()
        .unwrap();
    assert!((sum - 10_007.083).abs() < 1e-6, "{sum}");
    assert!(text
        .lines()
        .any(|l| l == format!("{name}_count{{queue=\"sightings\"}} 5")));
    // The other queue's histogram is its own.
    assert!(text
        .lines()
        .any(|l| l == format!("{name}_count{{queue=\"indicators\"}} 0")));
}

#[test]
fn handles_share_the_exported_values() {
    let (store, _dir) = store_with_position();
    let metrics = Metrics::default();
    metrics.received(Queue::Indicators, 4);
    metrics.indicators.retried.inc();
    metrics.sightings.dead.add(2);
    metrics.bus_resubscriptions.inc();
    let text = metrics.render(&store);
    for line in [
        "opencti_threatbus_received_total{queue=\"indicators\"} 4",
        "opencti_threatbus_retried_total{queue=\"indicators\"} 1",
        "opencti_threatbus_dead_total{queue=\"sightings\"} 2",
        "opencti_threatbus_threatbus_resubscriptions_total 1",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "{line:?} missing in\n{text}"
        );
    }
    assert_eq!(metrics.indicators.received.get(), 4);
}

fn head(accept: Option<&str>) -> String {
    let mut head = "GET /metrics HTTP/1.1\r\nHost: localhost\r\n".to_string();
    if let Some(accept) = accept {
        head.push_str(&format!("Accept: {accept}\r\n"));
    }
    head + "\r\n"
}

#[test]
fn the_format_follows_the_accept_header() {
    // Prometheus 2.x and 3.x scrape headers: OpenMetrics first.
    for accept in [
        "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
        "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,application/openmetrics-text;version=0.0.1;q=0.5,text/plain;version=1.0.0;escaping=allow-utf-8;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2",
        "application/openmetrics-text",
    ] {
        assert!(wants_openmetrics(&head(Some(accept))), "{accept}");
    }
    // curl, a browser, a scraper that wants the classic format, none at all.
    for accept in [
        Some("*/*"),
        Some("text/html,application/xhtml+xml,*/*;q=0.8"),
        Some("text/plain;version=0.0.4"),
        Some("text/plain;version=0.0.4,application/openmetrics-text;version=1.0.0;q=0.5"),
        Some("application/openmetrics-text;version=1.0.0;q=0"),
        Some("application/openmetrics-text;version=2.0.0"),
        None,
    ] {
        assert!(!wants_openmetrics(&head(accept)), "{accept:?}");
    }
    // Header names are case-insensitive.
    assert!(wants_openmetrics(
        "GET /metrics HTTP/1.1\r\naccept: application/openmetrics-text\r\n\r\n"
    ));
}
