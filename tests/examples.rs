//! The shipped examples work for a newcomer: every variable `docker-compose.yaml` sets (or
//! shows commented out) and every key `config.yml.example` sets is one the bridge reads,
//! both load as they are (but for the placeholders a user must replace), and neither points
//! the bridge at a live stream id OpenCTI does not have.
//!
//! The known names come from the bridge's own key table (`config::keys`), so a key added
//! there without documentation, or a typo in an example, fails here.

use std::collections::BTreeMap;

use opencti_threatbus::config::{keys, Config, CONFIG_FILE_ENV};
use serde_yaml::Value;

const COMPOSE: &str = include_str!("../docker-compose.yaml");
const CONFIG_EXAMPLE: &str = include_str!("../config.yml.example");

/// A UUID v4 standing in for the placeholders a user must replace.
const SOME_UUID: &str = "0b8f8a43-7c55-4c8e-9a35-0c6d3a7c9d1e";

/// Environment variables the bridge reads: the key table, plus the one naming the file.
fn is_known_env(name: &str) -> bool {
    name == CONFIG_FILE_ENV || keys::ALL.iter().any(|k| k.env == name)
}

/// `NAME=value` pairs of every service's `environment`, in the list or the mapping form.
fn compose_environment(text: &str) -> Vec<(String, String)> {
    let root: Value = serde_yaml::from_str(text).expect("docker-compose.yaml is YAML");
    let services = root["services"]
        .as_mapping()
        .expect("docker-compose.yaml has services");
    let mut vars = Vec::new();
    for service in services.values() {
        match &service["environment"] {
            Value::Sequence(items) => {
                for item in items {
                    let item = item.as_str().expect("an environment entry is a string");
                    let (name, value) = item.split_once('=').unwrap_or((item, ""));
                    vars.push((name.to_string(), value.to_string()));
                }
            }
            Value::Mapping(map) => {
                for (name, value) in map {
                    let value = match value {
                        Value::String(s) => s.clone(),
                        Value::Null => String::new(),
                        other => serde_yaml::to_string(other).unwrap().trim().to_string(),
                    };
                    vars.push((name.as_str().expect("a name").to_string(), value));
                }
            }
            Value::Null => {}
            other => panic!("environment is neither a list nor a mapping: {other:?}"),
        }
    }
    vars
}

/// Variables shown commented out (`# - NAME=value`): a user uncomments them as they are.
fn compose_commented_environment(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|line| line.trim_start().strip_prefix('#'))
        .filter_map(|rest| rest.trim_start().strip_prefix("- "))
        .filter_map(|entry| entry.trim().split_once('='))
        .filter(|(name, _)| {
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
        })
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect()
}

fn unknown_compose_variables(text: &str) -> Vec<String> {
    compose_environment(text)
        .into_iter()
        .chain(compose_commented_environment(text))
        .map(|(name, _)| name)
        .filter(|name| !is_known_env(name))
        .collect()
}

/// Loads the configuration from `vars` alone, as the container would see them.
fn load_from_env(vars: &[(String, String)]) -> Result<Config, String> {
    let env: BTreeMap<String, String> = vars.iter().cloned().collect();
    let lookup = move |name: &str| env.get(name).cloned();
    Config::from_sources(None, &lookup).map_err(|e| e.to_string())
}

#[test]
fn every_compose_variable_is_one_the_bridge_reads() {
    let set = compose_environment(COMPOSE);
    assert!(set.len() >= 10, "the compose file sets variables: {set:?}");
    assert!(
        !compose_commented_environment(COMPOSE).is_empty(),
        "the live stream id is shown as a commented placeholder"
    );
    assert_eq!(unknown_compose_variables(COMPOSE), Vec::<String>::new());
}

#[test]
fn the_check_catches_a_typo_in_the_compose_file() {
    let typo = COMPOSE.replace("CONNECTOR_LOG_LEVEL=", "CONNECTOR_LOGLEVEL=");
    assert_ne!(typo, COMPOSE);
    assert_eq!(unknown_compose_variables(&typo), vec!["CONNECTOR_LOGLEVEL"]);
    let typo = COMPOSE.replace(
        "# - CONNECTOR_LIVE_STREAM_ID=",
        "# - CONNECTOR_LIVESTREAM_ID=",
    );
    assert_ne!(typo, COMPOSE);
    assert_eq!(
        unknown_compose_variables(&typo),
        vec!["CONNECTOR_LIVESTREAM_ID"]
    );
}

