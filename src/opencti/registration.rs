//! Connector registration (SPEC §3): `registerConnector` at start and `pingConnector` every
//! 40 s, so the bridge shows in OpenCTI's connector list. A task of its own: failures here
//! are logged and retried, and never hold up the data flow.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::graphql::{ConnectorRegistration, GraphqlClient};
use crate::admin::Status;
use crate::retry::{Backoff, RetryPolicy};
use crate::store::Store;

/// pycti pings every 40 s; OpenCTI shows a connector as inactive after a few missed pings.
pub const PING_INTERVAL: Duration = Duration::from_secs(40);

pub async fn run(
    client: Arc<GraphqlClient>,
    registration: ConnectorRegistration,
    store: Arc<Store>,
    retry: RetryPolicy,
    status: Arc<Status>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new(retry);
    loop {
        match client.register_connector(&registration).await {
            Ok(registered) => {
                tracing::info!(id = %registered.id, state = ?registered.connector_state, "connector registered in OpenCTI");
                status.set("registration", "registered");
                break;
            }
            Err(error) => {
                let delay = backoff.next_delay().max(if error.is_auth() {
                    PING_INTERVAL
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
    let mut ticks = tokio::time::interval(PING_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return,
            _ = ticks.tick() => {}
        }
        // Like pycti, the state is the stream position the connector would resume from.
        let state = store
            .position()
            .ok()
            .flatten()
            .map(|position| serde_json::json!({ "start_from": position }).to_string());
        match client.ping_connector(&registration.id, state).await {
            Ok(_) => status.set("registration", "registered"),
            Err(error) => {
                tracing::warn!(error = %error, "pinging OpenCTI failed (the data flow goes on)");
                status.set("registration", format!("ping failed: {error}"));
            }
        }
    }
}
