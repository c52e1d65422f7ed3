//! The one error type of configuration loading. Messages are written for the operator who
//! reads them on stderr before the daemon exits with code 2: each names the YAML key and its
//! environment variable, what was expected and what was found. The token's value is never
//! part of any variant, so no message can show it.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A configuration file given explicitly (argument or `CONFIG_FILE`) does not exist.
    #[error("configuration file {} does not exist (given by --config or CONFIG_FILE)", path.display())]
    FileNotFound { path: PathBuf },

    /// The configuration file exists but cannot be read.
    #[error("cannot read configuration file {}: {source}", path.display())]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The configuration file is not valid YAML.
    #[error("configuration file {} is not valid YAML: {source}", path.display())]
    ParseFile {
        path: PathBuf,
        #[source]
        source: serde_yaml::Error,
    },

    /// The top level of the configuration file is not a mapping of sections.
    #[error(
        "configuration file {}: expected a mapping of sections (opencti, connector, threatbus, bridge) at the top level, found {found}",
        path.display()
    )]
    NotAMapping { path: PathBuf, found: &'static str },

    /// A known section (`opencti`, `connector`, …) is not a mapping of keys.
    #[error("configuration file {}: section {section}: expected a mapping of keys, found {found}", path.display())]
    SectionNotAMapping {
        path: PathBuf,
        section: &'static str,
        found: &'static str,
    },

    /// A required key is set neither in the file nor in the environment.
    #[error("{key} (env {env}): required but not set")]
    Missing {
        key: &'static str,
        env: &'static str,
    },

    /// A required key is set, but to an empty (or blank) string.
    #[error("{key} (env {env}): required but empty")]
    Empty {
        key: &'static str,
        env: &'static str,
    },

    /// A YAML value has the wrong type (a sequence where a number belongs, …).
    #[error("{key} (env {env}): expected {expected}, found {found}")]
    WrongType {
        key: &'static str,
        env: &'static str,
        expected: String,
        /// The YAML type only, never the value.
        found: &'static str,
    },

    /// A value has an acceptable type but is not allowed (out of range, unknown word, …).
    #[error("{key} (env {env}): expected {expected}, found {found}")]
    Invalid {
        key: &'static str,
        env: &'static str,
        expected: String,
        /// The offending value, quoted when it was a string.
        found: String,
    },
}

impl ConfigError {
    /// The YAML key (`section.name`) the error is about, if it is about one key.
    pub fn key(&self) -> Option<&'static str> {
        match self {
            ConfigError::Missing { key, .. }
            | ConfigError::Empty { key, .. }
            | ConfigError::WrongType { key, .. }
            | ConfigError::Invalid { key, .. } => Some(key),
            _ => None,
        }
    }
}
