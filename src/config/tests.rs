use std::path::Path;
use std::time::Duration;

use super::keys::{self, Key};
use super::*;

const TOKEN: &str = "tok-7c1d0e55-SECRET";
const UUID_V4: &str = "6f0c3a52-4c1e-4b7a-9f1e-2d3c4b5a6978";
const UUID_V1: &str = "c232ab00-9414-11ec-b3c8-9f6bdeced846";
const UUID_V3: &str = "6fa459ea-ee8a-3ca4-894e-db77e160355e";

/// Every required key with a valid value, as YAML text.
const REQUIRED: &[(Key, &str)] = &[
    (keys::OPENCTI_URL, "http://opencti:8080"),
    (keys::OPENCTI_TOKEN, TOKEN),
    (keys::CONNECTOR_ID, UUID_V4),
    (keys::CONNECTOR_TYPE, "STREAM"),
    (keys::CONNECTOR_NAME, "Threat Bus"),
    (keys::CONNECTOR_SCOPE, "threatbus"),
    (keys::CONNECTOR_CONFIDENCE_LEVEL, "15"),
    (keys::CONNECTOR_LOG_LEVEL, "info"),
    (keys::CONNECTOR_ENTITY_NAME, "Threat Bus"),
    (
        keys::CONNECTOR_ENTITY_DESCRIPTION,
        "Sightings from Threat Bus",
    ),
    (keys::THREATBUS_ZMQ_HOST, "threatbus"),
    (keys::THREATBUS_ZMQ_PORT, "13370"),
];

fn render(entries: &[(Key, String)]) -> String {
    let mut yaml = String::new();
    for section in keys::SECTIONS {
        yaml.push_str(&format!("{section}:\n"));
        for (key, value) in entries.iter().filter(|(k, _)| k.section == *section) {
            yaml.push_str(&format!("  {}: {}\n", key.name, value));
        }
    }
    yaml
}

fn base_entries() -> Vec<(Key, String)> {
    REQUIRED.iter().map(|(k, v)| (*k, v.to_string())).collect()
}

fn base_yaml() -> String {
    render(&base_entries())
}

/// The valid base with `key` set (or replaced) to the YAML text `value`.
fn yaml_with(key: Key, value: &str) -> String {
    let mut entries: Vec<_> = base_entries()
        .into_iter()
        .filter(|(k, _)| *k != key)
        .collect();
    entries.push((key, value.to_string()));
    render(&entries)
}

fn yaml_without(key: Key) -> String {
    let entries: Vec<_> = base_entries()
        .into_iter()
        .filter(|(k, _)| *k != key)
        .collect();
    render(&entries)
}

fn no_env(_: &str) -> Option<String> {
    None
}

fn env_from<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
    move |name| {
        pairs
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_string())
    }
}

fn load(yaml: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
    Config::from_sources(Some(yaml), &env_from(env))
}

fn base_with_env(env: &[(&str, &str)]) -> Result<Config, ConfigError> {
    load(&base_yaml(), env)
}

fn valid(result: Result<Config, ConfigError>) -> Config {
    match result {
        Ok(config) => config,
        Err(e) => panic!("expected a valid configuration, got: {e}"),
    }
}

fn failed(result: Result<Config, ConfigError>) -> ConfigError {
    match result {
        Ok(config) => panic!("expected an error, got {config:?}"),
        Err(e) => e,
    }
}

fn assert_names(err: &ConfigError, key: Key) {
    let message = err.to_string();
    assert!(
        message.starts_with(&format!("{} (env {}): ", key.path, key.env)),
        "{message}"
    );
    assert_eq!(err.key(), Some(key.path));
    assert!(!message.contains(TOKEN), "token leaked: {message}");
    assert!(!format!("{err:?}").contains(TOKEN), "token leaked: {err:?}");
}

fn assert_invalid(err: &ConfigError, key: Key) {
    assert!(
        matches!(err, ConfigError::Invalid { key: k, env, .. } if *k == key.path && *env == key.env),
        "expected Invalid for {}, got {err:?}",
        key.path
    );
    assert_names(err, key);
}

fn assert_wrong_type(err: &ConfigError, key: Key) {
    assert!(
        matches!(err, ConfigError::WrongType { key: k, env, .. } if *k == key.path && *env == key.env),
        "expected WrongType for {}, got {err:?}",
        key.path
    );
    assert_names(err, key);
}

// ---- the example file -------------------------------------------------------------------

const EXAMPLE: &str = include_str!("../../config.yml.example");

#[test]
fn example_loads_without_unknown_keys() {
    let config = valid(Config::from_sources(Some(EXAMPLE), &no_env));
    assert!(config.unknown_keys.is_empty(), "{:?}", config.unknown_keys);
    assert_eq!(config.connector.live_stream_id, None);
}

