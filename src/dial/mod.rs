//! Where traffic leaves: the ACL (`acl`), resolving and dialing a target with every
//! resolved address checked (this file), and the standalone proxy's direct egress
//! (`direct`: interfaces and parent proxies).

pub mod acl;
pub mod direct;
pub mod udp;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyproxy_proto::{ErrorCode, Protocol};
use tokio::net::{TcpSocket, TcpStream};

use crate::connect::ConnectError;
use crate::tunnel::ConnectFailure;

use crate::net::FailureKind;
use acl::Acl;

/// A failed dial: the documented code and a message with a machine-readable prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DialError {
    pub code: ErrorCode,
    pub message: String,
}

impl DialError {
    pub fn forbidden(message: String) -> Self {
        DialError {
            code: ErrorCode::ForbiddenHost,
            message,
        }
    }

    pub fn internal(message: String) -> Self {
        DialError {
            code: ErrorCode::InternalError,
            message,
        }
    }

    pub fn failed(kind: FailureKind, detail: impl std::fmt::Display) -> Self {
        DialError {
            code: ErrorCode::ConnectionFailed,
            message: kind.message(detail),
        }
    }
}

fn classify(e: &std::io::Error, addr: SocketAddr) -> DialError {
    DialError::failed(FailureKind::of_io(e), format!("{addr}: {e}"))
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
    dial_from(acl, host, port, timeout, None).await
}

/// [`dial`], with the sockets bound to the network interface `iface` when given (the
/// policy's `netIface`).
pub async fn dial_from(
    acl: &Acl,
    host: &str,
    port: u16,
    timeout: Duration,
    iface: Option<&str>,
) -> Result<TcpStream, DialError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let addrs = resolve_checked(acl, host, port, deadline, Protocol::Tcp).await?;
    let mut last = None;
    for addr in addrs {
        let socket = socket_for(addr, iface)?;
        match tokio::time::timeout_at(deadline, socket.connect(addr)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Ok(Err(e)) => last = Some(classify(&e, addr)),
            Err(_) => {
                return Err(DialError::failed(
                    FailureKind::Timeout,
                    format!("{host}:{port}: no answer within {timeout:?}"),
                ))
            }
        }
    }
    Err(last.unwrap_or_else(|| DialError::failed(FailureKind::Unreachable, host)))
}

/// Resolves `host` before `deadline` and checks the name and every address against
/// the ACL for `protocol`; the addresses returned are the ones checked.
pub async fn resolve_checked(
    acl: &Acl,
    host: &str,
    port: u16,
    deadline: tokio::time::Instant,
    protocol: Protocol,
) -> Result<Vec<SocketAddr>, DialError> {
    acl.check_name(host, port).map_err(DialError::forbidden)?;
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<SocketAddr> = match bare.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => {
            let lookup = tokio::time::timeout_at(deadline, tokio::net::lookup_host((bare, port)))
                .await
                .map_err(|_| {
                    DialError::failed(FailureKind::Timeout, format!("resolving {host}"))
                })?;
            lookup
                .map_err(|e| DialError::failed(FailureKind::Dns, format!("{host}: {e}")))?
                .collect()
        }
    };
    if addrs.is_empty() {
        return Err(DialError::failed(
            FailureKind::Dns,
            format!("{host}: no addresses"),
        ));
    }
    for addr in &addrs {
        acl.check_addr_for(*addr, host, protocol)
            .map_err(DialError::forbidden)?;
    }
    Ok(addrs)
}

fn socket_for(addr: SocketAddr, iface: Option<&str>) -> Result<TcpSocket, DialError> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    };
    let socket = socket.map_err(|e| DialError::internal(format!("socket for {addr}: {e}")))?;
    if let Some(iface) = iface {
        socket
            .bind_device(Some(iface.as_bytes()))
            .map_err(|e| DialError::internal(format!("cannot bind to interface {iface:?}: {e}")))?;
    }
    Ok(socket)
}

/// A proxy user is answered as the agent's answer would be answered.
impl From<DialError> for ConnectError {
    fn from(e: DialError) -> Self {
        ConnectFailure {
            code: e.code,
            message: e.message,
        }
        .into()
    }
}
