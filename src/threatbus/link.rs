//! The Threat Bus link: subscription, heartbeats, re-subscription, data sockets.
//!
//! Two std threads per link, bridged to tokio by channels:
//! - the **supervisor** (`threatbus-link`) does the blocking management requests
//!   (subscribe with backoff, a heartbeat every `heartbeat_interval`, unsubscribe), opens
//!   the data sockets after each subscribe and publishes the [`LinkState`];
//! - the **socket thread** (`threatbus-io`, see `io.rs`) owns the XPUB and the SUB, writes
//!   what [`Publisher::publish`] hands it and reads what Threat Bus sends.
//!
//! Facts from `threatbus/README.md` this follows:
//! - Threat Bus never expires a subscription and keeps no heartbeat state; a heartbeat
//!   answered `error` means it restarted. So a killed bridge leaves its p2p topic behind:
//!   [`LinkConfig::stale_topic`] is unsubscribed at start, and [`LinkHandle::shutdown`]
//!   reports a topic it could not unsubscribe.
//! - The data ports come without a host: connect them on the manage host.
//! - Slow joiner: frames written on a PUB before Threat Bus's SUB subscription arrived are
//!   lost. We connect an XPUB instead and publish only while it holds Threat Bus's
//!   `stix2/` subscription. With ZMQ_IMMEDIATE set on the XPUB, the `\x00stix2/`
//!   unsubscription arrives when Threat Bus goes away, which tells us early that it is gone
//!   (without it, none does: see `open_data_sockets`).
//! - High-water marks: SNDHWM=0 on the XPUB (20,000 at once with the default lost 9,000),
//!   RCVHWM=0 on the SUB (Threat Bus's PUB drops what a slow app does not take).
//! - Threat Bus re-serializes every message: the echo of a published indicator is not
//!   byte-identical; [`Incoming`] keeps the raw JSON for `crate::stix` to parse.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc as tokio_mpsc, oneshot, watch};

use super::io::{self, DataSockets, IoCommand, IoEvent, IoSender};
use super::manage::{self, ManageClient, ManageError, Subscription};
use super::{Incoming, LinkError};
use crate::config::ThreatBusConfig;

/// How long the XPUB may still flush written frames at shutdown.
const SHUTDOWN_XPUB_LINGER: Duration = Duration::from_secs(1);
/// How long [`LinkHandle::shutdown`] waits for the link's threads.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_millis(3000);
/// After a successful subscribe, how long until a missing data connection is worth a warning.
const DATA_CONNECT_WARNING: Duration = Duration::from_secs(10);

/// What the link needs to know.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// The Threat Bus host (management and data sockets).
    pub host: String,
    /// Threat Bus's management (REP) port.
    pub manage_port: u16,
    /// Days of snapshot to ask for with the first subscribe (0: none). Re-subscriptions
    /// ask for none, as upstream does.
    pub snapshot_days: u32,
    /// Subscription topics (prefixes of `stix2/indicator` / `stix2/sighting`).
    pub topics: Vec<String>,
    /// Time between heartbeats.
    pub heartbeat_interval: Duration,
    /// A p2p topic a previous run left in Threat Bus: unsubscribed first.
    pub stale_topic: Option<String>,
    /// First wait between failed subscribe attempts.
    pub retry_initial: Duration,
    /// Longest wait between failed subscribe attempts.
    pub retry_max: Duration,
}

impl LinkConfig {
    /// The defaults: topics `["stix2/sighting", "stix2/indicator"]`, heartbeat every 5 s,
    /// no snapshot, retries from 250 ms up to 10 s.
    pub fn new(host: impl Into<String>, manage_port: u16) -> Self {
        LinkConfig {
            host: host.into(),
            manage_port,
            snapshot_days: 0,
            topics: vec!["stix2/sighting".to_owned(), "stix2/indicator".to_owned()],
            heartbeat_interval: Duration::from_secs(5),
            stale_topic: None,
            retry_initial: Duration::from_millis(250),
            retry_max: Duration::from_secs(10),
        }
    }