#[test]
fn example_documents_every_key() {
    let file = match FileValues::parse(Path::new("config.yml.example"), EXAMPLE) {
        Ok(file) => file,
        Err(e) => panic!("{e}"),
    };
    for key in keys::ALL {
        let found = matches!(file.value(*key), Ok(Some(_)));
        assert!(found, "config.yml.example lacks {}", key.path);
        assert!(
            EXAMPLE.contains(key.env),
            "config.yml.example does not name {}",
            key.env
        );
    }
}

#[test]
fn example_shows_the_bridge_defaults() {
    let example = valid(Config::from_sources(Some(EXAMPLE), &no_env)).bridge;
    let defaults = BridgeConfig::with_data_dir(DEFAULT_DATA_DIR);
    assert_eq!(format!("{example:?}"), format!("{defaults:?}"));
}

// ---- defaults and successful parsing ---------------------------------------------------

#[test]
fn minimal_config_gets_defaults() {
    let config = valid(Config::from_sources(Some(&base_yaml()), &no_env));
    assert_eq!(config.opencti.url, "http://opencti:8080");
    assert_eq!(config.opencti.token.expose(), TOKEN);
    assert!(config.opencti.ssl_verify);
    let c = &config.connector;
    assert_eq!(c.id.to_string(), UUID_V4);
    assert_eq!(c.name, "Threat Bus");
    assert_eq!(c.confidence_level, 15);
    assert_eq!(c.log_level, LogLevel::Info);
    assert_eq!(c.log_format, LogFormat::Text);
    assert!(!c.forward_all_iocs);
    assert_eq!(c.live_stream_id, None);
    assert!(c.live_stream_listen_delete);
    assert!(c.live_stream_no_dependencies);
    assert!(!c.live_stream_with_inferences);
    assert_eq!(c.live_stream_start_timestamp, None);
    assert_eq!(c.live_stream_recover_iso_date, None);
    assert_eq!(c.stream_timeout, Duration::from_secs(45));
    assert_eq!(c.ping_interval, Duration::from_secs(40));
    assert!(!c.expose_metrics);
    assert_eq!(c.metrics_port, 9095);
    assert_eq!(config.threatbus.zmq_host, "threatbus");
    assert_eq!(config.threatbus.zmq_port, 13370);
    assert_eq!(config.threatbus.snapshot_days, 0);
    assert_eq!(config.threatbus.confirm_delivery, ConfirmDelivery::Echo);
    let defaults = BridgeConfig::with_data_dir("./data");
    assert_eq!(format!("{:?}", config.bridge), format!("{defaults:?}"));
    assert!(config.unknown_keys.is_empty());
}

#[test]
fn every_optional_key_is_read_from_the_file() {
    let optional = [
        "ssl_verify: false",
        "log_format: JSON",
        "forward_all_iocs: true",
        "live_stream_id: live",
        "live_stream_listen_delete: false",
        "live_stream_no_dependencies: false",
        "live_stream_with_inferences: true",
        "live_stream_start_timestamp: 1700000000000-0",
        "live_stream_recover_iso_date: 2024-01-01T00:00:00Z",
        "stream_timeout_s: 30",
        "ping_interval_s: 5",
        "expose_metrics: true",
        "metrics_port: 9100",
        "snapshot: 7",
        "confirm_delivery: none",
    ];
    let mut yaml = base_yaml();
    for line in optional {
        let section = match line.split(':').next() {
            Some("ssl_verify") => "opencti:\n",
            Some("snapshot" | "confirm_delivery") => "threatbus:\n",
            _ => "connector:\n",
        };
        yaml = yaml.replacen(section, &format!("{section}  {line}\n"), 1);
    }
    let config = valid(Config::from_sources(Some(&yaml), &no_env));
    let c = &config.connector;
    assert!(!config.opencti.ssl_verify);
    assert_eq!(c.log_format, LogFormat::Json);
    assert!(c.forward_all_iocs);
    assert_eq!(c.live_stream_id.as_deref(), Some("live"));
    assert!(!c.live_stream_listen_delete);
    assert!(!c.live_stream_no_dependencies);
    assert!(c.live_stream_with_inferences);
    assert_eq!(
        c.live_stream_start_timestamp.as_deref(),
        Some("1700000000000-0")
    );
    assert_eq!(
        c.live_stream_recover_iso_date.as_deref(),
        Some("2024-01-01T00:00:00Z")
    );
    assert_eq!(c.stream_timeout, Duration::from_secs(30));
    assert_eq!(c.ping_interval, Duration::from_secs(5));
    assert!(c.expose_metrics);
    assert_eq!(c.metrics_port, 9100);
    assert_eq!(config.threatbus.snapshot_days, 7);
    assert_eq!(config.threatbus.confirm_delivery, ConfirmDelivery::None);
}

