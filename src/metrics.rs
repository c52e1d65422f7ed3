//! Counters the daemon keeps (SPEC §7), rendered as Prometheus text when enabled.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::store::{Queue, Store};

#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Upper bounds (seconds) of the delivery-latency buckets: from a quick local delivery to
/// an item that waited out an outage of an hour.
const LATENCY_BUCKETS_S: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0, 300.0, 3600.0,
];

/// A Prometheus histogram of delivery latency: receipt by the bridge → confirmed delivery.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Cumulative counts per bucket of `LATENCY_BUCKETS_S`.
    buckets: [Counter; LATENCY_BUCKETS_S.len()],
    count: Counter,
    sum_ms: Counter,
}

impl Histogram {
    pub fn observe_ms(&self, ms: u64) {
        let seconds = ms as f64 / 1000.0;
        for (bound, bucket) in LATENCY_BUCKETS_S.iter().zip(&self.buckets) {
            if seconds <= *bound {
                bucket.inc();
            }
        }
        self.count.inc();
        self.sum_ms.add(ms);
    }

    /// Observes the latency of an item received at `received_at_ms`.
    pub fn observe_since(&self, received_at_ms: u64) {
        self.observe_ms(crate::store::now_ms().saturating_sub(received_at_ms));
    }

    pub fn count(&self) -> u64 {
        self.count.get()
    }
}

#[derive(Debug, Default)]
pub struct QueueCounters {
    /// Receipt → confirmed delivery.
    pub latency: Histogram,
    pub received: Counter,
    pub delivered: Counter,
    pub retried: Counter,
    pub dead: Counter,
    pub dropped: Counter,
}

#[derive(Debug, Default)]
pub struct Metrics {
    pub indicators: QueueCounters,
    pub sightings: QueueCounters,
    pub stream_events: Counter,
    pub stream_reconnects: Counter,
    pub stream_gaps: Counter,
    pub bus_resubscriptions: Counter,
    /// Snapshot requests received from Threat Bus (both kinds).
    pub snapshot_requests: Counter,
    /// Indicator snapshot requests answered to the end.
    pub snapshots_answered: Counter,
    /// Indicators sent in snapshot answers.
    pub snapshot_indicators: Counter,
}

impl Metrics {
    pub fn queue(&self, queue: Queue) -> &QueueCounters {
        match queue {
            Queue::Indicators => &self.indicators,
            Queue::Sightings => &self.sightings,
        }
    }

    pub fn received(&self, queue: Queue, n: u64) {
        self.queue(queue).received.add(n);
    }

