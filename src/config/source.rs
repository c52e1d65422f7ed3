//! Where values come from (the YAML file, the environment) and how a raw value becomes a
//! typed one. The environment wins over the file, key by key, as in pycti's
//! `get_config_variable`: a variable that is set — even to an empty string — replaces the
//! file's value.

use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

use serde_yaml::{Mapping, Number, Value};

use super::error::ConfigError;
use super::keys::{self, Key};

/// Looks an environment variable up; injectable so tests never touch the real environment.
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The parsed configuration file. Sections are checked when a key is read from them, so that
/// `load_data_dir` is not failed by a malformed section it does not need.
#[derive(Debug)]
pub struct FileValues {
    path: PathBuf,
    root: Mapping,
}

impl FileValues {
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let parse_error = |source| ConfigError::ParseFile {
            path: path.to_path_buf(),
            source,
        };
        let mut value: Value = serde_yaml::from_str(text).map_err(parse_error)?;
        // Anchors and `<<:` merge keys are common in compose-style YAML; resolve them
        // rather than reporting `<<` as an unknown key.
        value.apply_merge().map_err(parse_error)?;
        let root = match value {
            // An empty file, or one with only comments: everything comes from the environment.
            Value::Null => Mapping::new(),
            Value::Mapping(root) => root,
            other => {
                return Err(ConfigError::NotAMapping {
                    path: path.to_path_buf(),
                    found: type_name(&other),
                })
            }
        };
        Ok(FileValues {
            path: path.to_path_buf(),
            root,
        })
    }

    pub fn value(&self, key: Key) -> Result<Option<&Value>, ConfigError> {
        match self.root.get(key.section) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Mapping(section)) => Ok(section.get(key.name)),
            Some(other) => Err(ConfigError::SectionNotAMapping {
                path: self.path.clone(),
                section: key.section,
                found: type_name(other),
            }),
        }
    }

    /// Keys of the file that no part of the bridge reads (`section` or `section.key`).
    pub fn unknown_keys(&self) -> Vec<String> {
        let mut unknown = Vec::new();
        for (name, value) in &self.root {
            let name = key_text(name);
            match keys::SECTIONS.iter().find(|s| **s == name) {
                None => unknown.push(name),
                Some(section) => unknown.extend(unknown_in_section(section, value)),
            }
        }
        unknown
    }
}

fn unknown_in_section(section: &str, value: &Value) -> Vec<String> {
    let Value::Mapping(entries) = value else {
        return Vec::new();
    };
    entries
        .keys()
        .map(key_text)
        .filter(|name| !keys::is_known(section, name))
        .map(|name| format!("{section}.{name}"))
        .collect()
}

fn key_text(key: &Value) -> String {
    match key {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        other => format!("<{}>", type_name(other)),
    }
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a sequence",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

/// A key's value before interpretation.
enum Raw {
    /// In neither source, or YAML `null`.
    Absent,
    /// An empty or blank string: "not set" for optional keys, an error for required ones.
    Empty,
    Text(String),
    Bool(bool),
    Number(Number),
    /// A sequence, mapping or tagged value: never valid for any key.
    Other(&'static str),
}

impl Raw {
    fn from_text(text: String) -> Raw {
        if text.trim().is_empty() {
            Raw::Empty
        } else {
            Raw::Text(text)
        }
    }

    fn from_yaml(value: &Value) -> Raw {
        match value {
            Value::Null => Raw::Absent,
            Value::Bool(b) => Raw::Bool(*b),
            Value::Number(n) => Raw::Number(n.clone()),
            Value::String(s) => Raw::from_text(s.clone()),
            other => Raw::Other(type_name(other)),
        }
    }

    fn type_name(&self) -> &'static str {
        match self {
            Raw::Absent => "null",
            Raw::Empty => "an empty string",
            Raw::Text(_) => "a string",
            Raw::Bool(_) => "a boolean",
            Raw::Number(_) => "a number",
            Raw::Other(name) => name,
        }
    }
}

/// Quotes a string value for an error message, shortened so a pasted blob stays one line.
pub fn quote(text: &str) -> String {
    const MAX_CHARS: usize = 80;
    if text.chars().count() <= MAX_CHARS {
        return format!("{text:?}");
    }
    let head: String = text.chars().take(MAX_CHARS).collect();
    format!("{head:?}…")
}

pub fn invalid(key: Key, expected: impl Into<String>, found: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.path,
        env: key.env,
        expected: expected.into(),
        found: found.into(),
    }
}

fn wrong_type(key: Key, expected: impl Into<String>, raw: &Raw) -> ConfigError {
    ConfigError::WrongType {
        key: key.path,
        env: key.env,
        expected: expected.into(),
        found: raw.type_name(),
    }
}

/// The file (if any) and the environment, read key by key with the environment first.
pub struct Sources<'a> {
    pub file: Option<&'a FileValues>,
    pub env: EnvLookup<'a>,
}

