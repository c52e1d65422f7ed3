//! The admin socket: `{data_dir}/admin.sock`, one JSON request line, one JSON reply line.
//!
//! While the daemon runs, sled's lock keeps every other process out of the store, so
//! `inspect-queue`, `requeue-dead`, `purge-dead` and `health` ask the daemon here instead.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

use crate::inspect::{self, Query, Report};
use crate::pipeline::reconcile::{ReconcileReport, ReconcileRequest};
use crate::store::{DeadFilter, Queue, Store};

pub const SOCKET_NAME: &str = "admin.sock";

/// A request line longer than this is refused: every real request is tiny.
const MAX_REQUEST_BYTES: u64 = 64 * 1024;
/// How long a client waits for the daemon before calling it unresponsive.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `reconcile` waits for its report: a pass asks OpenCTI about every active
/// indicator, 50 per request (100,000 indicators at 0.5 s a request take ~17 min).
const RECONCILE_TIMEOUT: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Inspect(Query),
    Health,
    RequeueDead {
        queue: Option<Queue>,
        keys: Vec<u64>,
    },
    PurgeDead {
        queue: Option<Queue>,
        keys: Vec<u64>,
    },
    /// Check every active catalog indicator against OpenCTI (the daemon only: it holds the
    /// OpenCTI client and queues the `REMOVE`s).
    Reconcile,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Response {
    Report(Report),
    Health(Health),
    Count { count: usize },
    Reconcile(ReconcileReport),
    Error { message: String },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Health {
    pub uptime_s: u64,
    /// One line of state per component (`stream`, `threatbus`, `opencti`, …).
    pub components: BTreeMap<String, String>,
    pub indicators: u64,
    pub sightings: u64,
    /// Indicators from other Threat Bus apps waiting for OpenCTI.
    #[serde(default)]
    pub imports: u64,
    pub dead: u64,
    /// Why the daemon is unhealthy (`health` then exits 1): a full disk, a store that
    /// cannot write any more. Empty when healthy.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub unhealthy: BTreeMap<String, String>,
}

/// Live state the daemon's components report, for `health`.
pub struct Status {
    started: Instant,
    components: Mutex<BTreeMap<String, String>>,
    unhealthy: Mutex<BTreeMap<String, String>>,
}

impl Default for Status {
    fn default() -> Self {
        Status {
            started: Instant::now(),
            components: Mutex::new(BTreeMap::new()),
            unhealthy: Mutex::new(BTreeMap::new()),
        }
    }
}

impl Status {
    pub fn set(&self, component: &str, state: impl Into<String>) {
        let mut map = self.components.lock().unwrap_or_else(|p| p.into_inner());
        map.insert(component.to_string(), state.into());
    }

    /// Marks the daemon unhealthy because of `component` (`None`: healthy again).
    pub fn set_unhealthy(&self, component: &str, why: Option<String>) {
        let mut map = self.unhealthy.lock().unwrap_or_else(|p| p.into_inner());
        match why {
            Some(why) => map.insert(component.to_string(), why),
            None => map.remove(component),
        };
    }

    /// The component's state line, if it reported one.
    pub fn get(&self, component: &str) -> Option<String> {
        let map = self.components.lock().unwrap_or_else(|p| p.into_inner());
        map.get(component).cloned()
    }

    fn health(&self, store: &Store) -> Health {
        Health {
            uptime_s: self.started.elapsed().as_secs(),
            components: self
                .components
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            indicators: store.len(Queue::Indicators),
            sightings: store.len(Queue::Sightings),
            imports: store.len(Queue::Imports),
            dead: store.dead_len(),
            unhealthy: self
                .unhealthy
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The socket could not be created.
    #[error("cannot listen on the admin socket {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The daemon's socket exists and accepted us, but the exchange failed.
    #[error("the daemon did not answer on {path}: {source}")]
    Exchange {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The daemon answered something this client cannot read.
    #[error("the daemon's answer on {path} is not valid: {detail}")]
    BadReply { path: PathBuf, detail: String },
}

pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join(SOCKET_NAME)
}

/// Binds the socket. The caller holds the store's lock, so a socket file already there is
/// a leftover of a daemon that died: it is replaced.
pub fn bind(data_dir: &Path) -> Result<UnixListener, AdminError> {
    let path = socket_path(data_dir);
    if path.exists() {
        let _ = std::fs::remove_file(&path);
    }
    UnixListener::bind(&path).map_err(|source| AdminError::Bind { path, source })
}

/// What the daemon's admin socket can reach besides the store.
#[derive(Clone, Default)]
pub struct Daemon {
    /// The reconciliation task; `None` when OpenCTI is not configured for it.
    pub reconcile: Option<mpsc::UnboundedSender<ReconcileRequest>>,
}

/// Answers requests until the task is dropped.
pub async fn serve(listener: UnixListener, store: Arc<Store>, status: Arc<Status>, daemon: Daemon) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let (store, status) = (Arc::clone(&store), Arc::clone(&status));
                let daemon = daemon.clone();
                tokio::spawn(async move {
                    if let Err(e) = answer(stream, store, status, daemon).await {
                        tracing::debug!(error = %e, "admin connection failed");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "admin socket accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn answer(
    stream: UnixStream,
    store: Arc<Store>,
    status: Arc<Status>,
    daemon: Daemon,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    tokio::io::BufReader::new(read.take(MAX_REQUEST_BYTES))
        .read_line(&mut line)
        .await?;
    let response = match serde_json::from_str::<Request>(&line) {
        Ok(Request::Reconcile) => reconcile(&daemon).await,
        // Store calls block (scans, flushes): keep them off the async workers.
        Ok(request) => {
            tokio::task::spawn_blocking(move || handle(&store, &status, request, "daemon"))
                .await
                .unwrap_or_else(|e| Response::Error {
                    message: format!("request failed: {e}"),
                })
        }
        Err(e) => Response::Error {
            message: format!("bad request: {e}"),
        },
    };
    let mut out = serde_json::to_vec(&response).unwrap_or_default();
    out.push(b'\n');
    write.write_all(&out).await?;
    write.shutdown().await
}

/// Hands a `reconcile` request to the reconciliation task and waits for its report.
async fn reconcile(daemon: &Daemon) -> Response {
    let Some(tasks) = &daemon.reconcile else {
        return Response::Error {
            message: "reconciliation is not running in this daemon".into(),
        };
    };
    let (reply, report) = oneshot::channel();
    if tasks.send(ReconcileRequest::OnDemand { reply }).is_err() {
        return Response::Error {
            message: "the reconciliation task has stopped".into(),
        };
    }
    match report.await {
        Ok(report) => Response::Reconcile(report),
        Err(_) => Response::Error {
            message: "the daemon stopped before the reconciliation finished".into(),
        },
    }
}

/// Carries out one request on an open store: the daemon and the offline CLI share this.
pub fn handle(store: &Store, status: &Status, request: Request, source: &str) -> Response {
    let result = match request {
        Request::Inspect(query) => {
            inspect::report(store, &query, source, crate::store::now_ms()).map(|mut report| {
                report.stream_state = status.get("stream");
                Response::Report(report)
            })
        }
        Request::Health => Ok(Response::Health(status.health(store))),
        Request::RequeueDead { queue, keys } => store
            .requeue_dead(&DeadFilter { queue, keys })
            .map(|count| Response::Count { count }),
        Request::PurgeDead { queue, keys } => store
            .purge_dead(&DeadFilter { queue, keys })
            .map(|count| Response::Count { count }),
        // Reaches here only without a daemon (the daemon answers it in `answer`).
        Request::Reconcile => Ok(Response::Error {
            message: "reconcile asks the running daemon, which holds the OpenCTI client: start the bridge first".into(),
        }),
    };
    result.unwrap_or_else(|e| Response::Error {
        message: e.to_string(),
    })
}

/// Asks the daemon. `Ok(None)` when no daemon listens (no socket, or nobody accepts).
pub fn ask(data_dir: &Path, request: &Request) -> Result<Option<Response>, AdminError> {
    let path = socket_path(data_dir);
    let mut stream = match std::os::unix::net::UnixStream::connect(&path) {
        Ok(stream) => stream,
        Err(_) => return Ok(None),
    };
    let exchange = |source| AdminError::Exchange {
        path: path.clone(),
        source,
    };
    let timeout = match request {
        Request::Reconcile => RECONCILE_TIMEOUT,
        _ => CLIENT_TIMEOUT,
    };
    stream.set_read_timeout(Some(timeout)).map_err(exchange)?;
    stream
        .set_write_timeout(Some(CLIENT_TIMEOUT))
        .map_err(exchange)?;
    let mut line = serde_json::to_vec(request).unwrap_or_default();
    line.push(b'\n');
    stream.write_all(&line).map_err(exchange)?;
    let mut reply = String::new();
    BufReader::new(&stream)
        .read_line(&mut reply)
        .map_err(exchange)?;
    serde_json::from_str(&reply)
        .map(Some)
        .map_err(|e| AdminError::BadReply {
            path: path.clone(),
            detail: e.to_string(),
        })
}