    /// From the `threatbus` section of the configuration.
    pub fn from_config(config: &ThreatBusConfig, stale_topic: Option<String>) -> Self {
        LinkConfig {
            snapshot_days: config.snapshot_days,
            stale_topic,
            ..LinkConfig::new(config.zmq_host.clone(), config.zmq_port)
        }
    }
}

/// The link's state, published through a `watch` channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkState {
    /// Subscribing, or subscribed and waiting for Threat Bus to connect to our XPUB.
    Connecting,
    /// Subscribed, and the XPUB holds Threat Bus's subscription: publishing works.
    /// `generation` grows with every (re)subscription: when it changed, messages in
    /// flight under the previous one may have been lost.
    Ready { topic: String, generation: u64 },
    /// Not usable right now (Threat Bus unreachable, restarted, the link shut down …);
    /// the link keeps trying until shut down.
    Down { reason: String },
}

/// Starts links.
#[derive(Debug)]
pub struct Link {
    _private: (),
}

impl Link {
    /// Starts the link's threads and returns at once: the link subscribes in the
    /// background (watch [`LinkHandle::state`]) and delivers what Threat Bus sends on the
    /// returned channel. Needs no tokio runtime.
    pub fn start(
        config: LinkConfig,
    ) -> Result<(LinkHandle, tokio_mpsc::UnboundedReceiver<Incoming>), LinkError> {
        let (incoming_tx, incoming_rx) = tokio_mpsc::unbounded_channel();
        let (control_tx, control_rx) = mpsc::channel();
        let io_control = control_tx.clone();
        let notify = Box::new(move |event: IoEvent| {
            // The supervisor gone means shutdown: nobody to tell.
            let _ = io_control.send(Control::Io(event));
        });
        let (io_sender, io_thread) = io::new(incoming_tx, notify).map_err(LinkError::Start)?;
        let io_join = std::thread::Builder::new()
            .name("threatbus-io".to_owned())
            .spawn(move || io_thread.run())
            .map_err(LinkError::Start)?;

        let (state_tx, state_rx) = watch::channel(LinkState::Connecting);
        let (done_tx, done_rx) = oneshot::channel();
        let topic = Arc::new(Mutex::new(None));
        let cancel = Arc::new(AtomicBool::new(false));
        let context = zmq::Context::new();
        let supervisor = Supervisor {
            manage: ManageClient::new(context.clone(), &config.host, config.manage_port)
                .with_cancel(Arc::clone(&cancel)),
            final_manage: ManageClient::new(context.clone(), &config.host, config.manage_port),
            context,
            io: io_sender.clone(),
            io_join: Some(io_join),
            control: control_rx,
            state: state_tx,
            last_logged_down: None,
            topic: Arc::clone(&topic),
            generation: 0,
            pending_unsubscribe: Vec::new(),
            done: Some(done_tx),
            config,
        };
        let spawned = std::thread::Builder::new()
            .name("threatbus-link".to_owned())
            .spawn(move || supervisor.run());
        if let Err(e) = spawned {
            // The socket thread ends when its command channel closes with io_sender.
            let _ = io_sender.send(IoCommand::Shutdown {
                xpub_linger: Duration::ZERO,
            });
            return Err(LinkError::Start(e));
        }
        Ok((
            LinkHandle {
                publisher: Publisher { io: io_sender },
                state: state_rx,
                topic,
                cancel,
                control: control_tx,
                done: Some(done_rx),
            },
            incoming_rx,
        ))
    }
}

/// Publishes frames on the link; cheap to clone.
#[derive(Clone)]
pub struct Publisher {
    io: IoSender,
}

