//! Builds each section of [`Config`] from the sources and enforces the rules of SPEC §4.

use std::path::PathBuf;
use std::time::Duration;

use uuid::{Uuid, Variant};

use super::error::ConfigError;
use super::keys::{self, Key};
use super::source::{invalid, quote, Sources};
use super::{BridgeConfig, ConfirmDelivery, ConnectorConfig, LogFormat, LogLevel, OnDamagedStore};
use super::{OpenCtiConfig, Secret, ThreatBusConfig};

/// Default of `bridge.data_dir`; the container image sets `/data`.
pub const DEFAULT_DATA_DIR: &str = "./data";

/// Upper bound of every duration key. Not a policy: it keeps `Instant + duration`
/// arithmetic elsewhere from overflowing on an absurd value.
const MAX_DURATION_S: u64 = 365 * 24 * 3600;
const MAX_DURATION_MS: u64 = MAX_DURATION_S * 1000;
const AT_LEAST_ONE: std::ops::RangeInclusive<u64> = 1..=u64::MAX;
const PORT: std::ops::RangeInclusive<u64> = 1..=65_535;

impl OpenCtiConfig {
    pub(super) fn read(src: &Sources) -> Result<Self, ConfigError> {
        Ok(OpenCtiConfig {
            url: opencti_url(src)?,
            token: Secret::new(src.required_text(keys::OPENCTI_TOKEN)?),
            ssl_verify: src.boolean(keys::OPENCTI_SSL_VERIFY, true)?,
        })
    }
}

fn opencti_url(src: &Sources) -> Result<String, ConfigError> {
    let key = keys::OPENCTI_URL;
    let raw = src.required_text(key)?;
    // Paths like `/graphql` are appended to it; a trailing slash would double up.
    let url = raw.trim().trim_end_matches('/');
    let lower = url.to_ascii_lowercase();
    let rest = ["http://", "https://"]
        .iter()
        .find_map(|scheme| lower.strip_prefix(scheme));
    match rest {
        Some(host) if !host.is_empty() => Ok(url.to_string()),
        _ => Err(invalid(key, "an http:// or https:// URL", quote(&raw))),
    }
}

/// OpenCTI 5.12 and 6.0 declare `OrganizationAddInput.name` as `name_String_NotNull_minLength_2`:
/// a shorter name would be refused at the first sighting, long after start.
fn entity_name(src: &Sources) -> Result<String, ConfigError> {
    let key = keys::CONNECTOR_ENTITY_NAME;
    let name = src.required_text(key)?;
    if name.trim().chars().count() < 2 {
        return Err(invalid(
            key,
            "an organization name of at least 2 characters",
            quote(&name),
        ));
    }
    Ok(name)
}

impl ConnectorConfig {
    pub(super) fn read(src: &Sources) -> Result<Self, ConfigError> {
        let id = connector_id(src)?;
        expect_word(src, keys::CONNECTOR_TYPE, "STREAM")?;
        let name = src.required_text(keys::CONNECTOR_NAME)?;
        expect_word(src, keys::CONNECTOR_SCOPE, "threatbus")?;
        Ok(ConnectorConfig {
            id,
            name,
            confidence_level: src.integer(keys::CONNECTOR_CONFIDENCE_LEVEL, None, 0..=100)?,
            log_level: log_level(src)?,
            log_format: log_format(src)?,
            entity_name: entity_name(src)?,
            entity_description: src.required_text(keys::CONNECTOR_ENTITY_DESCRIPTION)?,
            forward_all_iocs: src.boolean(keys::CONNECTOR_FORWARD_ALL_IOCS, false)?,
            live_stream_id: src.optional_text(keys::CONNECTOR_LIVE_STREAM_ID)?,
            live_stream_listen_delete: src
                .boolean(keys::CONNECTOR_LIVE_STREAM_LISTEN_DELETE, true)?,
            live_stream_no_dependencies: src
                .boolean(keys::CONNECTOR_LIVE_STREAM_NO_DEPENDENCIES, true)?,
            live_stream_with_inferences: src
                .boolean(keys::CONNECTOR_LIVE_STREAM_WITH_INFERENCES, false)?,
            live_stream_start_timestamp: src
                .optional_text(keys::CONNECTOR_LIVE_STREAM_START_TIMESTAMP)?,
            live_stream_recover_iso_date: src
                .optional_text(keys::CONNECTOR_LIVE_STREAM_RECOVER_ISO_DATE)?,
            stream_timeout: Duration::from_secs(src.integer(
                keys::CONNECTOR_STREAM_TIMEOUT_S,
                Some(45),
                1..=MAX_DURATION_S,
            )?),
            ping_interval: Duration::from_secs(src.integer(
                keys::CONNECTOR_PING_INTERVAL_S,
                Some(40),
                1..=MAX_DURATION_S,
            )?),
            expose_metrics: src.boolean(keys::CONNECTOR_EXPOSE_METRICS, false)?,
            metrics_port: src.integer(keys::CONNECTOR_METRICS_PORT, Some(9095), PORT)?,
        })
    }
}

