//! Configuration: a YAML file plus environment overrides (SPEC §4), validated before
//! anything starts. Every error names the key, the env var and what was expected.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

mod error;
pub mod keys;
mod read;
mod source;
#[cfg(test)]
mod tests;

pub use error::ConfigError;
pub use read::DEFAULT_DATA_DIR;

pub use crate::store::damage::OnDamagedStore;
pub use source::EnvLookup;
use source::{FileValues, Sources};

/// The file read when neither `--config` nor `CONFIG_FILE` names one.
pub const DEFAULT_CONFIG_FILE: &str = "config.yml";
/// The environment variable naming the configuration file.
pub const CONFIG_FILE_ENV: &str = "CONFIG_FILE";

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
    /// Keys in the file that nothing reads (`section` or `section.key`), most likely typos;
    /// kept so the daemon can warn once logging is up.
    pub unknown_keys: Vec<String>,
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
    /// How often `pingConnector` carries the connector state to OpenCTI (pycti: 40 s).
    pub ping_interval: Duration,
    pub expose_metrics: bool,
    pub metrics_port: u16,
}

#[derive(Debug, Clone)]
pub struct ThreatBusConfig {
    pub zmq_host: String,
    pub zmq_port: u16,
    pub snapshot_days: u32,
    pub confirm_delivery: ConfirmDelivery,
    /// Snapshot answers: frames per second at most (`threatbus.snapshot_rate`).
    pub snapshot_rate: u32,
    /// Import indicators other Threat Bus apps publish into OpenCTI
    /// (`threatbus.import_indicators`; default on, as the original connector did).
    pub import_indicators: bool,
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
    /// What to do with a store sled cannot open or that lost items (`bridge.on_damaged_store`).
    pub on_damaged_store: OnDamagedStore,
    /// The largest stream event accepted; a larger one becomes a dead letter.
    pub max_event_bytes: usize,
    /// The longest wait between two probes of a peer that is down (OpenCTI, Threat Bus): it
    /// bounds how long the bridge takes to notice that the peer is back.
    pub probe_max: Duration,
    /// sled's page cache in MiB (`bridge.cache_mb`): most of the daemon's resident memory
    /// with a large backlog.
    pub cache_mb: u64,
    /// Free space on the data dir's filesystem below which the stream reader pauses
    /// (`bridge.min_free_mb`, in bytes here); see [`crate::store::disk_space`].
    pub min_free_bytes: u64,
}

/// Default of `bridge.probe_max_ms`. While a peer is down the bridge sends it one probe at
/// a time, and after this long at most it tries again: so a backlog starts draining within
/// 5 s of the peer's return, after an outage of any length, at the cost of one cheap
/// request (a refused connection, a 502) per 5 s while it is down.
pub const DEFAULT_PROBE_MAX: Duration = Duration::from_secs(5);

/// `bridge.min_free_mb` is in MiB.
pub const MB: u64 = 1024 * 1024;

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
            // Unattended deployments are the common case: a crash loop until someone deletes
            // the data directory loses more than moving the store aside and re-reading.
            on_damaged_store: OnDamagedStore::Rebuild,
            max_event_bytes: crate::opencti::stream::DEFAULT_MAX_EVENT_BYTES,
            probe_max: DEFAULT_PROBE_MAX,
            cache_mb: crate::store::DEFAULT_CACHE_MB,
            min_free_bytes: crate::store::disk_space::DEFAULT_MIN_FREE_MB * MB,
        }
    }
}

impl Config {
    /// Loads the configuration from `path`, else the file named by `CONFIG_FILE`, else
    /// `config.yml` in the working directory, then applies environment overrides.
    ///
    /// A file named explicitly must exist; the default one may be absent, for deployments
    /// configured by environment only.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        Config::load_with_env(path, &process_env)
    }

    /// [`Config::load`] with an injected environment.
    pub fn load_with_env(path: Option<&Path>, env: EnvLookup) -> Result<Config, ConfigError> {
        let file = read_config_file(path, env, Path::new(DEFAULT_CONFIG_FILE))?;
        Config::from_file(file.as_ref(), env)
    }

    /// Builds the configuration from YAML text (if any) and an environment lookup, without
    /// touching the file system or the process environment.
    pub fn from_sources(yaml: Option<&str>, env: EnvLookup) -> Result<Config, ConfigError> {
        let file = yaml
            .map(|text| FileValues::parse(Path::new("<yaml>"), text))
            .transpose()?;
        Config::from_file(file.as_ref(), env)
    }

    fn from_file(file: Option<&FileValues>, env: EnvLookup) -> Result<Config, ConfigError> {
        let src = Sources { file, env };
        Ok(Config {
            opencti: OpenCtiConfig::read(&src)?,
            connector: ConnectorConfig::read(&src)?,
            threatbus: ThreatBusConfig::read(&src)?,
            bridge: BridgeConfig::read(&src)?,
            unknown_keys: file.map(FileValues::unknown_keys).unwrap_or_default(),
        })
    }
}

/// Reads only `bridge.data_dir` (default `./data`), for maintenance commands that must work
/// on a host without the token. The file is located as by [`Config::load`].
pub fn load_data_dir(path: Option<&Path>) -> Result<PathBuf, ConfigError> {
    load_data_dir_with_env(path, &process_env)
}

/// [`load_data_dir`] with an injected environment.
pub fn load_data_dir_with_env(path: Option<&Path>, env: EnvLookup) -> Result<PathBuf, ConfigError> {
    let file = read_config_file(path, env, Path::new(DEFAULT_CONFIG_FILE))?;
    read::data_dir(&Sources {
        file: file.as_ref(),
        env,
    })
}

/// A variable that is not valid Unicode is passed on lossily rather than treated as unset,
/// so that it fails validation visibly instead of silently falling back to the file.
fn process_env(name: &str) -> Option<String> {
    std::env::var_os(name).map(|value| value.to_string_lossy().into_owned())
}

/// Finds and parses the configuration file; `None` when the default file does not exist.
fn read_config_file(
    path: Option<&Path>,
    env: EnvLookup,
    default: &Path,
) -> Result<Option<FileValues>, ConfigError> {
    let from_env = env(CONFIG_FILE_ENV)
        .filter(|p| !p.is_empty())
        .map(PathBuf::from);
    let explicit = path.map(Path::to_path_buf).or(from_env);
    let path = explicit.clone().unwrap_or_else(|| default.to_path_buf());
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return match explicit {
                Some(path) => Err(ConfigError::FileNotFound { path }),
                None => Ok(None),
            };
        }
        Err(source) => return Err(ConfigError::ReadFile { path, source }),
    };
    FileValues::parse(&path, &text).map(Some)
}