/// `live` or any other word is not a stream OpenCTI knows for a regular connector user: the
/// example must not set one, and its commented placeholder must be recognisably one.
#[test]
fn the_compose_file_sets_no_made_up_live_stream_id() {
    for (name, value) in compose_environment(COMPOSE) {
        if name == keys::CONNECTOR_LIVE_STREAM_ID.env {
            assert!(
                uuid::Uuid::parse_str(&value).is_ok(),
                "{name}={value} is not the UUID of a live stream"
            );
        }
    }
    let placeholder = compose_commented_environment(COMPOSE)
        .into_iter()
        .find(|(name, _)| name == keys::CONNECTOR_LIVE_STREAM_ID.env)
        .expect("a commented CONNECTOR_LIVE_STREAM_ID placeholder");
    assert!(placeholder.1.starts_with("ChangeMe"), "{placeholder:?}");
}

#[test]
fn the_compose_environment_loads_once_the_placeholders_are_replaced() {
    let vars = compose_environment(COMPOSE);
    // As shipped, the connector id is a placeholder that must be replaced: refused by name.
    let refused = load_from_env(&vars).expect_err("the placeholder connector id is refused");
    assert!(refused.contains("CONNECTOR_ID"), "{refused}");

    let mut replaced: Vec<(String, String)> = vars
        .into_iter()
        .map(|(name, value)| match name.as_str() {
            "CONNECTOR_ID" => (name, SOME_UUID.to_string()),
            _ => (name, value),
        })
        .collect();
    let config = load_from_env(&replaced).expect("the compose environment loads");
    assert_eq!(
        config.connector.live_stream_id, None,
        "raw /stream by default"
    );

    // Uncommenting the live stream line with a real id gives a live stream.
    replaced.push(("CONNECTOR_LIVE_STREAM_ID".into(), SOME_UUID.into()));
    let config = load_from_env(&replaced).expect("with a live stream id");
    assert_eq!(config.connector.live_stream_id.as_deref(), Some(SOME_UUID));
}

#[test]
fn the_config_example_loads_and_sets_only_known_keys() {
    let config = Config::from_sources(Some(CONFIG_EXAMPLE), &|_| None)
        .expect("config.yml.example loads as it is");
    assert_eq!(config.unknown_keys, Vec::<String>::new());
    assert_eq!(config.connector.live_stream_id, None);
}

#[test]
fn the_check_catches_a_typo_in_the_config_example() {
    let typo = CONFIG_EXAMPLE.replace("  flush_interval_ms:", "  flush_intervall_ms:");
    assert_ne!(typo, CONFIG_EXAMPLE);
    let config = Config::from_sources(Some(&typo), &|_| None).expect("still loads");
    assert_eq!(config.unknown_keys, vec!["bridge.flush_intervall_ms"]);
}

/// Every key the bridge reads is set in the example, in its section, with its environment
/// variable named in the comment just above it: the example is the reference for both.
#[test]
fn the_config_example_documents_every_key_with_its_variable() {
    let root: Value = serde_yaml::from_str(CONFIG_EXAMPLE).unwrap();
    let lines: Vec<&str> = CONFIG_EXAMPLE.lines().collect();
    for key in keys::ALL {
        assert!(
            root[key.section].get(key.name).is_some(),
            "{} is not in config.yml.example",
            key.path
        );
        let at = lines
            .iter()
            .position(|l| l.trim_start().starts_with(&format!("{}:", key.name)))
            .unwrap_or_else(|| panic!("no line for {}", key.path));
        let comment: Vec<&str> = lines[..at]
            .iter()
            .rev()
            .take_while(|l| l.trim_start().starts_with('#'))
            .copied()
            .collect();
        assert!(
            comment.iter().any(|l| l.contains(key.env)),
            "the comment above {} does not name {}",
            key.path,
            key.env
        );
    }
}