/// OpenCTI registers the connector under this id, so it must be a real random UUID, as
/// pycti's documentation demands; a v1 or nil UUID is a copy-paste mistake.
fn connector_id(src: &Sources) -> Result<Uuid, ConfigError> {
    const EXPECTED: &str = "a UUID v4";
    let key = keys::CONNECTOR_ID;
    let raw = src.required_text(key)?;
    match Uuid::parse_str(raw.trim()) {
        Ok(id) if id.get_version_num() == 4 && id.get_variant() == Variant::RFC4122 => Ok(id),
        Ok(id) => Err(invalid(
            key,
            EXPECTED,
            format!("{} (a UUID v{})", quote(&raw), id.get_version_num()),
        )),
        Err(_) => Err(invalid(key, EXPECTED, quote(&raw))),
    }
}

/// Keys that only exist so that configs of the original connector load unchanged: they must
/// hold the one value this bridge implements and are not stored.
fn expect_word(src: &Sources, key: Key, word: &str) -> Result<(), ConfigError> {
    src.choice(key, None, &[(word, ())], &quote(word))
}

fn log_level(src: &Sources) -> Result<LogLevel, ConfigError> {
    let options = [
        ("debug", LogLevel::Debug),
        ("info", LogLevel::Info),
        ("warn", LogLevel::Warn),
        ("warning", LogLevel::Warn),
        ("error", LogLevel::Error),
    ];
    let expected = "one of debug, info, warn, error";
    src.choice(keys::CONNECTOR_LOG_LEVEL, None, &options, expected)
}

fn log_format(src: &Sources) -> Result<LogFormat, ConfigError> {
    let options = [("text", LogFormat::Text), ("json", LogFormat::Json)];
    let default = Some(LogFormat::Text);
    src.choice(
        keys::CONNECTOR_LOG_FORMAT,
        default,
        &options,
        "text or json",
    )
}

impl ThreatBusConfig {
    pub(super) fn read(src: &Sources) -> Result<Self, ConfigError> {
        let options = [
            ("echo", ConfirmDelivery::Echo),
            ("none", ConfirmDelivery::None),
        ];
        Ok(ThreatBusConfig {
            zmq_host: src
                .required_text(keys::THREATBUS_ZMQ_HOST)?
                .trim()
                .to_string(),
            zmq_port: src.integer(keys::THREATBUS_ZMQ_PORT, None, PORT)?,
            snapshot_days: src.integer(
                keys::THREATBUS_SNAPSHOT,
                Some(0),
                0..=u64::from(u32::MAX),
            )?,
            confirm_delivery: src.choice(
                keys::THREATBUS_CONFIRM_DELIVERY,
                Some(ConfirmDelivery::Echo),
                &options,
                "echo or none",
            )?,
            snapshot_rate: src.integer(
                keys::THREATBUS_SNAPSHOT_RATE,
                Some(DEFAULT_SNAPSHOT_RATE),
                1..=1_000_000,
            )?,
            import_indicators: src.boolean(keys::THREATBUS_IMPORT_INDICATORS, true)?,
        })
    }
}

/// Snapshot frames per second: Threat Bus relays ~700 messages/s on a 2-core host
/// (`threatbus/README.md` §7), so 400/s answers 20,000 indicators in under a minute and
/// leaves room for live forwarding at the same time.
pub const DEFAULT_SNAPSHOT_RATE: u32 = 400;

/// `bridge.max_event_bytes`: at least 4 KiB, or OpenCTI's own `connected` and heartbeat
/// events and every ordinary indicator would be refused; at most 1 GiB, beyond which the
/// limit no longer bounds the memory of a small container.
/// 1 TiB: anything larger is a typo (a byte count given as MiB).
const MAX_MIN_FREE_MB: u64 = 1 << 20;
const MAX_EVENT_BYTES_RANGE: std::ops::RangeInclusive<u64> = 4096..=(1 << 30);

/// `bridge.cache_mb`: sled needs some cache to work at all; above 1 TiB the value is a
/// typo, and the bound keeps the conversion to bytes from overflowing.
const CACHE_MB_RANGE: std::ops::RangeInclusive<u64> = 1..=(1 << 20);

