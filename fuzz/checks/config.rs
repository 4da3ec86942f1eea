//! Operator input: the YAML configuration, pmproxy's `managers.toml` and
//! `server.toml`, parsed from text alone (nothing is read from disk). Never panics;
//! parsing is repeatable; an error is a message (a YAML error names where it is); and
//! what a `server.toml` yields can be used (its ACL, its timeouts) without panic.
//!
//! The first byte picks the format; the rest is the file.

use std::path::Path;

use anyproxy::config::{Config, ConfigError};
use anyproxy::policy::{ManagersConf, ServerConf};

pub fn check(data: &[u8]) {
    let Some((&format, text)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(text);
    match format % 3 {
        0 => yaml(&text),
        1 => {
            let first = ManagersConf::from_toml("managers.toml", &text);
            let again = ManagersConf::from_toml("managers.toml", &text);
            assert_eq!(format!("{first:?}"), format!("{again:?}"));
            if let Err(e) = first {
                assert!(e.to_string().starts_with("managers.toml"), "{e}");
            }
        }
        _ => {
            let first = ServerConf::from_toml("server.toml", &text);
            let again = ServerConf::from_toml("server.toml", &text);
            assert_eq!(format!("{first:?}"), format!("{again:?}"));
            match first {
                Ok(conf) => {
                    // Not `socket_addr`: it resolves host names.
                    let _ = conf.proxy.acl();
                    for server in [&conf.api.server, &conf.proxy.server] {
                        let _ = (server.read_timeout(), server.write_timeout());
                    }
                }
                Err(e) => assert!(!e.to_string().is_empty()),
            }
        }
    }
}

fn yaml(text: &str) {
    let origin = Path::new("fuzz.yaml");
    let first = Config::parse(text, origin);
    let again = Config::parse(text, origin);
    assert_eq!(format!("{first:?}"), format!("{again:?}"));
    match first {
        Ok(config) => {
            if let Some(client) = &config.client {
                let _ = client.gateways().count();
                let _ = client.admin();
            }
            if let Some(gateway) = &config.gateway {
                let _ = gateway.admin();
            }
        }
        Err(ConfigError::Invalid { path, at, message }) => {
            assert_eq!(path, origin);
            assert!(!at.is_empty() && !message.is_empty());
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}
