//! The data-socket thread: owns the XPUB (to Threat Bus's `sub` port) and the SUB (on its
//! `pub` port), and talks to the rest of the link through channels.
//!
//! ZeroMQ sockets are not thread-safe, so one std thread owns both and blocks in
//! `zmq_poll` on them plus a wake-up datagram socket. Commands (publish, connect,
//! disconnect, shutdown) arrive on a std channel; the sender pokes the wake socket so the
//! poll returns at once. A flag avoids a syscall per command while a wake-up is pending,
//! which keeps a publish at a channel send in the common case (throughput target: well
//! over 20,000 frames/s, while Threat Bus itself relays ~700/s).
//!
//! What arrives on the SUB goes straight into an unbounded tokio channel: the reader never
//! waits for the consumer. Together with RCVHWM=0 on the SUB this means Threat Bus's PUB
//! never drops messages for us because we were slow (README §4, "High-water marks").

use std::collections::BTreeSet;
use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc as tokio_mpsc, oneshot};

use super::{Incoming, LinkError};

/// How many SUB messages are read before the thread looks at its commands again.
const READ_BATCH: usize = 4096;
/// The poll timeout: only a safety net, everything that matters wakes the poll.
const POLL_TIMEOUT_MS: i64 = 1000;
/// After reading the SUB, it is left alone this long: what arrives meanwhile waits in
/// ZeroMQ's queue and is handed on as one burst, one wake-up of the runtime instead of one
/// per message. At a steady 500 indicators/s each echo came alone, and waking for each was
/// a large part of the bridge's CPU per indicator. Nothing waits on it that a person sees:
/// echoes only confirm deliveries (after seconds), a sighting then waits for its
/// group-commit flush (`flush_interval_ms`, 10 by default) anyway. Publishing is not held.
const SUB_HOLD: Duration = Duration::from_millis(10);
/// The topic the bridge publishes on; its XPUB is "ready" once Threat Bus subscribed a
/// prefix of it (in practice `stix2/`).
const INDICATOR_TOPIC: &[u8] = b"stix2/indicator";

/// Wakes the socket thread out of `zmq_poll`.
pub(crate) struct Waker {
    socket: UnixDatagram,
    /// Set while a wake-up datagram is (or is about to be) queued, so that a burst of
    /// commands costs one syscall, not one each.
    pending: AtomicBool,
}

impl Waker {
    fn wake(&self) {
        if !self.pending.swap(true, Ordering::SeqCst) {
            match self.socket.send(&[1]) {
                // WouldBlock: the buffer is full of wake-ups already; the thread will run.
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => tracing::error!(error = %e, "waking the Threat Bus socket thread failed"),
            }
        }
    }
}

/// The data sockets of one subscription, created and connected by the supervisor and
/// handed to the socket thread.
pub(crate) struct DataSockets {
    pub generation: u64,
    pub topic: String,
    pub xpub: zmq::Socket,
    pub sub: zmq::Socket,
}

pub(crate) enum IoCommand {
    /// Write these frames if the XPUB currently has Threat Bus's subscription.
    Publish {
        frames: Vec<String>,
        reply: oneshot::Sender<Result<u64, LinkError>>,
    },
    /// Replace the data sockets (after a (re)subscription).
    Connect(DataSockets),
    /// Close the data sockets (the subscription is gone).
    Disconnect,
    /// Close the data sockets, the XPUB with this linger, and end the thread.
    Shutdown { xpub_linger: Duration },
}

/// What the socket thread reports to the supervisor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IoEvent {
    /// Threat Bus's subscription on the XPUB of `generation` appeared or went away.
    Xpub { generation: u64, subscribed: bool },
}

/// The sending side of the socket thread's command channel.
#[derive(Clone)]
pub(crate) struct IoSender {
    tx: mpsc::Sender<IoCommand>,
    waker: Arc<Waker>,
}

impl IoSender {
    /// Queues a command; `Err` gives it back if the socket thread is gone.
    pub fn send(&self, command: IoCommand) -> Result<(), IoCommand> {
        self.tx.send(command).map_err(|e| e.0)?;
        self.waker.wake();
        Ok(())
    }
}

/// The socket thread's state.
pub(crate) struct IoThread {
    commands: mpsc::Receiver<IoCommand>,
    wake: UnixDatagram,
    waker: Arc<Waker>,
    incoming: tokio_mpsc::UnboundedSender<Incoming>,
    notify: Box<dyn Fn(IoEvent) + Send>,
    active: Option<Active>,
    consumer_gone_logged: bool,
}

