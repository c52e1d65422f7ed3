//! The configuration reader (YAML text plus environment overrides) on a valid file whose
//! values are swapped for wrong types, out-of-range numbers, YAML's odd scalars, tags,
//! anchors and merge keys, then maybe damaged as text; with random environment overrides.
//! Every input gives a configuration or a typed [`ConfigError`], and neither ever shows
//! the token; an accepted configuration keeps every duration within the bound the reader
//! promises (the daemon adds them to `Instant`s).

use std::collections::BTreeMap;
use std::time::Duration;

use opencti_threatbus::config::keys::{self, Key};
use opencti_threatbus::config::{Config, ConfigError};
use proptest::prelude::*;
use proptest::sample::Index;

use crate::guard::{self, guarded};
use crate::json;

/// Never otherwise generated (no other value starts with `tok-`), so finding it in an
/// output means the token leaked.
fn token() -> impl Strategy<Value = String> {
    "tok-[A-Za-z0-9]{12,20}"
}

/// Every required key with a valid value (the file the mutations start from).
fn required(token: &str) -> Vec<(Key, String)> {
    vec![
        (keys::OPENCTI_URL, "http://opencti:8080".to_owned()),
        (keys::OPENCTI_TOKEN, token.to_owned()),
        (
            keys::CONNECTOR_ID,
            "6f0c3a52-4c1e-4b7a-9f1e-2d3c4b5a6978".to_owned(),
        ),
        (keys::CONNECTOR_TYPE, "STREAM".to_owned()),
        (keys::CONNECTOR_NAME, "Threat Bus".to_owned()),
        (keys::CONNECTOR_SCOPE, "threatbus".to_owned()),
        (keys::CONNECTOR_CONFIDENCE_LEVEL, "15".to_owned()),
        (keys::CONNECTOR_LOG_LEVEL, "info".to_owned()),
        (keys::CONNECTOR_ENTITY_NAME, "Threat Bus".to_owned()),
        (keys::CONNECTOR_ENTITY_DESCRIPTION, "Sightings".to_owned()),
        (keys::THREATBUS_ZMQ_HOST, "threatbus".to_owned()),
        (keys::THREATBUS_ZMQ_PORT, "13370".to_owned()),
    ]
}

/// YAML scalar (or flow collection, tag, alias) text for one value.
fn yaml_value() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(vec![
            "true", "false", "yes", "No", "on", "~", "null", "''", "\"\"", "' '", "0", "1", "-1",
            "15", "100", "101", "65535", "65536", "4294967296", "18446744073709551615",
            "18446744073709551616", "-9223372036854775809", "1e309", "-.inf", ".nan", "0x1F",
            "0o17", "1_000", "3.5", "-0.0", "0.5", "[1, 2]", "{a: 1}", "[]", "{}",
            "!!binary aGk=", "!custom x", "!!str 5", "!!int '7'", "*nowhere", "&here 5",
            "http://localhost:8080", "https://", "HTTPS://X/", "ftp://x", "debug", "INFO",
            "json", "Text", "echo", "none", "STREAM", "stream",
            "9b2a7f0e-3c1d-4e5f-8a9b-0c1d2e3f4a5b", "00000000-0000-0000-0000-000000000000",
            "\"\\u0000\"", "\"\\uD800\"", "\"🦀 日本語 \\u202e\"",
            "2024-03-01T10:00:00Z", "2024-02-30", "1709287215731-0",
        ])
        .prop_map(str::to_owned),
        2 => "[a-zA-Z0-9 ._:/-]{0,16}",
        1 => "\\PC{0,12}".prop_map(|s| format!("{s:?}")),
        1 => any::<i64>().prop_map(|n| n.to_string()),
        1 => any::<f64>().prop_map(|f| f.to_string()),
        1 => (0usize..1024).prop_map(|n| format!("\"{}\"", "x".repeat(n))),
    ]
}

/// The env text for an override: what a shell can put into a variable.
fn env_value() -> impl Strategy<Value = String> {
    prop_oneof![
        yaml_value(),
        "\\PC{0,16}",
        prop::sample::select(vec!["", " ", "\t\n"]).prop_map(str::to_owned),
    ]
}

#[derive(Debug, Clone)]
enum Edit {
    Remove(Index),
    Set(Index, String),
    /// A key no part of the bridge reads, in a known or unknown section.
    Unknown(String, String),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        1 => any::<Index>().prop_map(Edit::Remove),
        4 => (any::<Index>(), yaml_value()).prop_map(|(i, v)| Edit::Set(i, v)),
        1 => ("[a-z_]{1,10}", yaml_value()).prop_map(|(k, v)| Edit::Unknown(k, v)),
    ]
}

/// The file's shape around the entries: plain sections, a section that is not a mapping,
/// or sections built from an anchor and `<<:` merge keys.
#[derive(Debug, Clone)]
enum Layout {
    Plain,
    SectionScalar(Index, String),
    Merged,
    TopLevelScalar(String),
}