#[test]
fn every_bridge_key_is_read_from_the_environment() {
    let env = [
        ("BRIDGE_DATA_DIR", "/data"),
        ("BRIDGE_FLUSH_INTERVAL_MS", "20"),
        ("BRIDGE_FLUSH_MAX_ITEMS", "50"),
        ("BRIDGE_INDICATOR_QUEUE_LIMIT", "10"),
        ("BRIDGE_SIGHTING_QUEUE_LIMIT", "20"),
        ("BRIDGE_RETRY_INITIAL_MS", "100"),
        ("BRIDGE_RETRY_MAX_MS", "100"),
        ("BRIDGE_RETRY_MULTIPLIER", "1.5"),
        ("BRIDGE_MAX_ATTEMPTS", "3"),
        ("BRIDGE_INFLIGHT_WINDOW", "7"),
        ("BRIDGE_CONFIRM_TIMEOUT_MS", "2500"),
        ("BRIDGE_OPENCTI_CONCURRENCY", "256"),
        ("BRIDGE_MAX_EVENT_BYTES", "65536"),
        ("BRIDGE_PROBE_MAX_MS", "2000"),
        ("BRIDGE_CACHE_MB", "48"),
        ("BRIDGE_MIN_FREE_MB", "64"),
    ];
    let b = valid(base_with_env(&env)).bridge;
    assert_eq!(b.data_dir, Path::new("/data"));
    assert_eq!(b.flush_interval, Duration::from_millis(20));
    assert_eq!(b.flush_max_items, 50);
    assert_eq!(b.indicator_queue_limit, 10);
    assert_eq!(b.sighting_queue_limit, 20);
    assert_eq!(b.retry_initial, Duration::from_millis(100));
    assert_eq!(b.retry_max, Duration::from_millis(100));
    assert_eq!(b.retry_multiplier, 1.5);
    assert_eq!(b.max_attempts, 3);
    assert_eq!(b.inflight_window, 7);
    assert_eq!(b.confirm_timeout, Duration::from_millis(2500));
    assert_eq!(b.opencti_concurrency, 256);
    assert_eq!(b.max_event_bytes, 65536);
    assert_eq!(b.probe_max, Duration::from_millis(2000));
    assert_eq!(b.cache_mb, 48);
    assert_eq!(b.min_free_bytes, 64 * 1024 * 1024);
}

#[test]
fn min_free_defaults_to_256_mib_and_zero_turns_it_off() {
    let b = valid(base_with_env(&[])).bridge;
    assert_eq!(b.min_free_bytes, 256 * 1024 * 1024);
    let b = valid(base_with_env(&[("BRIDGE_MIN_FREE_MB", "0")])).bridge;
    assert_eq!(b.min_free_bytes, 0);
}

#[test]
fn url_trailing_slashes_are_stripped() {
    let config = valid(load(
        &yaml_with(keys::OPENCTI_URL, "https://cti.example.org/"),
        &[],
    ));
    assert_eq!(config.opencti.url, "https://cti.example.org");
    let config = valid(base_with_env(&[("OPENCTI_URL", "http://h:8080/base//")]));
    assert_eq!(config.opencti.url, "http://h:8080/base");
}

#[test]
fn log_level_accepts_warning_and_any_case() {
    for (text, level) in [
        ("debug", LogLevel::Debug),
        ("INFO", LogLevel::Info),
        ("warn", LogLevel::Warn),
        ("Warning", LogLevel::Warn),
        ("ERROR", LogLevel::Error),
    ] {
        let config = valid(base_with_env(&[("CONNECTOR_LOG_LEVEL", text)]));
        assert_eq!(config.connector.log_level, level, "{text}");
    }
}

#[test]
fn type_and_scope_are_case_insensitive_and_not_stored() {
    let env = [
        ("CONNECTOR_TYPE", "stream"),
        ("CONNECTOR_SCOPE", "ThreatBus"),
    ];
    valid(base_with_env(&env));
}

#[test]
fn uuid_v4_accepted_in_upper_case() {
    let upper = UUID_V4.to_ascii_uppercase();
    let config = valid(base_with_env(&[("CONNECTOR_ID", &upper)]));
    assert_eq!(config.connector.id.to_string(), UUID_V4);
}

// ---- environment against file -------------------------------------------------------------

#[test]
fn env_overrides_file() {
    let env = [
        ("OPENCTI_URL", "https://other:4000"),
        ("CONNECTOR_CONFIDENCE_LEVEL", "80"),
        ("THREATBUS_ZMQ_HOST", "bus.internal"),
        ("OPENCTI_SSL_VERIFY", "false"),
    ];
    let config = valid(base_with_env(&env));
    assert_eq!(config.opencti.url, "https://other:4000");
    assert_eq!(config.connector.confidence_level, 80);
    assert_eq!(config.threatbus.zmq_host, "bus.internal");
    assert!(!config.opencti.ssl_verify);
}

#[test]
fn env_alone_is_enough() {
    let env: Vec<(&str, &str)> = REQUIRED.iter().map(|(k, v)| (k.env, *v)).collect();
    let config = valid(Config::from_sources(None, &env_from(&env)));
    assert_eq!(config.threatbus.zmq_port, 13370);
    assert!(config.unknown_keys.is_empty());
}