/// The current data sockets and what Threat Bus subscribed on the XPUB.
struct Active {
    sockets: DataSockets,
    /// Subscription prefixes Threat Bus's SUB sent us (`\x01<prefix>` adds, `\x00<prefix>`
    /// removes). The XPUB drops every frame that matches none of them, silently: this set
    /// is what makes "written" mean "handed to Threat Bus's connection".
    subscriptions: BTreeSet<Vec<u8>>,
    ready: bool,
}

impl Active {
    fn accepts(&self, frame: &[u8]) -> bool {
        self.subscriptions.iter().any(|p| frame.starts_with(p))
    }
}

/// Creates the channel pair and the thread's state (not yet running).
pub(crate) fn new(
    incoming: tokio_mpsc::UnboundedSender<Incoming>,
    notify: Box<dyn Fn(IoEvent) + Send>,
) -> std::io::Result<(IoSender, IoThread)> {
    let (wake_tx, wake_rx) = UnixDatagram::pair()?;
    wake_tx.set_nonblocking(true)?;
    wake_rx.set_nonblocking(true)?;
    let waker = Arc::new(Waker {
        socket: wake_tx,
        pending: AtomicBool::new(false),
    });
    let (tx, rx) = mpsc::channel();
    Ok((
        IoSender {
            tx,
            waker: Arc::clone(&waker),
        },
        IoThread {
            commands: rx,
            wake: wake_rx,
            waker,
            incoming,
            notify,
            active: None,
            consumer_gone_logged: false,
        },
    ))
}

enum Flow {
    Continue,
    Stop,
}

/// What one poll found readable.
struct Readable {
    wake: bool,
    xpub: bool,
    sub: bool,
}

impl IoThread {
    pub fn run(mut self) {
        // Until when the SUB is left out of the poll (see `SUB_HOLD`).
        let mut sub_held_until: Option<Instant> = None;
        loop {
            let hold = sub_held_until
                .map(|until| until.saturating_duration_since(Instant::now()))
                .filter(|left| !left.is_zero());
            let readable = match self.poll(hold) {
                Ok(r) => r,
                Err(e) => {
                    // EINTR and the like: nothing to do but poll again (after a breath,
                    // in case the error persists).
                    tracing::debug!(error = %e, "zmq_poll failed");
                    std::thread::sleep(Duration::from_millis(10));
                    Readable {
                        wake: true,
                        xpub: true,
                        sub: true,
                    }
                }
            };
            if readable.wake {
                self.drain_wake();
            }
            // Subscription frames first, so a publish below sees the freshest state. Only
            // when there are some: every ZeroMQ call costs a syscall or two.
            if readable.xpub {
                self.read_xpub();
            }
            if let Flow::Stop = self.drain_commands() {
                return;
            }
            if readable.sub {
                let read = self.read_sub(READ_BATCH);
                sub_held_until = (read > 0).then(|| Instant::now() + SUB_HOLD);
            } else if hold.is_none() {
                sub_held_until = None;
            }
        }
    }

    /// Waits for the wake socket, the XPUB and (unless `sub_hold` is left of its hold) the
    /// SUB; returns which of them are readable.
    fn poll(&self, sub_hold: Option<Duration>) -> zmq::Result<Readable> {
        let mut items = vec![zmq::PollItem::from_fd(self.wake.as_raw_fd(), zmq::POLLIN)];
        let mut timeout = POLL_TIMEOUT_MS;
        if let Some(active) = &self.active {
            items.push(active.sockets.xpub.as_poll_item(zmq::POLLIN));
            match sub_hold {
                // Rounded up: never a busy loop on a hold under a millisecond.
                Some(hold) => timeout = (hold.as_micros().div_ceil(1000) as i64).max(1),
                None => items.push(active.sockets.sub.as_poll_item(zmq::POLLIN)),
            }
        }
        zmq::poll(&mut items, timeout)?;
        Ok(Readable {
            wake: items[0].is_readable(),
            xpub: items.get(1).is_some_and(zmq::PollItem::is_readable),
            sub: items.get(2).is_some_and(zmq::PollItem::is_readable),
        })
    }

    fn drain_wake(&self) {
        // Read the datagrams first, then clear the flag, then (in drain_commands) read the
        // commands. A sender that still found the flag set queued its command before this
        // point: drain_commands sees it. One that finds it cleared sends a new datagram.
        // (The other order loses wake-ups: a datagram read after the flag was cleared
        // leaves the flag set with nobody left to wake us.)
        let mut buf = [0u8; 64];
        while self.wake.recv(&mut buf).is_ok() {}
        self.waker.pending.store(false, Ordering::SeqCst);
    }