impl Publisher {
    /// Hands `frames` (each a full `"stix2/indicator {json}"`) to the socket thread.
    ///
    /// The frames are queued **when this is called**, not when the future is first
    /// polled, so the order of calls is the order on the wire and a caller may keep
    /// several batches in flight. The future resolves with the generation they were
    /// written under, once written on an XPUB that held Threat Bus's subscription at that
    /// moment (written means queued in ZeroMQ, SNDHWM=0: not yet relayed — the echo on
    /// the subscription is the confirmation). Otherwise [`LinkError::NotReady`] and
    /// nothing was written. Never blocks.
    pub fn publish(
        &self,
        frames: Vec<String>,
    ) -> impl Future<Output = Result<u64, LinkError>> + Send + 'static {
        let (reply, result) = oneshot::channel();
        let queued = self.io.send(IoCommand::Publish { frames, reply });
        async move {
            queued.map_err(|_| LinkError::Closed)?;
            result.await.map_err(|_| LinkError::Closed)?
        }
    }
}

/// Controls a running link. Dropping it stops the link in the background (unsubscribing);
/// [`LinkHandle::shutdown`] does the same and waits.
pub struct LinkHandle {
    publisher: Publisher,
    state: watch::Receiver<LinkState>,
    topic: Arc<Mutex<Option<String>>>,
    cancel: Arc<AtomicBool>,
    control: mpsc::Sender<Control>,
    done: Option<oneshot::Receiver<Option<String>>>,
}

impl LinkHandle {
    /// The link's state, current and to come.
    pub fn state(&self) -> watch::Receiver<LinkState> {
        self.state.clone()
    }

    /// The p2p topic of the current subscription, from the subscribe reply on (before
    /// [`LinkState::Ready`]): persist it, to pass as the next start's `stale_topic`.
    pub fn current_topic(&self) -> Option<String> {
        lock(&self.topic).clone()
    }

    /// A clonable publisher for other tasks.
    pub fn publisher(&self) -> Publisher {
        self.publisher.clone()
    }

    /// See [`Publisher::publish`].
    pub fn publish(
        &self,
        frames: Vec<String>,
    ) -> impl Future<Output = Result<u64, LinkError>> + Send + 'static {
        self.publisher.publish(frames)
    }

    /// Stops the link: closes the data sockets (the XPUB gets 1 s to flush what was
    /// written), unsubscribes the current topic (1 s timeout), joins the threads. Returns
    /// within ~3 s even if Threat Bus is gone. Returns the p2p topic that is possibly still
    /// registered in Threat Bus (the unsubscribe got no reply): persist it as the next
    /// start's `stale_topic`. `None` when there is nothing to clean up.
    pub async fn shutdown(mut self) -> Option<String> {
        self.stop();
        let done = self.done.take()?;
        match tokio::time::timeout(SHUTDOWN_TIMEOUT, done).await {
            Ok(Ok(left_behind)) => left_behind,
            Ok(Err(_)) => lock(&self.topic).clone(),
            Err(_) => {
                tracing::warn!("the Threat Bus link did not stop within {SHUTDOWN_TIMEOUT:?}");
                lock(&self.topic).clone()
            }
        }
    }

    fn stop(&self) {
        // Cancel a pending subscribe or heartbeat (≤ 50 ms), then tell the supervisor.
        self.cancel.store(true, Ordering::Relaxed);
        let _ = self.control.send(Control::Shutdown);
    }
}

impl Drop for LinkHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

impl std::fmt::Debug for LinkHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkHandle")
            .field("state", &*self.state.borrow())
            .finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding this lock cannot leave an Option<String> inconsistent.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What the supervisor thread receives.
enum Control {
    Shutdown,
    Io(IoEvent),
}

/// Why a supervised subscription ended.
enum Outcome {
    Shutdown,
    Lost {
        reason: String,
        /// Threat Bus may still know the topic (unsubscribe it once reachable).
        topic_alive: bool,
    },
}

struct Supervisor {
    config: LinkConfig,
    /// Requests that give up when the link is cancelled.
    manage: ManageClient,
    /// The final unsubscribe (after cancel).
    final_manage: ManageClient,
    context: zmq::Context,
    io: IoSender,
    io_join: Option<JoinHandle<()>>,
    control: mpsc::Receiver<Control>,
    state: watch::Sender<LinkState>,
    last_logged_down: Option<String>,
    topic: Arc<Mutex<Option<String>>>,
    generation: u64,
    /// Topics Threat Bus may still hold for us: unsubscribed when it is reachable.
    pending_unsubscribe: Vec<String>,
    done: Option<oneshot::Sender<Option<String>>>,
}

