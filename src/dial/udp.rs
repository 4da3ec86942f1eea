//! Where a datagram flow leaves: a UDP socket of its own, connected to the first
//! checked address of the target (so that only that address's datagrams come back).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use anyproxy_proto::Protocol;
use tokio::net::UdpSocket;

use super::acl::Acl;
use super::{resolve_checked, DialError};
use crate::net::FailureKind;

/// Resolves `host` within `timeout`, checks the name and every address for UDP, then
/// opens a socket connected to the first address. Returns it and that address.
pub async fn open(
    acl: &Acl,
    host: &str,
    port: u16,
    timeout: Duration,
) -> Result<(UdpSocket, SocketAddr), DialError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let addrs = resolve_checked(acl, host, port, deadline, Protocol::Udp).await?;
    let addr = addrs[0];
    let local: SocketAddr = if addr.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(local)
        .await
        .map_err(|e| DialError::internal(format!("udp socket for {addr}: {e}")))?;
    socket
        .connect(addr)
        .await
        .map_err(|e| DialError::failed(FailureKind::of_io(&e), format!("{addr}: {e}")))?;
    Ok((socket, addr))
}