    fn drain_commands(&mut self) -> Flow {
        loop {
            match self.commands.try_recv() {
                Ok(IoCommand::Publish { frames, reply }) => {
                    let result = self.publish(frames);
                    // The caller may have stopped waiting; nothing to do then.
                    let _ = reply.send(result);
                }
                Ok(IoCommand::Connect(sockets)) => {
                    self.close(Duration::ZERO);
                    self.active = Some(Active {
                        sockets,
                        subscriptions: BTreeSet::new(),
                        ready: false,
                    });
                }
                Ok(IoCommand::Disconnect) => self.close(Duration::ZERO),
                Ok(IoCommand::Shutdown { xpub_linger }) => {
                    self.close(xpub_linger);
                    return Flow::Stop;
                }
                Err(mpsc::TryRecvError::Empty) => return Flow::Continue,
                Err(mpsc::TryRecvError::Disconnected) => {
                    self.close(Duration::ZERO);
                    return Flow::Stop;
                }
            }
        }
    }

    /// Writes all frames, or none if the XPUB lacks a matching subscription from Threat
    /// Bus (slow joiner: a frame written before it arrived, or after Threat Bus went away,
    /// is dropped by ZeroMQ without a trace).
    fn publish(&mut self, frames: Vec<String>) -> Result<u64, LinkError> {
        let Some(active) = &self.active else {
            return Err(LinkError::NotReady);
        };
        if !active.ready || !frames.iter().all(|f| active.accepts(f.as_bytes())) {
            return Err(LinkError::NotReady);
        }
        for frame in frames {
            // One frame per message, never multipart (README §4: a 2-frame message makes
            // Threat Bus re-relay the previous message). SNDHWM=0 on the XPUB, so this
            // queues instead of dropping when Threat Bus reads slower than we write;
            // Vec<u8> into a zmq::Message does not copy.
            active
                .sockets
                .xpub
                .send(frame.into_bytes(), zmq::DONTWAIT)
                .map_err(LinkError::Send)?;
        }
        Ok(active.sockets.generation)
    }

    /// Reads Threat Bus's (un)subscription frames from the XPUB.
    fn read_xpub(&mut self) {
        let Some(active) = &mut self.active else {
            return;
        };
        let was_ready = active.ready;
        loop {
            match active.sockets.xpub.recv_bytes(zmq::DONTWAIT) {
                Ok(frame) => match frame.split_first() {
                    Some((1, prefix)) => {
                        tracing::debug!(prefix = %String::from_utf8_lossy(prefix), "Threat Bus subscribed on our XPUB");
                        active.subscriptions.insert(prefix.to_vec());
                    }
                    Some((0, prefix)) => {
                        tracing::debug!(prefix = %String::from_utf8_lossy(prefix), "Threat Bus unsubscribed on our XPUB");
                        active.subscriptions.remove(prefix);
                    }
                    _ => tracing::debug!(len = frame.len(), "unexpected frame on the XPUB"),
                },
                Err(zmq::Error::EAGAIN) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "reading the XPUB failed");
                    break;
                }
            }
        }
        active.ready = active.accepts(INDICATOR_TOPIC);
        if active.ready != was_ready {
            (self.notify)(IoEvent::Xpub {
                generation: active.sockets.generation,
                subscribed: active.ready,
            });
        }
    }

    /// Reads up to `limit` messages from the SUB into the incoming channel; returns how
    /// many it read.
    fn read_sub(&mut self, limit: usize) -> usize {
        let Some(active) = &self.active else {
            return 0;
        };
        let mut read = 0;
        while read < limit {
            match active.sockets.sub.recv_bytes(zmq::DONTWAIT) {
                Ok(frame) => {
                    read += 1;
                    let message = split_frame(&active.sockets.topic, &frame);
                    if self.incoming.send(message).is_err() && !self.consumer_gone_logged {
                        self.consumer_gone_logged = true;
                        tracing::warn!("the Threat Bus consumer is gone; dropping what arrives");
                    }
                }
                Err(zmq::Error::EAGAIN) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "reading the SUB failed");
                    break;
                }
            }
        }
        read
    }

    /// Closes the data sockets, first handing on what the SUB already holds (it was
    /// received from Threat Bus, which will not send it again).
    fn close(&mut self, xpub_linger: Duration) {
        self.read_sub(usize::MAX);
        if let Some(active) = self.active.take() {
            let linger = i32::try_from(xpub_linger.as_millis()).unwrap_or(i32::MAX);
            // LINGER: what is still queued on the XPUB may go out for that long (the
            // context's termination waits for it); 0 on a teardown, where Threat Bus is
            // gone or forgot us and the echo timeout re-sends anyway.
            if let Err(e) = active.sockets.xpub.set_linger(linger) {
                tracing::debug!(error = %e, "setting the XPUB linger failed");
            }
            if let Err(e) = active.sockets.sub.set_linger(0) {
                tracing::debug!(error = %e, "setting the SUB linger failed");
            }
            if active.ready {
                (self.notify)(IoEvent::Xpub {
                    generation: active.sockets.generation,
                    subscribed: false,
                });
            }
        }
    }
}

