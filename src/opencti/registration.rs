//! Connector registration (SPEC §3): `registerConnector` at start, then `pingConnector`
//! every `connector.ping_interval_s` (40 s, as pycti), so the bridge shows in OpenCTI's
//! connector list with its state. A task of its own: failures here are logged and
//! retried, and never hold up the data flow.
//!
//! Every ping carries the stream reader's state ([`super::connector_state`]); when the
//! answer shows the state was reset or changed in OpenCTI, the reader is asked to restart
//! the stream from there (it alone decides whether it may: the store is the source of
//! truth). A failed ping changes nothing.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::connector_state::{classify, ConnectorState, PingSide, PingVerdict, StateRequest};
use super::graphql::{ConnectorRegistration, GraphqlClient};
use crate::admin::Status;
use crate::retry::{Backoff, RetryPolicy};

pub async fn run(
    client: Arc<GraphqlClient>,
    registration: ConnectorRegistration,
    state: PingSide,
    interval: Duration,
    retry: RetryPolicy,
    status: Arc<Status>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new(retry);
    loop {
        match client.register_connector(&registration).await {
            Ok(registered) => {
                // Only logged: the first ping tells a reset made while the bridge was away
                // (OpenCTI keeps its reset flag until then), and a state that OpenCTI holds
                // but the store does not (a new store, a connector id taken over from the
                // Python connector) must not move the stream (the store is the truth).
                tracing::info!(id = %registered.id, state = ?registered.connector_state, "connector registered in OpenCTI");
                status.set("registration", "registered");
                break;
            }
            Err(error) => {
                let delay = backoff.next_delay().max(if error.is_auth() {
                    interval
                } else {
                    Duration::ZERO
                });
                tracing::warn!(error = %error, retry_s = delay.as_secs_f64(), "registering the connector in OpenCTI failed (the data flow goes on)");
                status.set("registration", format!("failed: {error}"));
                tokio::select! {
                    _ = shutdown.wait_for(|s| *s) => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
    // Like pycti, ping at once, then every interval.
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return,
            _ = ticks.tick() => {}
        }
        let sent = state.state.borrow().clone();
        match client
            .ping_connector(&registration.id, Some(sent.to_json()))
            .await
        {
            Ok(answered) => {
                if failing {
                    tracing::info!("pinging OpenCTI works again");
                    failing = false;
                }
                status.set("registration", "registered");
                act_on(classify(&sent, answered.as_deref()), &state, &sent);
            }
            Err(error) => {
                // Nothing is known about the state then: it stays as it is.
                tracing::warn!(error = %error, "pinging OpenCTI failed (the data flow and the stream position are not affected)");
                status.set("registration", format!("ping failed: {error}"));
                failing = true;
            }
        }
    }
}

/// Hands what the answer asks for to the stream reader, which applies it (or not).
fn act_on(verdict: PingVerdict, state: &PingSide, sent: &ConnectorState) {
    match verdict {
        PingVerdict::Unchanged => {}
        PingVerdict::Reset => {
            tracing::warn!(
                sent = %sent.to_json(),
                "the connector state was reset in OpenCTI: re-reading the stream from the first-start position \
                 (a full replay of the current state); queued items stay queued"
            );
            state.requests.send_replace(Some(StateRequest::Reset));
        }
        PingVerdict::Changed(platform) => {
            tracing::warn!(
                sent = %sent.to_json(),
                platform = %platform.to_json(),
                "the connector state in OpenCTI differs from the bridge's: asking the stream reader to resume from it"
            );
            state
                .requests
                .send_replace(Some(StateRequest::Resume(platform)));
        }
        PingVerdict::Unreadable(error) => {
            tracing::warn!(error = %error, sent = %sent.to_json(), "OpenCTI answered a connector state the bridge cannot use: ignored (the stream goes on from the stored position)");
        }
    }
}