    /// Prometheus text exposition format, version 0.0.4.
    pub fn render(&self, store: &Store) -> String {
        let mut out = String::new();
        for (name, help, pick) in [
            (
                "received",
                "Items written to the outbox.",
                pick_received as fn(&QueueCounters) -> u64,
            ),
            (
                "delivered",
                "Items confirmed delivered and removed from the outbox.",
                |q| q.delivered.get(),
            ),
            (
                "retried",
                "Failed delivery attempts that will be retried.",
                |q| q.retried.get(),
            ),
            ("dead", "Items moved to the dead letters.", |q| q.dead.get()),
            (
                "dropped",
                "Items dropped because the outbox was full.",
                |q| q.dropped.get(),
            ),
        ] {
            let _ = writeln!(out, "# HELP opencti_threatbus_{name}_total {help}");
            let _ = writeln!(out, "# TYPE opencti_threatbus_{name}_total counter");
            for queue in Queue::ALL {
                let _ = writeln!(
                    out,
                    "opencti_threatbus_{name}_total{{queue=\"{queue}\"}} {}",
                    pick(self.queue(queue))
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP opencti_threatbus_queue_depth Items waiting in the outbox."
        );
        let _ = writeln!(out, "# TYPE opencti_threatbus_queue_depth gauge");
        for queue in Queue::ALL {
            let _ = writeln!(
                out,
                "opencti_threatbus_queue_depth{{queue=\"{queue}\"}} {}",
                store.len(queue)
            );
        }
        let _ = writeln!(
            out,
            "opencti_threatbus_queue_depth{{queue=\"dead\"}} {}",
            store.dead_len()
        );
        let size = store.catalog_size();
        let _ = writeln!(
            out,
            "# HELP opencti_threatbus_catalog_indicators Indicators in the catalog of what was sent to Threat Bus (active: tools match them)."
        );
        let _ = writeln!(out, "# TYPE opencti_threatbus_catalog_indicators gauge");
        for (state, count) in [
            ("active", size.active),
            ("removed", size.total.saturating_sub(size.active)),
        ] {
            let _ = writeln!(
                out,
                "opencti_threatbus_catalog_indicators{{state=\"{state}\"}} {count}"
            );
        }
        render_ages(&mut out, store);
        self.render_latency(&mut out);
        for (name, help, value) in [
            (
                "stream_events_total",
                "SSE events read from OpenCTI.",
                self.stream_events.get(),
            ),
            (
                "stream_reconnects_total",
                "Reconnections to the OpenCTI stream.",
                self.stream_reconnects.get(),
            ),
            (
                "stream_gaps_total",
                "Times the stored position was older than the oldest retained event.",
                self.stream_gaps.get(),
            ),
            (
                "threatbus_resubscriptions_total",
                "Subscriptions to Threat Bus after the first.",
                self.bus_resubscriptions.get(),
            ),
            (
                "snapshot_requests_total",
                "Snapshot requests received from Threat Bus (indicators and sightings).",
                self.snapshot_requests.get(),
            ),
            (
                "snapshots_answered_total",
                "Indicator snapshot requests answered to the end.",
                self.snapshots_answered.get(),
            ),
            (
                "snapshot_indicators_total",
                "Indicators sent in snapshot answers.",
                self.snapshot_indicators.get(),
            ),
        ] {
            let _ = writeln!(out, "# HELP opencti_threatbus_{name} {help}");
            let _ = writeln!(out, "# TYPE opencti_threatbus_{name} counter");
            let _ = writeln!(out, "opencti_threatbus_{name} {value}");
        }
        out
    }
}

impl Metrics {
    fn render_latency(&self, out: &mut String) {
        let name = "opencti_threatbus_delivery_latency_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} From receipt by the bridge to confirmed delivery."
        );
        let _ = writeln!(out, "# TYPE {name} histogram");
        for queue in Queue::ALL {
            let h = &self.queue(queue).latency;
            for (bound, bucket) in LATENCY_BUCKETS_S.iter().zip(&h.buckets) {
                let _ = writeln!(
                    out,
                    "{name}_bucket{{queue=\"{queue}\",le=\"{bound}\"}} {}",
                    bucket.get()
                );
            }
            let _ = writeln!(
                out,
                "{name}_bucket{{queue=\"{queue}\",le=\"+Inf\"}} {}",
                h.count.get()
            );
            let _ = writeln!(
                out,
                "{name}_sum{{queue=\"{queue}\"}} {:.3}",
                h.sum_ms.get() as f64 / 1000.0
            );
            let _ = writeln!(out, "{name}_count{{queue=\"{queue}\"}} {}", h.count.get());
        }
    }
}

/// How old the oldest waiting item is, and how far behind the stream position is.
fn render_ages(out: &mut String, store: &Store) {
    let now = crate::store::now_ms();
    let _ = writeln!(out, "# HELP opencti_threatbus_queue_oldest_age_seconds Age of the oldest item waiting in the outbox.");
    let _ = writeln!(
        out,
        "# TYPE opencti_threatbus_queue_oldest_age_seconds gauge"
    );
    for queue in Queue::ALL {
        let age = store
            .oldest_received_ms(queue)
            .ok()
            .flatten()
            .map_or(0, |t| now.saturating_sub(t));
        let _ = writeln!(
            out,
            "opencti_threatbus_queue_oldest_age_seconds{{queue=\"{queue}\"}} {:.3}",
            age as f64 / 1000.0
        );
    }
    // A stream id starts with its time in ms: now minus that is how far behind the bridge reads.
    let position_ms = store
        .position()
        .ok()
        .flatten()
        .and_then(|p| p.split_once('-').and_then(|(ms, _)| ms.parse::<u64>().ok()));
    if let Some(ms) = position_ms {
        let _ = writeln!(out, "# HELP opencti_threatbus_stream_lag_seconds Now minus the time of the stored stream position.");
        let _ = writeln!(out, "# TYPE opencti_threatbus_stream_lag_seconds gauge");
        let _ = writeln!(
            out,
            "opencti_threatbus_stream_lag_seconds {:.3}",
            now.saturating_sub(ms) as f64 / 1000.0
        );
    }
}

fn pick_received(q: &QueueCounters) -> u64 {
    q.received.get()
}

/// A request head longer than this is refused: a scraper sends a few hundred bytes.
const MAX_REQUEST_HEAD: usize = 8 * 1024;

/// Serves `GET /metrics` in Prometheus text format on `listener` until the task is dropped.
/// Hand-rolled on purpose: one fixed endpoint does not warrant an HTTP server dependency.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: std::sync::Arc<Metrics>,
    store: std::sync::Arc<Store>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            continue;
        };
        let (metrics, store) = (
            std::sync::Arc::clone(&metrics),
            std::sync::Arc::clone(&store),
        );
        tokio::spawn(async move {
            if let Err(e) = answer(stream, &metrics, &store).await {
                tracing::debug!(error = %e, "metrics request failed");
            }
        });
    }
}

async fn answer(
    mut stream: tokio::net::TcpStream,
    metrics: &Metrics,
    store: &Store,
) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST_HEAD {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let request_line = String::from_utf8_lossy(&head);
    let path = request_line.split_whitespace().nth(1).unwrap_or("");
    let (status, body) = if request_line.starts_with("GET ") && (path == "/metrics" || path == "/")
    {
        ("200 OK", metrics.render(store))
    } else {
        (
            "404 Not Found",
            "only GET /metrics is served here\n".to_string(),
        )
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_buckets_are_cumulative() {
        let h = Histogram::default();
        for ms in [3, 40, 40, 7_000, 10_000_000] {
            h.observe_ms(ms);
        }
        let counts: Vec<u64> = h.buckets.iter().map(Counter::get).collect();
        assert_eq!(counts, vec![1, 1, 1, 3, 3, 3, 3, 3, 3, 3, 4, 4, 4, 4]);
        assert_eq!(h.count(), 5);
        assert_eq!(h.sum_ms.get(), 10_007_083);
    }
}
