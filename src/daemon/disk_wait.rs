//! Starting on a full disk. sled writes when it opens a store, so on a filesystem with no
//! room left (typically: the last run died of ENOSPC, and sled hands little of its file
//! back) even the open fails. Exiting then would be a crash loop, restarting into the same
//! full disk; so the daemon stays up, answers `health` on the admin socket (unhealthy:
//! disk full, with sled's error), and tries again until the store opens.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

use super::Signals;
use crate::admin::{self, Health, Request, Response};
use crate::config::Config;
use crate::store::damage::DamageReport;
use crate::store::Store;

/// Between two attempts to open the store on a full disk: each costs little (sled fails
/// at its first write), and room that comes back is used within this.
const OPEN_RETRY: Duration = Duration::from_secs(2);

/// Whether an open failed because the filesystem is full.
fn is_disk_full(error: &anyhow::Error) -> bool {
    error
        .chain()
        .any(|e| e.to_string().contains("No space left on device"))
}

/// Opens the store, waiting for room on a full disk (`None`: a signal came first).
pub(super) async fn open_store_when_room(
    config: &Config,
    signals: &mut Signals,
) -> anyhow::Result<Option<(Arc<Store>, Option<DamageReport>)>> {
    let first = match super::open_store(config).await {
        Err(error) if is_disk_full(&error) => error,
        other => return other.map(Some),
    };
    let data_dir = &config.bridge.data_dir;
    tracing::error!(
        error = %first,
        dir = %data_dir.display(),
        retry_s = OPEN_RETRY.as_secs(),
        "DISK FULL: the store cannot be opened (sled writes when it opens); waiting for room, \
         health says unhealthy meanwhile"
    );
    let why = format!("disk full: the store cannot be opened, waiting for room: {first}");
    let server = match admin::bind(data_dir) {
        Ok(listener) => Some(tokio::spawn(answer_unhealthy(listener, why))),
        Err(error) => {
            tracing::warn!(%error, "cannot serve health while waiting for disk space");
            None
        }
    };
    let opened = loop {
        tokio::select! {
            signal = signals.recv() => {
                tracing::info!(signal, "shutting down while waiting for disk space");
                break Ok(None);
            }
            _ = tokio::time::sleep(OPEN_RETRY) => {}
        }
        match super::open_store(config).await {
            Ok(opened) => {
                tracing::info!("room on the disk again: the store is open");
                break Ok(Some(opened));
            }
            Err(error) if is_disk_full(&error) => {
                tracing::debug!(%error, "the store still cannot be opened: disk full")
            }
            Err(error) => break Err(error),
        }
    };
    if let Some(server) = server {
        server.abort();
    }
    // The daemon binds it again once the store is open.
    let _ = std::fs::remove_file(admin::socket_path(data_dir));
    opened
}

/// Answers every request on the admin socket: `health` with `why`, anything else with an
/// error (there is no store to inspect yet).
async fn answer_unhealthy(listener: tokio::net::UnixListener, why: String) {
    let started = Instant::now();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let why = why.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut line = String::new();
            let mut reader =
                tokio::io::BufReader::new(tokio::io::AsyncReadExt::take(read, 64 * 1024));
            if reader.read_line(&mut line).await.is_err() {
                return;
            }
            let response = match serde_json::from_str::<Request>(&line) {
                Ok(Request::Health) => Response::Health(Health {
                    uptime_s: started.elapsed().as_secs(),
                    components: BTreeMap::from([(
                        "store".to_string(),
                        "waiting for disk space to open".to_string(),
                    )]),
                    indicators: 0,
                    sightings: 0,
                    imports: 0,
                    dead: 0,
                    unhealthy: BTreeMap::from([("store".to_string(), why)]),
                }),
                Ok(_) => Response::Error { message: why },
                Err(e) => Response::Error {
                    message: format!("bad request: {e}"),
                },
            };
            if let Ok(mut text) = serde_json::to_string(&response) {
                text.push('\n');
                let _ = write.write_all(text.as_bytes()).await;
            }
        });
    }
}
