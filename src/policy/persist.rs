//! JSON state files in the state directory: written to a temporary file and renamed, so a
//! crash mid-write leaves the previous state, never half a file.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;
use serde::Serialize;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::PolicyConfigError;

pub fn write_json(path: &Path, value: &impl Serialize) -> std::io::Result<()> {
    let text = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// `Ok(None)` only when the file does not exist; a file that cannot be read or parsed is
/// an error, because starting from zero would silently wipe what it held.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, PolicyConfigError> {
    let state = |message: String| PolicyConfigError::State {
        path: PathBuf::from(path),
        message,
    };
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| state(format!("{e} (fix or remove the file)"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(state(e.to_string())),
    }
}

/// RFC 3339 in UTC, as Go's `time.Time` marshals.
pub fn format_time(t: SystemTime) -> String {
    let ns = super::managers::time_span::unix_ns(t);
    OffsetDateTime::from_unix_timestamp_nanos(ns)
        .ok()
        .and_then(|d| d.format(&Rfc3339).ok())
        .unwrap_or_else(|| "1970-01-01T00:00:00Z".to_string())
}

pub fn parse_time(s: &str) -> Option<SystemTime> {
    let ns = super::managers::time_span::parse_instant(s)?.unix_timestamp_nanos();
    if ns >= 0 {
        UNIX_EPOCH.checked_add(Duration::from_nanos(u64::try_from(ns).ok()?))
    } else {
        UNIX_EPOCH.checked_sub(Duration::from_nanos(u64::try_from(-ns).ok()?))
    }
}