#[test]
fn empty_env_value_means_default_for_optional_keys() {
    let yaml = yaml_with(keys::CONNECTOR_LIVE_STREAM_ID, "live");
    let config = valid(load(&yaml, &[("CONNECTOR_LIVE_STREAM_ID", "")]));
    assert_eq!(config.connector.live_stream_id, None);
    let config = valid(base_with_env(&[("CONNECTOR_METRICS_PORT", "")]));
    assert_eq!(config.connector.metrics_port, 9095);
}

#[test]
fn empty_env_value_fails_a_required_key() {
    let err = failed(base_with_env(&[("OPENCTI_TOKEN", "")]));
    assert!(matches!(
        err,
        ConfigError::Empty {
            key: "opencti.token",
            env: "OPENCTI_TOKEN"
        }
    ));
    assert_names(&err, keys::OPENCTI_TOKEN);
    let err = failed(base_with_env(&[("CONNECTOR_NAME", "  ")]));
    assert!(matches!(
        err,
        ConfigError::Empty {
            key: "connector.name",
            ..
        }
    ));
}

// ---- required keys ----------------------------------------------------------------------

macro_rules! missing_tests {
    ($($test:ident: $key:ident,)*) => {$(
        #[test]
        fn $test() {
            let key = keys::$key;
            let err = failed(Config::from_sources(Some(&yaml_without(key)), &no_env));
            assert!(
                matches!(err, ConfigError::Missing { key: k, env } if k == key.path && env == key.env),
                "{err:?}"
            );
            assert_eq!(
                err.to_string(),
                format!("{} (env {}): required but not set", key.path, key.env)
            );
            assert_names(&err, key);
        }
    )*};
}

missing_tests! {
    missing_opencti_url: OPENCTI_URL,
    missing_opencti_token: OPENCTI_TOKEN,
    missing_connector_id: CONNECTOR_ID,
    missing_connector_type: CONNECTOR_TYPE,
    missing_connector_name: CONNECTOR_NAME,
    missing_connector_scope: CONNECTOR_SCOPE,
    missing_connector_confidence_level: CONNECTOR_CONFIDENCE_LEVEL,
    missing_connector_log_level: CONNECTOR_LOG_LEVEL,
    missing_connector_entity_name: CONNECTOR_ENTITY_NAME,
    missing_connector_entity_description: CONNECTOR_ENTITY_DESCRIPTION,
    missing_threatbus_zmq_host: THREATBUS_ZMQ_HOST,
    missing_threatbus_zmq_port: THREATBUS_ZMQ_PORT,
}

#[test]
fn yaml_null_counts_as_missing() {
    let err = failed(load(&yaml_with(keys::OPENCTI_URL, "~"), &[]));
    assert!(
        matches!(
            err,
            ConfigError::Missing {
                key: "opencti.url",
                ..
            }
        ),
        "{err:?}"
    );
}

// ---- invalid values (as environment strings) ----------------------------------------------

macro_rules! invalid_env_tests {
    ($($test:ident: $key:ident = $value:expr,)*) => {$(
        #[test]
        fn $test() {
            let key = keys::$key;
            let err = failed(base_with_env(&[(key.env, $value)]));
            assert_invalid(&err, key);
            let message = err.to_string();
            assert!(message.contains(&format!("found {:?}", $value)), "{message}");
        }
    )*};
}

