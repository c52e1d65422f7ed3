//! The table of configuration keys: where each lives in the YAML file and which environment
//! variable overrides it. One table, so that lookups, error messages and the unknown-key
//! check cannot drift apart.

/// One configuration key: `section.name` in the file, `env` in the environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key {
    pub section: &'static str,
    pub name: &'static str,
    /// `section.name`, as shown in error messages.
    pub path: &'static str,
    pub env: &'static str,
}

macro_rules! keys {
    ($($env:ident => $section:literal . $name:literal,)*) => {
        $(
            pub const $env: Key = Key {
                section: $section,
                name: $name,
                path: concat!($section, ".", $name),
                env: stringify!($env),
            };
        )*
        /// Every known key, in the order they are read.
        pub const ALL: &[Key] = &[$($env),*];
    };
}

keys! {
    OPENCTI_URL => "opencti"."url",
    OPENCTI_TOKEN => "opencti"."token",
    OPENCTI_SSL_VERIFY => "opencti"."ssl_verify",

    CONNECTOR_ID => "connector"."id",
    CONNECTOR_TYPE => "connector"."type",
    CONNECTOR_NAME => "connector"."name",
    CONNECTOR_SCOPE => "connector"."scope",
    CONNECTOR_CONFIDENCE_LEVEL => "connector"."confidence_level",
    CONNECTOR_LOG_LEVEL => "connector"."log_level",
    CONNECTOR_LOG_FORMAT => "connector"."log_format",
    CONNECTOR_ENTITY_NAME => "connector"."entity_name",
    CONNECTOR_ENTITY_DESCRIPTION => "connector"."entity_description",
    CONNECTOR_FORWARD_ALL_IOCS => "connector"."forward_all_iocs",
    CONNECTOR_LIVE_STREAM_ID => "connector"."live_stream_id",
    CONNECTOR_LIVE_STREAM_LISTEN_DELETE => "connector"."live_stream_listen_delete",
    CONNECTOR_LIVE_STREAM_NO_DEPENDENCIES => "connector"."live_stream_no_dependencies",
    CONNECTOR_LIVE_STREAM_WITH_INFERENCES => "connector"."live_stream_with_inferences",
    CONNECTOR_LIVE_STREAM_START_TIMESTAMP => "connector"."live_stream_start_timestamp",
    CONNECTOR_LIVE_STREAM_RECOVER_ISO_DATE => "connector"."live_stream_recover_iso_date",
    CONNECTOR_STREAM_TIMEOUT_S => "connector"."stream_timeout_s",
    CONNECTOR_PING_INTERVAL_S => "connector"."ping_interval_s",
    CONNECTOR_EXPOSE_METRICS => "connector"."expose_metrics",
    CONNECTOR_METRICS_PORT => "connector"."metrics_port",

    THREATBUS_ZMQ_HOST => "threatbus"."zmq_host",
    THREATBUS_ZMQ_PORT => "threatbus"."zmq_port",
    THREATBUS_SNAPSHOT => "threatbus"."snapshot",
    THREATBUS_CONFIRM_DELIVERY => "threatbus"."confirm_delivery",
    THREATBUS_SNAPSHOT_RATE => "threatbus"."snapshot_rate",
    THREATBUS_IMPORT_INDICATORS => "threatbus"."import_indicators",

    BRIDGE_DATA_DIR => "bridge"."data_dir",
    BRIDGE_FLUSH_INTERVAL_MS => "bridge"."flush_interval_ms",
    BRIDGE_FLUSH_MAX_ITEMS => "bridge"."flush_max_items",
    BRIDGE_INDICATOR_QUEUE_LIMIT => "bridge"."indicator_queue_limit",
    BRIDGE_SIGHTING_QUEUE_LIMIT => "bridge"."sighting_queue_limit",
    BRIDGE_RETRY_INITIAL_MS => "bridge"."retry_initial_ms",
    BRIDGE_RETRY_MAX_MS => "bridge"."retry_max_ms",
    BRIDGE_RETRY_MULTIPLIER => "bridge"."retry_multiplier",
    BRIDGE_MAX_ATTEMPTS => "bridge"."max_attempts",
    BRIDGE_INFLIGHT_WINDOW => "bridge"."inflight_window",
    BRIDGE_CONFIRM_TIMEOUT_MS => "bridge"."confirm_timeout_ms",
    BRIDGE_OPENCTI_CONCURRENCY => "bridge"."opencti_concurrency",
    BRIDGE_ON_DAMAGED_STORE => "bridge"."on_damaged_store",
    BRIDGE_MAX_EVENT_BYTES => "bridge"."max_event_bytes",
    BRIDGE_PROBE_MAX_MS => "bridge"."probe_max_ms",
    BRIDGE_CACHE_MB => "bridge"."cache_mb",
    BRIDGE_MIN_FREE_MB => "bridge"."min_free_mb",
}

/// The sections of the file, in the order the example documents them.
pub const SECTIONS: &[&str] = &["opencti", "connector", "threatbus", "bridge"];

/// Whether `section.name` is a known key.
pub fn is_known(section: &str, name: &str) -> bool {
    ALL.iter().any(|k| k.section == section && k.name == name)
}
