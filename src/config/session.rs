//! What both ends of a session configure alike, under `gateway:` and `client:`: the
//! heartbeat, the binary window and the JSON buffer, the message size, the drain at
//! shutdown and the encoding names, with their defaults and their checks.

use std::time::Duration;

use anyproxy_proto::Encoding;
use serde::Deserialize;

use super::ConfigError;
use crate::net::{ByteSize, HumanDuration};

/// An hour: long enough for an idle SSH or database session a user comes back to, and
/// a bound on what a leaked connection (a client that vanished without a FIN) holds.
pub(super) fn default_conn_idle_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(3600))
}

/// Two missed heartbeats at the default `ping_interval` (15 s): a dead peer is noticed
/// within half a minute.
pub(super) fn default_idle_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}

pub(super) fn default_drain_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}

pub(super) fn default_max_message() -> ByteSize {
    ByteSize(2 << 20)
}

pub(super) fn default_stall_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}

pub(super) fn default_json_conn_buffer() -> ByteSize {
    ByteSize(4 << 20)
}

pub(super) fn default_ping_interval() -> HumanDuration {
    HumanDuration(Duration::from_secs(15))
}

pub(super) fn default_max_window() -> ByteSize {
    ByteSize(8 << 20)
}

/// The window is carried in a u32 on the wire; keep it well clear of that.
const MAX_WINDOW_LIMIT: u64 = 1 << 30;

pub(super) fn check_max_window(key: &str, w: ByteSize) -> Result<(), ConfigError> {
    let min = u64::from(anyproxy_proto::INITIAL_WINDOW);
    if w.0 < min || w.0 > MAX_WINDOW_LIMIT {
        return Err(ConfigError::Semantic(format!(
            "{key} must be between {min} bytes (the initial window) and 1GiB, got {}",
            w.0
        )));
    }
    Ok(())
}

/// Below one read's worth a connection would stall on its first message; the ceiling
/// is the same as the window's.
pub(super) fn check_json_conn_buffer(key: &str, b: ByteSize) -> Result<(), ConfigError> {
    const MIN: u64 = 64 << 10;
    if b.0 < MIN || b.0 > MAX_WINDOW_LIMIT {
        return Err(ConfigError::Semantic(format!(
            "{key} must be between 64KiB and 1GiB, got {} bytes",
            b.0
        )));
    }
    Ok(())
}

/// A peer that answers every heartbeat must never be taken for dead.
pub(super) fn check_heartbeat(
    section: &str,
    ping: HumanDuration,
    idle: HumanDuration,
) -> Result<(), ConfigError> {
    if idle.0 <= ping.0 {
        return Err(ConfigError::Semantic(format!(
            "{section}.idle_timeout ({:?}) must be longer than {section}.ping_interval ({:?})",
            idle.0, ping.0
        )));
    }
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EncodingName {
    Binary,
    Json,
}

impl From<EncodingName> for Encoding {
    fn from(e: EncodingName) -> Encoding {
        match e {
            EncodingName::Binary => Encoding::Binary,
            EncodingName::Json => Encoding::Json,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::Config;

    #[test]
    fn lifecycle_defaults_and_checks() {
        let gw = "gateway:\n  listen_addr: '127.0.0.1:9'\n  tls_cert: a\n  tls_key: b\n  auth_username: u\n  auth_password: p\n";
        let g = Config::parse(gw, Path::new("x.yaml"))
            .unwrap()
            .gateway
            .unwrap();
        assert_eq!(g.idle_timeout.0, Duration::from_secs(30));
        assert_eq!(g.drain_timeout.0, Duration::from_secs(30));
        assert!(g.client_ca.is_none());
        let err = Config::parse(
            &format!("{gw}  ping_interval: 2s\n  idle_timeout: 2s\n"),
            Path::new("x.yaml"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("gateway.idle_timeout"), "{err}");

        let client = "client:\n  gateway_addr: 'g:1'\n  client_id: c\n  auth_username: u\n  auth_password: p\n";
        let c = Config::parse(client, Path::new("x.yaml"))
            .unwrap()
            .client
            .unwrap();
        assert_eq!(c.idle_timeout.0, Duration::from_secs(30));
        assert_eq!(c.drain_timeout.0, Duration::from_secs(30));
        let err = Config::parse(
            &format!("{client}  tls_client_cert: c.pem\n"),
            Path::new("x.yaml"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("go together"), "{err}");
    }
}