impl Supervisor {
    fn run(mut self) {
        let endpoint = self.manage.endpoint().to_owned();
        tracing::info!(endpoint, "connecting to Threat Bus");
        if let Some(stale) = self.config.stale_topic.take() {
            // Threat Bus never expires subscriptions: a previous run's topic would keep
            // collecting (and dropping) messages until Threat Bus restarts.
            self.pending_unsubscribe.push(stale);
            self.unsubscribe_pending();
        }
        let mut snapshot_days = self.config.snapshot_days;
        // The project's backoff: its jitter never takes a delay past `retry_max`, which
        // bounds how long a returned Threat Bus goes unnoticed.
        let mut backoff = crate::retry::Backoff::new(crate::retry::RetryPolicy {
            initial: self.config.retry_initial,
            max: self.config.retry_max,
            multiplier: 2.0,
        });
        loop {
            let subscription = match self.manage.subscribe(&self.config.topics, snapshot_days) {
                Ok(s) => s,
                Err(ManageError::Cancelled { .. }) => break,
                Err(e) => {
                    self.set_down(format!("subscribing to Threat Bus failed: {e}"));
                    let wait = backoff.next_delay();
                    tracing::debug!(?wait, "retrying the subscription");
                    if self.sleep(wait) {
                        break;
                    }
                    continue;
                }
            };
            backoff.reset();
            // Upstream, too, asks for the snapshot only once: a reconnect would ask again.
            snapshot_days = 0;
            self.generation += 1;
            let generation = self.generation;
            *lock(&self.topic) = Some(subscription.topic.clone());
            tracing::info!(
                topic = subscription.topic,
                pub_port = subscription.pub_port,
                sub_port = subscription.sub_port,
                generation,
                "subscribed to Threat Bus"
            );
            let sockets = match self.open_data_sockets(&subscription, generation) {
                Ok(s) => s,
                Err(e) => {
                    self.set_down(format!("opening the Threat Bus data sockets failed: {e}"));
                    self.forget_topic(true);
                    if self.sleep(backoff.next_delay()) {
                        break;
                    }
                    continue;
                }
            };
            if self.io.send(IoCommand::Connect(sockets)).is_err() {
                tracing::error!("the Threat Bus socket thread is gone");
                break;
            }
            self.set_state(LinkState::Connecting);
            // As upstream: new subscription first, then drop the old one(s).
            self.unsubscribe_pending();
            match self.supervise(&subscription.topic, generation) {
                Outcome::Shutdown => break,
                Outcome::Lost {
                    reason,
                    topic_alive,
                } => {
                    let _ = self.io.send(IoCommand::Disconnect);
                    self.forget_topic(topic_alive);
                    self.set_down(reason);
                }
            }
        }
        self.finish();
    }

    /// Connects the SUB (subscribed to the p2p topic) and the XPUB on the manage host.
    fn open_data_sockets(
        &self,
        subscription: &Subscription,
        generation: u64,
    ) -> Result<DataSockets, zmq::Error> {
        let ipv6 = manage::needs_ipv6(&self.config.host);
        // The SUB first: its subscription travels while the XPUB connects, so by the time
        // Threat Bus's subscription shows up on the XPUB (Ready) ours has very likely
        // reached its PUB too (the receive-side slow joiner; README §4).
        let sub = self.context.socket(zmq::SUB)?;
        sub.set_linger(0)?;
        // RCVHWM=0: Threat Bus's PUB drops what we do not take in time (9,500 of 25,000
        // arrived with the default); unlimited lets libzmq's I/O thread drain TCP.
        sub.set_rcvhwm(0)?;
        sub.set_ipv6(ipv6)?;
        sub.set_subscribe(subscription.topic.as_bytes())?;
        sub.connect(&manage::tcp_endpoint(
            &self.config.host,
            subscription.pub_port,
        ))?;
        let xpub = self.context.socket(zmq::XPUB)?;
        xpub.set_linger(0)?;
        // SNDHWM=0: a burst larger than the HWM would be dropped silently (9,000 of
        // 20,000 with the default); unlimited buffers it on our side instead.
        xpub.set_sndhwm(0)?;
        // IMMEDIATE: without it libzmq (4.3.4, connecting side) keeps the pipe across a
        // lost connection, so Threat Bus going away produces no `\x00stix2/` frame, its
        // subscription seems to stay, and frames written meanwhile queue for whoever binds
        // the port next (observed). With it, the pipe exists only while connected: the
        // `\x00stix2/` frame arrives when Threat Bus dies and `\x01stix2/` again when it
        // is back, so "subscribed" means "connected to Threat Bus right now".
        xpub.set_immediate(true)?;
        xpub.set_ipv6(ipv6)?;
        xpub.connect(&manage::tcp_endpoint(
            &self.config.host,
            subscription.sub_port,
        ))?;
        Ok(DataSockets {
            generation,
            topic: subscription.topic.clone(),
            xpub,
            sub,
        })
    }

