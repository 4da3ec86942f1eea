//! Direct egress for the standalone proxy: dial the target from this process with the
//! agent's dialer (through a parent proxy or bound to an interface when the policy says
//! so); the relay is the one in `tunnel::relay`.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::acl::Acl;
use super::dial_from;
use crate::connect::{
    ConnectError, Connector, Egress, ParentProxy, ProxyScheme, Requester, Upstream,
};
use crate::net::HostPort;
use crate::tunnel::DirectTimeouts;

/// Dials targets itself, honouring the request's egress. `acl` is checked on the
/// target's name and on every address it resolves to, and only checked addresses are
/// dialed (a parent proxy, configured by the operator, is not checked: it resolves the
/// target itself, and the name was checked).
pub struct DirectConnector {
    pub dial_timeout: Duration,
    pub acl: Acl,
    /// How the relays of what it dials end stalls (pmproxy's readTimeout/writeTimeout).
    pub timeouts: DirectTimeouts,
}

impl Connector for DirectConnector {
    async fn connect(&self, target: &HostPort, who: &Requester) -> Result<Upstream, ConnectError> {
        target.validate()?;
        // Checked here too (the dialer checks it again) because a parent proxy's path
        // never reaches the dialer with the target's name.
        self.acl
            .check_name(&target.host, target.port)
            .map_err(ConnectError::Forbidden)?;
        // Through a parent proxy the addresses are never seen here, so the name check is
        // all there is: refuse the IP spellings only a resolver understands (`127.1`,
        // `2130706433`, `0x7f000001`), which would slip past it as "names". No real host
        // name ends in a numeric label.
        if who.egress.proxy.is_some() && !self.acl.is_empty() && numeric_spelling(&target.host) {
            return Err(ConnectError::Forbidden(format!(
                "{} is an address in a form that cannot be checked before a parent proxy resolves it",
                target.host
            )));
        }
        let dial = dial(target, &who.egress, &self.acl, self.dial_timeout);
        let stream = tokio::time::timeout(self.dial_timeout, dial)
            .await
            .map_err(|_| {
                ConnectError::TimedOut(format!(
                    "no answer from {target} in {:?}",
                    self.dial_timeout
                ))
            })??;
        let _ = stream.set_nodelay(true);
        Ok(Upstream::direct_within(stream, self.timeouts))
    }
}

async fn dial(
    target: &HostPort,
    egress: &Egress,
    acl: &Acl,
    timeout: Duration,
) -> Result<TcpStream, ConnectError> {
    let iface = egress.iface.as_deref();
    match &egress.proxy {
        Some(parent) => via_parent(parent, target, iface, timeout).await,
        None => Ok(dial_from(acl, &target.host, target.port, timeout, iface).await?),
    }
}

/// A host whose last label is all digits or `0x` hex but that is not a canonical IP
/// (those the ACL checks as addresses): an IPv4 address in one of the legacy
/// `inet_aton` forms, not a name.
fn numeric_spelling(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if bare.parse::<std::net::IpAddr>().is_ok() {
        return false;
    }
    let last = host.trim_end_matches('.').rsplit('.').next().unwrap_or("");
    let hex = last
        .strip_prefix("0x")
        .or_else(|| last.strip_prefix("0X"))
        .is_some_and(|h| h.bytes().all(|b| b.is_ascii_hexdigit()));
    hex || (!last.is_empty() && last.bytes().all(|b| b.is_ascii_digit()))
}