/// `bridge.data_dir` alone, for commands that must run without the rest of the config.
pub(super) fn data_dir(src: &Sources) -> Result<PathBuf, ConfigError> {
    let dir = src.optional_text(keys::BRIDGE_DATA_DIR)?;
    Ok(PathBuf::from(dir.as_deref().unwrap_or(DEFAULT_DATA_DIR)))
}

fn millis(src: &Sources, key: Key, default: Duration) -> Result<Duration, ConfigError> {
    let default = u64::try_from(default.as_millis()).unwrap_or(u64::MAX);
    let ms = src.integer(key, Some(default), 1..=MAX_DURATION_MS)?;
    Ok(Duration::from_millis(ms))
}

impl BridgeConfig {
    pub(super) fn read(src: &Sources) -> Result<Self, ConfigError> {
        let d = BridgeConfig::with_data_dir(data_dir(src)?);
        let (retry_initial, retry_max) = retry_bounds(src, &d)?;
        Ok(BridgeConfig {
            flush_interval: millis(src, keys::BRIDGE_FLUSH_INTERVAL_MS, d.flush_interval)?,
            flush_max_items: src.integer(
                keys::BRIDGE_FLUSH_MAX_ITEMS,
                Some(d.flush_max_items),
                AT_LEAST_ONE,
            )?,
            indicator_queue_limit: src.integer(
                keys::BRIDGE_INDICATOR_QUEUE_LIMIT,
                Some(d.indicator_queue_limit),
                AT_LEAST_ONE,
            )?,
            sighting_queue_limit: src.integer(
                keys::BRIDGE_SIGHTING_QUEUE_LIMIT,
                Some(d.sighting_queue_limit),
                AT_LEAST_ONE,
            )?,
            retry_initial,
            retry_max,
            retry_multiplier: src.float(keys::BRIDGE_RETRY_MULTIPLIER, d.retry_multiplier, 1.0)?,
            max_attempts: src.integer(
                keys::BRIDGE_MAX_ATTEMPTS,
                Some(d.max_attempts),
                1..=u64::from(u32::MAX),
            )?,
            inflight_window: src.integer(
                keys::BRIDGE_INFLIGHT_WINDOW,
                Some(d.inflight_window),
                AT_LEAST_ONE,
            )?,
            confirm_timeout: millis(src, keys::BRIDGE_CONFIRM_TIMEOUT_MS, d.confirm_timeout)?,
            opencti_concurrency: src.integer(
                keys::BRIDGE_OPENCTI_CONCURRENCY,
                Some(d.opencti_concurrency),
                1..=256,
            )?,
            on_damaged_store: src.choice(
                keys::BRIDGE_ON_DAMAGED_STORE,
                Some(d.on_damaged_store),
                &[
                    ("rebuild", OnDamagedStore::Rebuild),
                    ("stop", OnDamagedStore::Stop),
                ],
                "rebuild or stop",
            )?,
            max_event_bytes: src.integer(
                keys::BRIDGE_MAX_EVENT_BYTES,
                Some(d.max_event_bytes),
                MAX_EVENT_BYTES_RANGE,
            )?,
            probe_max: millis(src, keys::BRIDGE_PROBE_MAX_MS, d.probe_max)?,
            cache_mb: src.integer(keys::BRIDGE_CACHE_MB, Some(d.cache_mb), CACHE_MB_RANGE)?,
            // 0 turns the watermark off (the reader then writes until sled fails).
            min_free_bytes: src.integer::<u64>(
                keys::BRIDGE_MIN_FREE_MB,
                Some(d.min_free_bytes / super::MB),
                0..=MAX_MIN_FREE_MB,
            )? * super::MB,
            data_dir: d.data_dir,
        })
    }
}

fn retry_bounds(src: &Sources, d: &BridgeConfig) -> Result<(Duration, Duration), ConfigError> {
    let initial = millis(src, keys::BRIDGE_RETRY_INITIAL_MS, d.retry_initial)?;
    let max = millis(src, keys::BRIDGE_RETRY_MAX_MS, d.retry_max)?;
    if max < initial {
        let expected = format!(
            "an integer >= {} (the value of {})",
            initial.as_millis(),
            keys::BRIDGE_RETRY_INITIAL_MS.path
        );
        return Err(invalid(
            keys::BRIDGE_RETRY_MAX_MS,
            expected,
            max.as_millis().to_string(),
        ));
    }
    Ok((initial, max))
}
