//! `parentProxy` and `netIface`: always true when reached, and they choose how the
//! request leaves. Only parsed and validated here; dialing belongs to the proxy.

use std::sync::Arc;

use crate::connect::{ParentProxy, ProxyScheme};
use crate::policy::config::{NetIfaceConf, ParentProxyConf};
use crate::policy::error::{At, PolicyConfigError};

/// Parses a `[[parentProxy]]` entry.
pub fn parent_proxy_from_conf(
    file: &str,
    c: &ParentProxyConf,
) -> Result<ParentProxy, PolicyConfigError> {
    let at = At {
        file,
        section: "[[parentProxy]]",
        name: &c.name,
    };
    let bad = |m: &str| at.err("proxyURL", format!("{:?}: {m}", c.proxy_url));
    let (scheme, rest) = c
        .proxy_url
        .split_once("://")
        .ok_or_else(|| bad("expected http://host:port or socks5://host:port"))?;
    let (scheme, default_port) = match scheme.to_ascii_lowercase().as_str() {
        "http" => (ProxyScheme::Http, 80),
        "socks5" | "socks5h" => (ProxyScheme::Socks5, 1080),
        _ => return Err(bad("scheme must be http, socks5 or socks5h")),
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains('/') || rest.contains('?') {
        return Err(bad("a proxy URL has no path"));
    }
    let (credentials, hostport) = match rest.rsplit_once('@') {
        Some((cred, hp)) => {
            let (u, p) = cred.split_once(':').unwrap_or((cred, ""));
            (Some((u.to_string(), p.to_string())), hp)
        }
        None => (None, rest),
    };
    let (host, port) = split_host_port(hostport).ok_or_else(|| bad("bad host or port"))?;
    Ok(ParentProxy {
        name: c.name.clone(),
        scheme,
        host,
        port: port.unwrap_or(default_port),
        credentials,
    })
}

fn split_host_port(s: &str) -> Option<(String, Option<u16>)> {
    if let Some(v6) = s.strip_prefix('[') {
        let (host, after) = v6.split_once(']')?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':')?.parse().ok()?),
        };
        return Some((host.to_string(), port));
    }
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) => (h, Some(p.parse().ok()?)),
        None => (s, None),
    };
    (!host.is_empty() && !host.contains(':')).then(|| (host.to_string(), port))
}

pub fn net_iface_from_conf(file: &str, c: &NetIfaceConf) -> Result<Arc<str>, PolicyConfigError> {
    let at = At {
        file,
        section: "[[netIface]]",
        name: &c.name,
    };
    // Linux interface names: 1..=15 bytes, no '/', whitespace or NUL (IFNAMSIZ).
    let ok = !c.iface.is_empty()
        && c.iface.len() <= 15
        && !c
            .iface
            .chars()
            .any(|ch| ch == '/' || ch.is_whitespace() || ch == '\0');
    if !ok {
        return Err(at.err("iface", format!("{:?} is not an interface name", c.iface)));
    }
    Ok(Arc::from(c.iface.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pp(url: &str) -> Result<ParentProxy, PolicyConfigError> {
        parent_proxy_from_conf(
            "managers.toml",
            &ParentProxyConf {
                name: "up".into(),
                proxy_url: url.into(),
            },
        )
    }

    #[test]
    fn proxy_urls() {
        let p = pp("http://proxy.lan:3128").unwrap();
        assert_eq!(
            (p.scheme, p.host.as_str(), p.port),
            (ProxyScheme::Http, "proxy.lan", 3128)
        );
        let p = pp("socks5://u:p@[::1]:1081/").unwrap();
        assert_eq!(
            (p.scheme, p.host.as_str(), p.port),
            (ProxyScheme::Socks5, "::1", 1081)
        );
        assert_eq!(p.credentials, Some(("u".into(), "p".into())));
        assert_eq!(pp("socks5://10.0.0.1").unwrap().port, 1080);
        for bad in [
            "ftp://x:1",
            "proxy:3128",
            "http://x:99999",
            "http://x:1/path",
            "http://",
        ] {
            let e = pp(bad).err().unwrap().to_string();
            assert!(
                e.starts_with("managers.toml: [[parentProxy]] \"up\": proxyURL: "),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn interface_names() {
        let c = |i: &str| NetIfaceConf {
            name: "wan".into(),
            iface: i.into(),
        };
        assert_eq!(&*net_iface_from_conf("m", &c("eth0")).unwrap(), "eth0");
        assert!(net_iface_from_conf("m", &c("")).is_err());
        assert!(net_iface_from_conf("m", &c("a/b")).is_err());
        assert!(net_iface_from_conf("m", &c("waytoolonginterface")).is_err());
    }
}
