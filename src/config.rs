//! Configuration: a YAML file plus environment overrides (SPEC §4), validated before
//! anything starts. Every error names the key, the env var and what was expected.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The OpenCTI API token. Its `Debug` and `Display` never show the value, so it cannot
/// leak through a log line or an error message by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    /// The value, for the one place that needs it: the `Authorization` header.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Debug,
    Info,
    Warn,
    Error,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfirmDelivery {
    /// The echo of an indicator on the bridge's own subscription acknowledges it.
    Echo,
    /// An indicator counts as delivered once written to a subscribed XPUB.
    None,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub opencti: OpenCtiConfig,
    pub connector: ConnectorConfig,
    pub threatbus: ThreatBusConfig,
    pub bridge: BridgeConfig,
}

#[derive(Debug, Clone)]
pub struct OpenCtiConfig {
    pub url: String,
    pub token: Secret,
    pub ssl_verify: bool,
}

#[derive(Debug, Clone)]
pub struct ConnectorConfig {
    pub id: uuid::Uuid,
    pub name: String,
    pub confidence_level: u8,
    pub log_level: LogLevel,
    pub log_format: LogFormat,
    pub entity_name: String,
    pub entity_description: String,
    pub forward_all_iocs: bool,
    pub live_stream_id: Option<String>,
    pub live_stream_listen_delete: bool,
    pub live_stream_no_dependencies: bool,
    pub live_stream_with_inferences: bool,
    pub live_stream_start_timestamp: Option<String>,
    pub live_stream_recover_iso_date: Option<String>,
    pub stream_timeout: Duration,
    pub expose_metrics: bool,
    pub metrics_port: u16,
}

#[derive(Debug, Clone)]
pub struct ThreatBusConfig {
    pub zmq_host: String,
    pub zmq_port: u16,
    pub snapshot_days: u32,
    pub confirm_delivery: ConfirmDelivery,
}

#[derive(Debug, Clone)]
pub struct BridgeConfig {
    pub data_dir: PathBuf,
    pub flush_interval: Duration,
    pub flush_max_items: usize,
    pub indicator_queue_limit: u64,
    pub sighting_queue_limit: u64,
    pub retry_initial: Duration,
    pub retry_max: Duration,
    pub retry_multiplier: f64,
    pub max_attempts: u32,
    pub inflight_window: usize,
    pub confirm_timeout: Duration,
    pub opencti_concurrency: usize,
}

impl BridgeConfig {
    pub fn with_data_dir(data_dir: impl AsRef<Path>) -> Self {
        BridgeConfig {
            data_dir: data_dir.as_ref().to_path_buf(),
            flush_interval: Duration::from_millis(10),
            flush_max_items: 1000,
            indicator_queue_limit: 100_000,
            sighting_queue_limit: 1_000_000,
            retry_initial: Duration::from_millis(500),
            retry_max: Duration::from_secs(60),
            retry_multiplier: 2.0,
            max_attempts: 5,
            inflight_window: 500,
            confirm_timeout: Duration::from_secs(10),
            opencti_concurrency: 4,
        }
    }
}

// TEMPORARY until the config module lands: minimal loaders.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Invalid(String),
}

impl Config {
    pub fn load(_path: Option<&Path>) -> Result<Config, ConfigError> {
        Err(ConfigError::Invalid("not implemented".into()))
    }
}

pub fn load_data_dir(_path: Option<&Path>) -> Result<PathBuf, ConfigError> {
    Ok(std::env::var_os("BRIDGE_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("./data")))
}