    /// Heartbeats the subscription until it is lost or the link shuts down.
    fn supervise(&mut self, topic: &str, generation: u64) -> Outcome {
        let subscribed_at = Instant::now();
        let mut data_connected = false;
        // The data connection came back within this subscription: Threat Bus may have
        // restarted (and forgotten us); a heartbeat decides before we say Ready again.
        let mut dropped = false;
        let mut confirm_before_ready = false;
        let mut warned_unconnected = false;
        let mut failures = 0u32;
        let mut next_heartbeat = Instant::now() + self.config.heartbeat_interval;
        loop {
            let wait = next_heartbeat.saturating_duration_since(Instant::now());
            match self.control.recv_timeout(wait) {
                Ok(Control::Shutdown) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Outcome::Shutdown
                }
                Ok(Control::Io(IoEvent::Xpub {
                    generation: g,
                    subscribed,
                })) => {
                    if g != generation {
                        continue;
                    }
                    data_connected = subscribed;
                    if subscribed && !dropped {
                        self.set_state(LinkState::Ready {
                            topic: topic.to_owned(),
                            generation,
                        });
                    } else if subscribed {
                        confirm_before_ready = true;
                        next_heartbeat = Instant::now();
                    } else {
                        // The TCP connection to Threat Bus's SUB went away: it stopped or
                        // restarts. Ask at once instead of waiting for the next heartbeat.
                        dropped = true;
                        confirm_before_ready = false;
                        self.set_down("Threat Bus dropped the data connection".to_owned());
                        next_heartbeat = Instant::now();
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    match self.manage.heartbeat(topic) {
                        Ok(true) => {
                            failures = 0;
                            if confirm_before_ready && data_connected {
                                confirm_before_ready = false;
                                self.set_state(LinkState::Ready {
                                    topic: topic.to_owned(),
                                    generation,
                                });
                            }
                            if !data_connected
                                && !warned_unconnected
                                && subscribed_at.elapsed() > DATA_CONNECT_WARNING
                            {
                                warned_unconnected = true;
                                tracing::warn!(
                                    host = self.config.host,
                                    "subscribed to Threat Bus, but it has not connected to our \
                                     publisher yet: is its sub port reachable on the manage host?"
                                );
                            }
                        }
                        Ok(false) => {
                            return Outcome::Lost {
                                reason: format!(
                                    "Threat Bus no longer knows subscription {topic} (it restarted)"
                                ),
                                topic_alive: false,
                            }
                        }
                        Err(ManageError::Cancelled { .. }) => return Outcome::Shutdown,
                        Err(e) => {
                            failures += 1;
                            // One lost reply on a busy Threat Bus (CPU-bound Python) is no
                            // reason to drop a working data path; two are, and so is one
                            // while the data connection is gone too.
                            if failures >= 2 || !data_connected {
                                return Outcome::Lost {
                                    reason: format!("heartbeat failed: {e}"),
                                    topic_alive: true,
                                };
                            }
                            tracing::debug!(error = %e, "heartbeat failed; retrying at once");
                            next_heartbeat = Instant::now();
                            continue;
                        }
                    }
                    next_heartbeat = Instant::now() + self.config.heartbeat_interval;
                }
            }
        }
    }