fn layout() -> impl Strategy<Value = Layout> {
    prop_oneof![
        6 => Just(Layout::Plain),
        1 => (any::<Index>(), yaml_value()).prop_map(|(i, v)| Layout::SectionScalar(i, v)),
        1 => Just(Layout::Merged),
        1 => yaml_value().prop_map(Layout::TopLevelScalar),
    ]
}

fn render(entries: &[(Key, String)], unknown: &[(String, String)], layout: &Layout) -> String {
    let mut yaml = String::new();
    if let Layout::TopLevelScalar(value) = layout {
        return value.clone();
    }
    if let Layout::Merged = layout {
        yaml.push_str("defaults: &defaults\n  ssl_verify: yes\n  zmq_port: 13370\n");
    }
    for (i, section) in keys::SECTIONS.iter().enumerate() {
        if let Layout::SectionScalar(index, value) = layout {
            if index.index(keys::SECTIONS.len()) == i {
                yaml.push_str(&format!("{section}: {value}\n"));
                continue;
            }
        }
        yaml.push_str(&format!("{section}:\n"));
        if let Layout::Merged = layout {
            yaml.push_str("  <<: *defaults\n");
        }
        for (key, value) in entries.iter().filter(|(k, _)| k.section == *section) {
            yaml.push_str(&format!("  {}: {}\n", key.name, value));
        }
    }
    for (name, value) in unknown {
        yaml.push_str(&format!("{name}:\n  {name}: {value}\n"));
    }
    yaml
}

/// Every duration the configuration holds: all must stay within a year, the bound the
/// reader enforces so that `Instant + duration` never overflows.
fn durations(config: &Config) -> [Duration; 6] {
    [
        config.connector.stream_timeout,
        config.connector.ping_interval,
        config.bridge.flush_interval,
        config.bridge.retry_initial,
        config.bridge.retry_max,
        config.bridge.confirm_timeout,
    ]
}

fn check(result: &Result<Config, ConfigError>, token: &str) -> Result<(), TestCaseError> {
    match result {
        Ok(config) => {
            prop_assert!(!format!("{config:?}").contains(token), "the token in Debug");
            let year = Duration::from_secs(365 * 24 * 3600);
            for (i, duration) in durations(config).iter().enumerate() {
                prop_assert!(*duration <= year, "duration {} is {:?}", i, duration);
            }
            prop_assert!(config.bridge.retry_initial <= config.bridge.retry_max);
            prop_assert!(config.threatbus.zmq_port >= 1);
        }
        Err(error) => {
            prop_assert!(!error.to_string().contains(token), "the token in {}", error);
            prop_assert!(
                !format!("{error:?}").contains(token),
                "the token in {:?}",
                error
            );
            let _ = error.key();
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(guard::config())]

    /// A mutated configuration file with environment overrides reads or fails typed.
    #[test]
    fn config_reads_or_fails_typed(
        token in token(),
        edits in prop::collection::vec(edit(), 0..4),
        layout in layout(),
        damage in json::text_damage(),
        env in prop::collection::vec((any::<Index>(), env_value()), 0..4),
        env_token in any::<bool>(),
        no_file in prop::bool::weighted(0.1),
    ) {
        let mut entries = required(&token);
        let mut unknown = Vec::new();
        for edit in &edits {
            match edit {
                Edit::Remove(i) => {
                    let key = keys::ALL[i.index(keys::ALL.len())];
                    entries.retain(|(k, _)| *k != key);
                }
                Edit::Set(i, value) => {
                    let key = keys::ALL[i.index(keys::ALL.len())];
                    entries.retain(|(k, _)| *k != key);
                    // Never put the token somewhere else: it must be findable only where
                    // it belongs, to detect a leak.
                    entries.push((key, value.clone()));
                }
                Edit::Unknown(name, value) => unknown.push((name.clone(), value.clone())),
            }
        }
        let yaml = json::damage(render(&entries, &unknown, &layout), &damage);
        let mut env: BTreeMap<String, String> = env
            .into_iter()
            .map(|(i, v)| (keys::ALL[i.index(keys::ALL.len())].env.to_owned(), v))
            .collect();
        if env_token || no_file {
            env.insert(keys::OPENCTI_TOKEN.env.to_owned(), token.clone());
        }
        guarded("Config::from_sources", move || -> Result<(), TestCaseError> {
            let lookup = |name: &str| env.get(name).cloned();
            let file = (!no_file).then_some(yaml.as_str());
            check(&Config::from_sources(file, &lookup), &token)
        })?;
    }

    /// Arbitrary text as the configuration file: YAML's whole syntax, not only values.
    #[test]
    fn any_text_as_config_file_fails_typed(
        text in prop_oneof![
            "[ -~\n\t]{0,200}",
            "[:\\-\\[\\]{}&*!|>'\"%@` \na-z0-9#,?<]{0,120}",
            "\\PC{0,80}",
        ],
    ) {
        guarded("Config::from_sources", move || -> Result<(), TestCaseError> {
            let no_env = |_: &str| None;
            let _ = Config::from_sources(Some(&text), &no_env).map_err(|e| e.to_string());
            Ok(())
        })?;
    }
}