invalid_env_tests! {
    invalid_url_without_scheme: OPENCTI_URL = "opencti:8080",
    invalid_url_other_scheme: OPENCTI_URL = "ftp://opencti",
    invalid_url_scheme_only: OPENCTI_URL = "https://",
    invalid_ssl_verify: OPENCTI_SSL_VERIFY = "maybe",
    invalid_connector_id: CONNECTOR_ID = "abc",
    invalid_connector_type: CONNECTOR_TYPE = "INTERNAL_ENRICHMENT",
    invalid_connector_scope: CONNECTOR_SCOPE = "ipv4-addr",
    invalid_confidence_above_100: CONNECTOR_CONFIDENCE_LEVEL = "101",
    invalid_confidence_negative: CONNECTOR_CONFIDENCE_LEVEL = "-1",
    invalid_confidence_not_a_number: CONNECTOR_CONFIDENCE_LEVEL = "high",
    invalid_log_level: CONNECTOR_LOG_LEVEL = "trace",
    invalid_log_format: CONNECTOR_LOG_FORMAT = "xml",
    invalid_forward_all_iocs: CONNECTOR_FORWARD_ALL_IOCS = "1",
    invalid_listen_delete: CONNECTOR_LIVE_STREAM_LISTEN_DELETE = "on",
    invalid_no_dependencies: CONNECTOR_LIVE_STREAM_NO_DEPENDENCIES = "y",
    invalid_with_inferences: CONNECTOR_LIVE_STREAM_WITH_INFERENCES = "t",
    invalid_stream_timeout_zero: CONNECTOR_STREAM_TIMEOUT_S = "0",
    invalid_stream_timeout_fraction: CONNECTOR_STREAM_TIMEOUT_S = "1.5",
    invalid_ping_interval_zero: CONNECTOR_PING_INTERVAL_S = "0",
    invalid_expose_metrics: CONNECTOR_EXPOSE_METRICS = "enabled",
    invalid_metrics_port_zero: CONNECTOR_METRICS_PORT = "0",
    invalid_metrics_port_too_big: CONNECTOR_METRICS_PORT = "65536",
    invalid_zmq_port_zero: THREATBUS_ZMQ_PORT = "0",
    invalid_zmq_port_too_big: THREATBUS_ZMQ_PORT = "65536",
    invalid_snapshot_negative: THREATBUS_SNAPSHOT = "-1",
    invalid_confirm_delivery: THREATBUS_CONFIRM_DELIVERY = "always",
    invalid_flush_interval_zero: BRIDGE_FLUSH_INTERVAL_MS = "0",
    invalid_flush_max_items_zero: BRIDGE_FLUSH_MAX_ITEMS = "0",
    invalid_indicator_queue_limit_zero: BRIDGE_INDICATOR_QUEUE_LIMIT = "0",
    invalid_sighting_queue_limit_zero: BRIDGE_SIGHTING_QUEUE_LIMIT = "0",
    invalid_retry_initial_zero: BRIDGE_RETRY_INITIAL_MS = "0",
    invalid_retry_max_zero: BRIDGE_RETRY_MAX_MS = "0",
    invalid_retry_multiplier_below_one: BRIDGE_RETRY_MULTIPLIER = "0.5",
    invalid_retry_multiplier_nan: BRIDGE_RETRY_MULTIPLIER = "NaN",
    invalid_retry_multiplier_infinite: BRIDGE_RETRY_MULTIPLIER = "inf",
    invalid_max_attempts_zero: BRIDGE_MAX_ATTEMPTS = "0",
    invalid_inflight_window_zero: BRIDGE_INFLIGHT_WINDOW = "0",
    invalid_confirm_timeout_zero: BRIDGE_CONFIRM_TIMEOUT_MS = "0",
    invalid_opencti_concurrency_zero: BRIDGE_OPENCTI_CONCURRENCY = "0",
    invalid_opencti_concurrency_too_big: BRIDGE_OPENCTI_CONCURRENCY = "257",
    invalid_max_event_bytes_too_small: BRIDGE_MAX_EVENT_BYTES = "4095",
    invalid_max_event_bytes_too_big: BRIDGE_MAX_EVENT_BYTES = "1073741825",
    invalid_probe_max_zero: BRIDGE_PROBE_MAX_MS = "0",
    invalid_cache_mb_zero: BRIDGE_CACHE_MB = "0",
    invalid_cache_mb_too_big: BRIDGE_CACHE_MB = "1048577",
    invalid_min_free_too_big: BRIDGE_MIN_FREE_MB = "1048577",
    invalid_integer_overflow: BRIDGE_INDICATOR_QUEUE_LIMIT = "99999999999999999999999",
}

#[test]
fn connector_id_message_matches_the_documented_form() {
    let err = failed(base_with_env(&[("CONNECTOR_ID", "abc")]));
    assert_eq!(
        err.to_string(),
        r#"connector.id (env CONNECTOR_ID): expected a UUID v4, found "abc""#
    );
}

#[test]
fn connector_id_rejects_uuid_v1() {
    let err = failed(base_with_env(&[("CONNECTOR_ID", UUID_V1)]));
    assert_invalid(&err, keys::CONNECTOR_ID);
    assert!(err.to_string().contains("a UUID v1"), "{err}");
}

#[test]
fn connector_id_rejects_uuid_v3() {
    let err = failed(base_with_env(&[("CONNECTOR_ID", UUID_V3)]));
    assert_invalid(&err, keys::CONNECTOR_ID);
    assert!(err.to_string().contains("a UUID v3"), "{err}");
}

#[test]
fn connector_id_rejects_nil_uuid() {
    let err = failed(base_with_env(&[(
        "CONNECTOR_ID",
        "00000000-0000-0000-0000-000000000000",
    )]));
    assert_invalid(&err, keys::CONNECTOR_ID);
}

#[test]
fn retry_max_below_retry_initial_is_rejected() {
    let env = [
        ("BRIDGE_RETRY_INITIAL_MS", "1000"),
        ("BRIDGE_RETRY_MAX_MS", "999"),
    ];
    let err = failed(base_with_env(&env));
    assert_invalid(&err, keys::BRIDGE_RETRY_MAX_MS);
    assert!(err.to_string().contains("bridge.retry_initial_ms"), "{err}");
}

#[test]
fn retry_initial_above_default_max_is_rejected() {
    let err = failed(base_with_env(&[("BRIDGE_RETRY_INITIAL_MS", "60001")]));
    assert_invalid(&err, keys::BRIDGE_RETRY_MAX_MS);
}

// ---- YAML types ----------------------------------------------------------------------------

