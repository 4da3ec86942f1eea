//! The `log:` section: how much the process logs and in which shape. It applies to
//! whichever of gateway and agent the file starts; `RUST_LOG` overrides the level.

use serde::{Deserialize, Deserializer};

use super::ConfigError;

/// Line format of the log on stderr.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One readable line per event, `key=value` fields.
    #[default]
    Human,
    /// One JSON object per line, fields as keys, for log shippers.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "human" => Ok(LogFormat::Human),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("{other:?} is not a log format (human or json)")),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// A level (`info`) or `tracing` filter directives (`info,access=off`).
    #[serde(default = "default_level", deserialize_with = "filter")]
    pub level: String,
    #[serde(default)]
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: default_level(),
            format: LogFormat::default(),
        }
    }
}

fn default_level() -> String {
    "info".into()
}

/// Checked while the file is read, so a typo fails at start, not silently logs nothing.
fn filter<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = String::deserialize(d)?;
    check_filter(&s).map_err(serde::de::Error::custom)?;
    Ok(s)
}

pub fn check_filter(s: &str) -> Result<(), ConfigError> {
    tracing_subscriber::EnvFilter::builder()
        .parse(s)
        .map(drop)
        .map_err(|e| ConfigError::Semantic(format!("log.level {s:?}: {e}")))
}

/// The running process's log filter, as the binary that installed the subscriber
/// exposes it: a reload applies `log.level` through it.
pub trait LevelSwitch: Send + Sync {
    /// The filter in force.
    fn current(&self) -> String;
    /// `RUST_LOG` chose the filter at start: the file's level does not apply.
    fn overridden(&self) -> bool;
    /// Replaces the filter; `filter` was checked by [`check_filter`].
    fn set(&self, filter: &str) -> Result<(), String>;
}

/// A reload's `log.level`, applied through `switch` when the binary handed one over
/// and `RUST_LOG` did not choose the filter at start; one line says what happened.
pub fn apply_level(switch: Option<&std::sync::Arc<dyn LevelSwitch>>, log: &LogConfig) {
    let Some(switch) = switch else {
        return;
    };
    if switch.current() == log.level {
        return;
    }
    if switch.overridden() {
        tracing::warn!(
            level = %log.level,
            "log.level changed in the file, but RUST_LOG chose the filter at start; it stays"
        );
        return;
    }
    match switch.set(&log.level) {
        Ok(()) => tracing::info!(level = %log.level, "log level changed"),
        Err(e) => tracing::warn!(level = %log.level, error = %e, "log level not changed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_and_directives_parse_and_typos_fail() {
        for ok in ["info", "debug", "warn,access=off", "anyproxy=trace"] {
            assert!(check_filter(ok).is_ok(), "{ok}");
        }
        assert!(check_filter("loud=[").is_err());
        assert_eq!("json".parse::<LogFormat>(), Ok(LogFormat::Json));
        assert!("xml".parse::<LogFormat>().is_err());
    }
}