impl Sources<'_> {
    fn raw(&self, key: Key) -> Result<Raw, ConfigError> {
        if let Some(text) = (self.env)(key.env) {
            return Ok(Raw::from_text(text));
        }
        let Some(file) = self.file else {
            return Ok(Raw::Absent);
        };
        Ok(file.value(key)?.map_or(Raw::Absent, Raw::from_yaml))
    }

    /// Reads `key`: `default` when it is not set, or the "required" errors when there is no
    /// default; `parse` interprets a value that is set.
    fn read<T>(
        &self,
        key: Key,
        default: Option<T>,
        parse: impl FnOnce(Raw) -> Result<T, ConfigError>,
    ) -> Result<T, ConfigError> {
        match (self.raw(key)?, default) {
            (Raw::Absent | Raw::Empty, Some(default)) => Ok(default),
            (Raw::Absent, None) => Err(ConfigError::Missing {
                key: key.path,
                env: key.env,
            }),
            (Raw::Empty, None) => Err(ConfigError::Empty {
                key: key.path,
                env: key.env,
            }),
            (raw, _) => parse(raw),
        }
    }

    pub fn required_text(&self, key: Key) -> Result<String, ConfigError> {
        self.read(key, None, |raw| as_text(key, raw))
    }

    pub fn optional_text(&self, key: Key) -> Result<Option<String>, ConfigError> {
        self.read(key, Some(None), |raw| as_text(key, raw).map(Some))
    }

    pub fn boolean(&self, key: Key, default: bool) -> Result<bool, ConfigError> {
        self.read(key, Some(default), |raw| as_bool(key, raw))
    }

    /// An integer within `range`, narrowed to the field's type.
    pub fn integer<T: TryFrom<u64>>(
        &self,
        key: Key,
        default: Option<T>,
        range: RangeInclusive<u64>,
    ) -> Result<T, ConfigError> {
        self.read(key, default, |raw| {
            let value = as_integer(key, raw, &range)?;
            T::try_from(value).map_err(|_| invalid(key, describe(&range), value.to_string()))
        })
    }

    /// A finite number of at least `min`.
    pub fn float(&self, key: Key, default: f64, min: f64) -> Result<f64, ConfigError> {
        self.read(key, Some(default), |raw| as_float(key, raw, min))
    }

    /// One of a fixed set of words, compared case-insensitively.
    pub fn choice<T: Copy>(
        &self,
        key: Key,
        default: Option<T>,
        options: &[(&str, T)],
        expected: &str,
    ) -> Result<T, ConfigError> {
        self.read(key, default, |raw| {
            let text = match raw {
                Raw::Text(text) => text,
                other => return Err(wrong_type(key, expected, &other)),
            };
            options
                .iter()
                .find(|(word, _)| word.eq_ignore_ascii_case(text.trim()))
                .map(|(_, value)| *value)
                .ok_or_else(|| invalid(key, expected, quote(&text)))
        })
    }
}

/// Numbers are accepted as text (`name: 2024` is a YAML number), booleans are not: `true`
/// where a name or host belongs is almost certainly a mistake.
fn as_text(key: Key, raw: Raw) -> Result<String, ConfigError> {
    match raw {
        Raw::Text(text) => Ok(text),
        Raw::Number(n) => Ok(n.to_string()),
        other => Err(wrong_type(key, "a string", &other)),
    }
}

/// `yes`/`no` are accepted as pycti accepts them, so existing deployments keep working.
fn as_bool(key: Key, raw: Raw) -> Result<bool, ConfigError> {
    const EXPECTED: &str = "a boolean (true or false)";
    match raw {
        Raw::Bool(b) => Ok(b),
        Raw::Text(text) => match text.trim().to_ascii_lowercase().as_str() {
            "true" | "yes" => Ok(true),
            "false" | "no" => Ok(false),
            _ => Err(invalid(key, EXPECTED, quote(&text))),
        },
        other => Err(wrong_type(key, EXPECTED, &other)),
    }
}

fn describe(range: &RangeInclusive<u64>) -> String {
    if *range.end() == u64::MAX {
        format!("an integer >= {}", range.start())
    } else {
        format!("an integer between {} and {}", range.start(), range.end())
    }
}

fn as_integer(key: Key, raw: Raw, range: &RangeInclusive<u64>) -> Result<u64, ConfigError> {
    let (value, found) = match raw {
        Raw::Number(n) => (n.as_u64(), n.to_string()),
        Raw::Text(text) => (text.trim().parse::<u64>().ok(), quote(&text)),
        other => return Err(wrong_type(key, describe(range), &other)),
    };
    match value {
        Some(value) if range.contains(&value) => Ok(value),
        _ => Err(invalid(key, describe(range), found)),
    }
}

fn as_float(key: Key, raw: Raw, min: f64) -> Result<f64, ConfigError> {
    let expected = format!("a finite number >= {min:?}");
    let (value, found) = match raw {
        Raw::Number(n) => (n.as_f64(), n.to_string()),
        Raw::Text(text) => (text.trim().parse::<f64>().ok(), quote(&text)),
        other => return Err(wrong_type(key, expected, &other)),
    };
    match value {
        Some(value) if value.is_finite() && value >= min => Ok(value),
        _ => Err(invalid(key, expected, found)),
    }
}