#[test]
fn booleans_from_yaml_and_strings() {
    for (yaml, expected) in [
        ("false", false),
        ("true", true),
        ("\"FALSE\"", false),
        ("'True'", true),
        ("\"no\"", false),
        ("\"yes\"", true),
    ] {
        let config = valid(load(&yaml_with(keys::OPENCTI_SSL_VERIFY, yaml), &[]));
        assert_eq!(config.opencti.ssl_verify, expected, "{yaml}");
    }
    for (env, expected) in [("False", false), ("TRUE", true), (" true ", true)] {
        let config = valid(base_with_env(&[("CONNECTOR_EXPOSE_METRICS", env)]));
        assert_eq!(config.connector.expose_metrics, expected, "{env}");
    }
}

#[test]
fn numbers_from_yaml_and_strings() {
    let config = valid(load(&yaml_with(keys::THREATBUS_ZMQ_PORT, "\"13371\""), &[]));
    assert_eq!(config.threatbus.zmq_port, 13371);
    let config = valid(load(
        &yaml_with(keys::CONNECTOR_CONFIDENCE_LEVEL, "'0'"),
        &[],
    ));
    assert_eq!(config.connector.confidence_level, 0);
    let config = valid(base_with_env(&[("CONNECTOR_CONFIDENCE_LEVEL", "100")]));
    assert_eq!(config.connector.confidence_level, 100);
    for (yaml, expected) in [("3", 3.0), ("1.5", 1.5), ("\"2.5\"", 2.5), ("1", 1.0)] {
        let config = valid(load(&yaml_with(keys::BRIDGE_RETRY_MULTIPLIER, yaml), &[]));
        assert_eq!(config.bridge.retry_multiplier, expected, "{yaml}");
    }
}

#[test]
fn numbers_are_accepted_as_text() {
    let config = valid(load(&yaml_with(keys::CONNECTOR_NAME, "2024"), &[]));
    assert_eq!(config.connector.name, "2024");
}

#[test]
fn wrong_yaml_type_for_a_boolean() {
    let err = failed(load(&yaml_with(keys::OPENCTI_SSL_VERIFY, "[1]"), &[]));
    assert_wrong_type(&err, keys::OPENCTI_SSL_VERIFY);
    assert!(err.to_string().ends_with("found a sequence"), "{err}");
    let err = failed(load(&yaml_with(keys::CONNECTOR_FORWARD_ALL_IOCS, "1"), &[]));
    assert_wrong_type(&err, keys::CONNECTOR_FORWARD_ALL_IOCS);
}

#[test]
fn wrong_yaml_type_for_a_number() {
    let err = failed(load(&yaml_with(keys::THREATBUS_ZMQ_PORT, "true"), &[]));
    assert_wrong_type(&err, keys::THREATBUS_ZMQ_PORT);
    let err = failed(load(
        &yaml_with(keys::BRIDGE_RETRY_MULTIPLIER, "{a: 1}"),
        &[],
    ));
    assert_wrong_type(&err, keys::BRIDGE_RETRY_MULTIPLIER);
}

#[test]
fn wrong_yaml_type_for_a_string() {
    let err = failed(load(&yaml_with(keys::CONNECTOR_NAME, "{a: 1}"), &[]));
    assert_wrong_type(&err, keys::CONNECTOR_NAME);
    let err = failed(load(&yaml_with(keys::THREATBUS_ZMQ_HOST, "true"), &[]));
    assert_wrong_type(&err, keys::THREATBUS_ZMQ_HOST);
    let err = failed(load(&yaml_with(keys::CONNECTOR_LOG_LEVEL, "[info]"), &[]));
    assert_wrong_type(&err, keys::CONNECTOR_LOG_LEVEL);
}

#[test]
fn yaml_float_or_negative_is_not_an_integer() {
    let err = failed(load(&yaml_with(keys::THREATBUS_ZMQ_PORT, "1.5"), &[]));
    assert_invalid(&err, keys::THREATBUS_ZMQ_PORT);
    assert!(err.to_string().ends_with("found 1.5"), "{err}");
    let err = failed(load(
        &yaml_with(keys::CONNECTOR_CONFIDENCE_LEVEL, "-3"),
        &[],
    ));
    assert_invalid(&err, keys::CONNECTOR_CONFIDENCE_LEVEL);
}

// ---- the token ----------------------------------------------------------------------------

#[test]
fn token_absent_from_debug_output() {
    let config = valid(Config::from_sources(Some(&base_yaml()), &no_env));
    let debug = format!("{config:?}");
    assert!(!debug.contains(TOKEN), "{debug}");
    assert!(!format!("{config:#?}").contains(TOKEN));
    assert!(!format!("{}", config.opencti.token).contains(TOKEN));
}