/// Opens the target through an HTTP (CONNECT) or SOCKS5 parent proxy.
async fn via_parent(
    parent: &ParentProxy,
    target: &HostPort,
    iface: Option<&str>,
    timeout: Duration,
) -> Result<TcpStream, ConnectError> {
    // The operator configured the parent: it is not subject to the users' ACL.
    let unrestricted = Acl::default();
    let mut s = dial_from(&unrestricted, &parent.host, parent.port, timeout, iface).await?;
    let fail = |m: String| ConnectError::Unreachable(format!("parent proxy {}: {m}", parent.name));
    match parent.scheme {
        ProxyScheme::Http => {
            let mut req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
            if let Some((u, p)) = &parent.credentials {
                use base64::Engine;
                let token = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
                req.push_str(&format!("Proxy-Authorization: Basic {token}\r\n"));
            }
            req.push_str("\r\n");
            s.write_all(req.as_bytes())
                .await
                .map_err(|e| fail(e.to_string()))?;
            // Read the response head byte by byte: nothing past it may be consumed.
            let mut head = Vec::with_capacity(256);
            while !head.ends_with(b"\r\n\r\n") {
                if head.len() > 8192 {
                    return Err(fail("response head too large".into()));
                }
                let b = s.read_u8().await.map_err(|e| fail(e.to_string()))?;
                head.push(b);
            }
            let status = std::str::from_utf8(&head)
                .ok()
                .and_then(|h| h.split_whitespace().nth(1))
                .and_then(|c| c.parse::<u16>().ok())
                .unwrap_or(0);
            match status {
                200..=299 => Ok(s),
                403 => Err(ConnectError::Forbidden(format!(
                    "parent proxy {} refused {target}",
                    parent.name
                ))),
                _ => Err(fail(format!("answered {status} to CONNECT {target}"))),
            }
        }
        ProxyScheme::Socks5 => {
            let auth = parent.credentials.is_some();
            s.write_all(&[5, 1, if auth { 2 } else { 0 }])
                .await
                .map_err(|e| fail(e.to_string()))?;
            let mut choice = [0u8; 2];
            s.read_exact(&mut choice)
                .await
                .map_err(|e| fail(e.to_string()))?;
            if let (Some((u, p)), 2) = (&parent.credentials, choice[1]) {
                let mut msg = vec![1, u.len().min(255) as u8];
                msg.extend_from_slice(&u.as_bytes()[..u.len().min(255)]);
                msg.push(p.len().min(255) as u8);
                msg.extend_from_slice(&p.as_bytes()[..p.len().min(255)]);
                s.write_all(&msg).await.map_err(|e| fail(e.to_string()))?;
                let mut status = [0u8; 2];
                s.read_exact(&mut status)
                    .await
                    .map_err(|e| fail(e.to_string()))?;
                if status[1] != 0 {
                    return Err(fail("refused our credentials".into()));
                }
            } else if choice[1] != 0 {
                return Err(fail(format!(
                    "offered no usable method ({:#04x})",
                    choice[1]
                )));
            }
            let host = target.host.as_bytes();
            let mut req = vec![5, 1, 0, 3, host.len() as u8];
            req.extend_from_slice(host);
            req.extend_from_slice(&target.port.to_be_bytes());
            s.write_all(&req).await.map_err(|e| fail(e.to_string()))?;
            let mut reply = [0u8; 4];
            s.read_exact(&mut reply)
                .await
                .map_err(|e| fail(e.to_string()))?;
            // Skip the bound address so the stream starts at the target's first byte.
            let skip = match reply[3] {
                1 => 4 + 2,
                4 => 16 + 2,
                3 => s.read_u8().await.map_err(|e| fail(e.to_string()))? as usize + 2,
                other => return Err(fail(format!("bad address type {other:#04x} in its reply"))),
            };
            let mut rest = vec![0u8; skip];
            s.read_exact(&mut rest)
                .await
                .map_err(|e| fail(e.to_string()))?;
            match reply[1] {
                0 => Ok(s),
                2 => Err(ConnectError::Forbidden(format!(
                    "parent proxy {} refused {target}",
                    parent.name
                ))),
                5 => Err(ConnectError::Refused(format!(
                    "parent proxy {}: {target} refused",
                    parent.name
                ))),
                code => Err(fail(format!("reply {code:#04x} for {target}"))),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::numeric_spelling;

    #[test]
    fn legacy_ipv4_spellings_are_numeric_and_names_are_not() {
        for host in [
            "127.1",
            "2130706433",
            "0x7f000001",
            "0177.0.0.1",
            "1.2.3.4.",
        ] {
            assert!(numeric_spelling(host), "{host}");
        }
        for host in [
            "example.com",
            "a1.b2",
            "0xfoo.example",
            "localhost",
            "x.0xz",
            // Canonical IPs: the ACL checks these as addresses itself.
            "10.0.0.1",
            "::1",
            "[::1]",
        ] {
            assert!(!numeric_spelling(host), "{host}");
        }
    }
}
