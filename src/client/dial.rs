//! Resolving and dialing targets on the agent, where the traffic leaves.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyproxy_proto::ErrorCode;
use tokio::net::TcpStream;

use super::acl::Acl;
use crate::proxy::failure_prefix;

/// A failed dial: the documented code and a message with a machine-readable prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DialError {
    pub code: ErrorCode,
    pub message: String,
}

impl DialError {
    fn forbidden(message: String) -> Self {
        DialError {
            code: ErrorCode::ForbiddenHost,
            message,
        }
    }

    fn failed(prefix: &str, detail: impl std::fmt::Display) -> Self {
        DialError {
            code: ErrorCode::ConnectionFailed,
            message: format!("{prefix} {detail}"),
        }
    }
}

fn classify(e: &std::io::Error, addr: SocketAddr) -> DialError {
    use std::io::ErrorKind::*;
    match e.kind() {
        ConnectionRefused => DialError::failed(failure_prefix::REFUSED, format!("{addr}: {e}")),
        TimedOut => DialError::failed(failure_prefix::TIMEOUT, format!("{addr}: {e}")),
        _ => DialError::failed(failure_prefix::UNREACHABLE, format!("{addr}: {e}")),
    }
}

/// Resolves `host`, checks the name and every address against the ACL, then connects
/// to the checked addresses in order within `timeout`. The addresses dialed are the
/// ones checked: no second lookup that DNS could answer differently.
pub async fn dial(
    acl: &Acl,
    host: &str,
    port: u16,
    timeout: Duration,
) -> Result<TcpStream, DialError> {
    acl.check_name(host, port).map_err(DialError::forbidden)?;
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let deadline = tokio::time::Instant::now() + timeout;
    let addrs: Vec<SocketAddr> = match bare.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => {
            let lookup = tokio::time::timeout_at(deadline, tokio::net::lookup_host((bare, port)))
                .await
                .map_err(|_| {
                    DialError::failed(failure_prefix::TIMEOUT, format!("resolving {host}"))
                })?;
            lookup
                .map_err(|e| DialError::failed(failure_prefix::DNS, format!("{host}: {e}")))?
                .collect()
        }
    };
    if addrs.is_empty() {
        return Err(DialError::failed(
            failure_prefix::DNS,
            format!("{host}: no addresses"),
        ));
    }
    for addr in &addrs {
        acl.check_addr(*addr, host).map_err(DialError::forbidden)?;
    }
    let mut last = None;
    for addr in addrs {
        match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Ok(Err(e)) => last = Some(classify(&e, addr)),
            Err(_) => {
                return Err(DialError::failed(
                    failure_prefix::TIMEOUT,
                    format!("{host}:{port}: no answer within {timeout:?}"),
                ))
            }
        }
    }
    Err(last.unwrap_or_else(|| DialError::failed(failure_prefix::UNREACHABLE, host)))
}