#[test]
fn token_absent_from_every_error_message() {
    let env_cases: Vec<(&str, &str)> = vec![
        ("OPENCTI_URL", "nope"),
        ("CONNECTOR_ID", "abc"),
        ("CONNECTOR_LOG_LEVEL", "loud"),
        ("BRIDGE_RETRY_MULTIPLIER", "0"),
        ("OPENCTI_TOKEN", ""),
    ];
    let mut errors: Vec<ConfigError> = env_cases
        .iter()
        .map(|pair| failed(base_with_env(&[*pair])))
        .collect();
    for value in ["[a, b]", "{x: 1}", "true", "!secret x"] {
        errors.push(failed(load(&yaml_with(keys::OPENCTI_TOKEN, value), &[])));
    }
    for key in REQUIRED.iter().map(|(k, _)| *k) {
        errors.push(failed(load(&yaml_without(key), &[])));
    }
    errors.push(failed(load(&format!("{}opencti: [", base_yaml()), &[])));
    errors.push(failed(load(
        &format!("{}\nopencti: {{}}\n", base_yaml()),
        &[],
    )));
    for err in errors {
        let shown = format!("{err} / {err:?}");
        assert!(!shown.contains(TOKEN), "{shown}");
    }
}

#[test]
fn token_of_wrong_type_is_reported_without_value() {
    let err = failed(load(&yaml_with(keys::OPENCTI_TOKEN, "[hunter2]"), &[]));
    assert_wrong_type(&err, keys::OPENCTI_TOKEN);
    assert!(!err.to_string().contains("hunter2"), "{err}");
}

// ---- file shape and unknown keys ------------------------------------------------------------

#[test]
fn unknown_keys_are_collected_not_rejected() {
    let yaml = format!(
        "{}extra:\n  a: 1\nconnector_x: 2\n",
        yaml_with(keys::CONNECTOR_NAME, "Bus\n  nmae: typo\n  live_stream: x")
    );
    let mut unknown = valid(load(&yaml, &[])).unknown_keys;
    unknown.sort();
    assert_eq!(
        unknown,
        [
            "connector.live_stream",
            "connector.nmae",
            "connector_x",
            "extra"
        ]
    );
}