    /// Waits, or returns `true` if the link is shutting down.
    fn sleep(&self, duration: Duration) -> bool {
        let until = Instant::now() + duration;
        loop {
            match self
                .control
                .recv_timeout(until.saturating_duration_since(Instant::now()))
            {
                Ok(Control::Shutdown) | Err(mpsc::RecvTimeoutError::Disconnected) => return true,
                Ok(Control::Io(_)) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => return false,
            }
        }
    }

    /// The current subscription is over; remember its topic for an unsubscribe if Threat
    /// Bus may still hold it.
    fn forget_topic(&mut self, alive: bool) {
        if let Some(topic) = lock(&self.topic).take() {
            if alive {
                self.pending_unsubscribe.push(topic);
            }
        }
    }

    /// Unsubscribes old topics; keeps those that got no reply for the next time.
    fn unsubscribe_pending(&mut self) {
        let pending = std::mem::take(&mut self.pending_unsubscribe);
        for (i, topic) in pending.iter().enumerate() {
            match self.manage.unsubscribe(topic) {
                Ok(true) => tracing::info!(topic, "unsubscribed an old Threat Bus subscription"),
                Ok(false) => {
                    tracing::debug!(topic, "Threat Bus no longer knew an old subscription")
                }
                Err(e) => {
                    tracing::debug!(topic, error = %e, "unsubscribing an old subscription failed; will retry");
                    // Unreachable: the rest would time out as well.
                    self.pending_unsubscribe
                        .extend(pending[i..].iter().cloned());
                    return;
                }
            }
        }
    }

    fn set_state(&mut self, state: LinkState) {
        let changed = self.state.send_if_modified(|current| {
            if *current == state {
                false
            } else {
                *current = state.clone();
                true
            }
        });
        if !changed {
            return;
        }
        match &state {
            LinkState::Ready { topic, generation } => {
                self.last_logged_down = None;
                tracing::info!(topic, generation, "Threat Bus link ready");
            }
            LinkState::Connecting => tracing::debug!("Threat Bus link connecting"),
            LinkState::Down { reason } => {
                // One line per change of reason, not one per retry.
                if self.last_logged_down.as_deref() != Some(reason.as_str()) {
                    tracing::warn!(reason, "Threat Bus link down");
                    self.last_logged_down = Some(reason.clone());
                }
            }
        }
    }

    fn set_down(&mut self, reason: String) {
        self.set_state(LinkState::Down { reason });
    }

    /// Shutdown: data sockets, unsubscribe, threads.
    fn finish(mut self) {
        // Close the data sockets first: the XPUB's linger then runs during the unsubscribe.
        let _ = self.io.send(IoCommand::Shutdown {
            xpub_linger: SHUTDOWN_XPUB_LINGER,
        });
        let mut left_behind = None;
        let current = lock(&self.topic).take();
        let mut reachable = true;
        if let Some(topic) = current {
            match self.final_manage.unsubscribe(&topic) {
                Ok(known) => tracing::info!(topic, known, "unsubscribed from Threat Bus"),
                Err(e) => {
                    tracing::warn!(
                        topic, error = %e,
                        "could not unsubscribe from Threat Bus; the subscription stays until \
                         the next start (or a Threat Bus restart) removes it"
                    );
                    reachable = false;
                    left_behind = Some(topic);
                }
            }
        }
        if reachable {
            for topic in std::mem::take(&mut self.pending_unsubscribe) {
                if self.final_manage.unsubscribe(&topic).is_err() {
                    break;
                }
            }
        }
        if let Some(join) = self.io_join.take() {
            if join.join().is_err() {
                tracing::error!("the Threat Bus socket thread panicked");
            }
        }
        self.set_state(LinkState::Down {
            reason: "shut down".to_owned(),
        });
        let done = self.done.take();
        // Dropping the last sockets and the context waits for the XPUB's linger.
        drop(self);
        if let Some(done) = done {
            let _ = done.send(left_behind);
        }
    }
}