/// Splits one frame from Threat Bus's PUB: `"<p2p_topic><suffix> <json>"`, split at the
/// first space (README §4).
pub(crate) fn split_frame(p2p_topic: &str, frame: &[u8]) -> Incoming {
    let (head, body) = match frame.iter().position(|b| *b == b' ') {
        Some(i) => (&frame[..i], &frame[i + 1..]),
        None => (frame, &[][..]),
    };
    let head = String::from_utf8_lossy(head);
    // Threat Bus escapes non-ASCII (`\uXXXX`), so the body is ASCII; lossy just in case.
    let body = String::from_utf8_lossy(body).into_owned();
    let suffix = head.strip_prefix(p2p_topic).unwrap_or(&head);
    match suffix {
        "indicator" => Incoming::Indicator(body),
        "sighting" => Incoming::Sighting(body),
        "snapshotrequest" => Incoming::SnapshotRequest(body),
        other => Incoming::Unknown {
            suffix: other.to_owned(),
            body,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOPIC: &str = "hkonisxprdopcohvaoyebgycuirqckhj";

    /// Round trips through the command channel never wait for the poll timeout (a lost
    /// wake-up would cost up to a second): 4 threads × 5,000 sequential publishes, which
    /// answer NotReady at once as no sockets are connected.
    #[test]
    fn wake_ups_are_never_lost() {
        let (incoming, _rx) = tokio_mpsc::unbounded_channel();
        let (sender, thread) = new(incoming, Box::new(|_| {})).unwrap();
        let io = std::thread::spawn(move || thread.run());
        let workers: Vec<_> = (0..4)
            .map(|_| {
                let sender = sender.clone();
                std::thread::spawn(move || {
                    for _ in 0..5_000 {
                        let started = std::time::Instant::now();
                        let (reply, result) = oneshot::channel();
                        let command = IoCommand::Publish {
                            frames: vec!["stix2/indicator {}".into()],
                            reply,
                        };
                        assert!(sender.send(command).is_ok());
                        let reply = result.blocking_recv();
                        assert!(matches!(reply, Ok(Err(LinkError::NotReady))));
                        let took = started.elapsed();
                        assert!(
                            took < Duration::from_millis(500),
                            "a round trip took {took:?}"
                        );
                    }
                })
            })
            .collect();
        for worker in workers {
            worker.join().unwrap();
        }
        let shutdown = IoCommand::Shutdown {
            xpub_linger: Duration::ZERO,
        };
        assert!(sender.send(shutdown).is_ok());
        io.join().unwrap();
    }

    #[test]
    fn frames_split_by_suffix_at_the_first_space() {
        assert_eq!(
            split_frame(
                TOPIC,
                format!("{TOPIC}indicator {{\"a\": \"b c\"}}").as_bytes()
            ),
            Incoming::Indicator("{\"a\": \"b c\"}".into())
        );
        assert_eq!(
            split_frame(TOPIC, format!("{TOPIC}sighting {{}}").as_bytes()),
            Incoming::Sighting("{}".into())
        );
        assert_eq!(
            split_frame(TOPIC, format!("{TOPIC}snapshotrequest {{}}").as_bytes()),
            Incoming::SnapshotRequest("{}".into())
        );
        assert_eq!(
            split_frame(TOPIC, format!("{TOPIC}whatever x").as_bytes()),
            Incoming::Unknown {
                suffix: "whatever".into(),
                body: "x".into()
            }
        );
        assert_eq!(
            split_frame(TOPIC, format!("{TOPIC}indicator").as_bytes()),
            Incoming::Indicator(String::new())
        );
        assert_eq!(
            split_frame(TOPIC, b"other {}"),
            Incoming::Unknown {
                suffix: "other".into(),
                body: "{}".into()
            }
        );
    }
}