#[test]
fn top_level_must_be_a_mapping() {
    let err = failed(load("- opencti\n- connector\n", &[]));
    assert!(
        matches!(
            err,
            ConfigError::NotAMapping {
                found: "a sequence",
                ..
            }
        ),
        "{err:?}"
    );
    let err = failed(load("just text", &[]));
    assert!(
        matches!(
            err,
            ConfigError::NotAMapping {
                found: "a string",
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn section_must_be_a_mapping() {
    let yaml = base_yaml().replace("threatbus:\n", "threatbus: 5\nignored:\n");
    let err = failed(load(&yaml, &[]));
    assert!(
        matches!(
            err,
            ConfigError::SectionNotAMapping {
                section: "threatbus",
                found: "a number",
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn invalid_yaml_names_the_path() {
    let err = failed(load("opencti: [unclosed\n", &[]));
    assert!(matches!(err, ConfigError::ParseFile { .. }), "{err:?}");
    assert!(err.to_string().contains("<yaml>"), "{err}");
}

#[test]
fn duplicate_key_is_a_parse_error() {
    let yaml = base_yaml().replace("opencti:\n", "opencti:\n  url: http://a\n");
    let err = failed(load(&yaml, &[]));
    assert!(matches!(err, ConfigError::ParseFile { .. }), "{err:?}");
}

#[test]
fn empty_file_leaves_everything_to_the_environment() {
    let env: Vec<(&str, &str)> = REQUIRED.iter().map(|(k, v)| (k.env, *v)).collect();
    valid(load("# only a comment\n", &env));
    let err = failed(load("", &[]));
    assert!(
        matches!(
            err,
            ConfigError::Missing {
                key: "opencti.url",
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn merge_keys_are_resolved() {
    let yaml = base_yaml().replace(
        "bridge:\n",
        "defaults: &d\n  max_attempts: 9\nbridge:\n  <<: *d\n",
    );
    let config = valid(load(&yaml, &[]));
    assert_eq!(config.bridge.max_attempts, 9);
}

// ---- locating the file ----------------------------------------------------------------------

fn temp_dir() -> tempfile::TempDir {
    match tempfile::tempdir() {
        Ok(dir) => dir,
        Err(e) => panic!("tempdir: {e}"),
    }
}

fn write(path: &Path, text: &str) {
    if let Err(e) = std::fs::write(path, text) {
        panic!("write {}: {e}", path.display());
    }
}

#[test]
fn explicit_missing_file_is_an_error() {
    let dir = temp_dir();
    let path = dir.path().join("absent.yml");
    let err = failed(Config::load_with_env(Some(&path), &no_env));
    assert!(
        matches!(&err, ConfigError::FileNotFound { path: p } if *p == path),
        "{err:?}"
    );
    assert!(err.to_string().contains("absent.yml"), "{err}");
}

#[test]
fn config_file_env_missing_is_an_error() {
    let dir = temp_dir();
    let path = dir.path().join("absent.yml");
    let path_text = path.to_string_lossy().into_owned();
    let env = [(CONFIG_FILE_ENV, path_text.as_str())];
    let err = failed(Config::load_with_env(None, &env_from(&env)));
    assert!(matches!(err, ConfigError::FileNotFound { .. }), "{err:?}");
}

#[test]
fn default_missing_file_is_fine() {
    let dir = temp_dir();
    let env: Vec<(&str, &str)> = REQUIRED.iter().map(|(k, v)| (k.env, *v)).collect();
    let env = env_from(&env);
    let file = match read_config_file(None, &env, &dir.path().join("config.yml")) {
        Ok(file) => file,
        Err(e) => panic!("a missing default file must not be an error: {e}"),
    };
    assert!(file.is_none());
    let config = valid(Config::from_file(file.as_ref(), &env));
    assert_eq!(config.connector.name, "Threat Bus");
}

#[test]
fn explicit_file_is_read_and_env_still_wins() {
    let dir = temp_dir();
    let path = dir.path().join("c.yml");
    write(&path, &base_yaml());
    let env = [("CONNECTOR_NAME", "from env")];
    let config = valid(Config::load_with_env(Some(&path), &env_from(&env)));
    assert_eq!(config.connector.name, "from env");
    assert_eq!(config.threatbus.zmq_port, 13370);
}

#[test]
fn argument_wins_over_config_file_env() {
    let dir = temp_dir();
    let path = dir.path().join("c.yml");
    write(&path, &base_yaml());
    let env = [(CONFIG_FILE_ENV, "/nonexistent/config.yml")];
    valid(Config::load_with_env(Some(&path), &env_from(&env)));
    let path_text = path.to_string_lossy().into_owned();
    let env = [(CONFIG_FILE_ENV, path_text.as_str())];
    valid(Config::load_with_env(None, &env_from(&env)));
}

#[test]
fn unparsable_file_names_its_path() {
    let dir = temp_dir();
    let path = dir.path().join("broken.yml");
    write(&path, "opencti: [\n");
    let err = failed(Config::load_with_env(Some(&path), &no_env));
    assert!(matches!(err, ConfigError::ParseFile { .. }), "{err:?}");
    assert!(err.to_string().contains("broken.yml"), "{err}");
}

#[test]
fn unreadable_file_is_a_read_error() {
    let dir = temp_dir();
    let err = failed(Config::load_with_env(Some(dir.path()), &no_env));
    assert!(matches!(err, ConfigError::ReadFile { .. }), "{err:?}");
}

// ---- load_data_dir ----------------------------------------------------------------------------

#[test]
fn data_dir_ignores_missing_token_and_other_keys() {
    let dir = temp_dir();
    let path = dir.path().join("c.yml");
    write(
        &path,
        "opencti:\n  url: 5\nconnector: nonsense\nbridge:\n  data_dir: /var/lib/tb\n",
    );
    let data_dir = load_data_dir_with_env(Some(&path), &no_env);
    assert_eq!(data_dir.ok().as_deref(), Some(Path::new("/var/lib/tb")));
}

#[test]
fn data_dir_defaults_without_a_file() {
    let dir = temp_dir();
    let file = match read_config_file(None, &no_env, &dir.path().join("config.yml")) {
        Ok(file) => file,
        Err(e) => panic!("{e}"),
    };
    let sources = Sources {
        file: file.as_ref(),
        env: &no_env,
    };
    let data_dir = read::data_dir(&sources);
    assert_eq!(data_dir.ok().as_deref(), Some(Path::new(DEFAULT_DATA_DIR)));
}

#[test]
fn data_dir_from_env_wins() {
    let dir = temp_dir();
    let path = dir.path().join("c.yml");
    write(&path, "bridge:\n  data_dir: /from/file\n");
    let env = [("BRIDGE_DATA_DIR", "/from/env")];
    let data_dir = load_data_dir_with_env(Some(&path), &env_from(&env));
    assert_eq!(data_dir.ok().as_deref(), Some(Path::new("/from/env")));
}

#[test]
fn data_dir_explicit_missing_file_is_an_error() {
    let dir = temp_dir();
    let err = load_data_dir_with_env(Some(&dir.path().join("absent.yml")), &no_env);
    assert!(
        matches!(err, Err(ConfigError::FileNotFound { .. })),
        "{err:?}"
    );
}

#[test]
fn data_dir_wrong_type_is_an_error() {
    let dir = temp_dir();
    let path = dir.path().join("c.yml");
    write(&path, "bridge:\n  data_dir: [a]\n");
    let err = load_data_dir_with_env(Some(&path), &no_env);
    assert!(
        matches!(
            err,
            Err(ConfigError::WrongType {
                key: "bridge.data_dir",
                ..
            })
        ),
        "{err:?}"
    );
}

#[test]
fn entity_name_needs_two_characters() {
    let err = failed(base_with_env(&[("CONNECTOR_ENTITY_NAME", "X")]));
    assert!(
        matches!(
            err,
            ConfigError::Invalid {
                key: "connector.entity_name",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("CONNECTOR_ENTITY_NAME"), "{err}");
}
