//! SOCKS5 front end (RFC 1928 CONNECT and UDP ASSOCIATE, RFC 1929 username/password).
//! Domain names are passed to the agent unresolved. The success reply to CONNECT is
//! sent only after the agent reached the target; UDP ASSOCIATE is `socks5_udp`.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use anyproxy_proto::ErrorCode;

use crate::auth::{Attempt, Authority, Identity, Kind};
use crate::connect::{Access, Connector, Requester};
use crate::limits::lockout::STORE_DOWN;
use crate::limits::{AuthVerdict, Limits, LOCKED_OUT};
use crate::net::HostPort;
use crate::net::Revoke;
use crate::transport::listen::Serve;

use super::socks5_udp::{self, UdpSupport};

const VERSION: u8 = 0x05;
const AUTH_VERSION: u8 = 0x01;
const METHOD_NONE: u8 = 0x00;
const METHOD_USERPASS: u8 = 0x02;
const METHOD_UNACCEPTABLE: u8 = 0xFF;
const CMD_CONNECT: u8 = 0x01;
const CMD_UDP_ASSOCIATE: u8 = 0x03;
const ATYP_V4: u8 = 0x01;
const ATYP_DOMAIN: u8 = 0x03;
const ATYP_V6: u8 = 0x04;
pub const REPLY_OK: u8 = 0x00;
pub const REPLY_GENERAL_FAILURE: u8 = 0x01;
pub const REPLY_CMD_NOT_SUPPORTED: u8 = 0x07;
pub const REPLY_ATYP_NOT_SUPPORTED: u8 = 0x08;

/// The whole negotiation (greeting, auth, request) must finish within this time.
const NEGOTIATION_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
enum Socks5Error {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("not SOCKS5 (version byte {0:#04x})")]
    Version(u8),
    #[error("client offers no acceptable authentication method")]
    NoMethod,
    #[error("authentication failed for user {0:?}")]
    AuthFailed(String),
    #[error("user {0:?} refused: this address is locked out after repeated failures")]
    LockedOut(String),
    #[error("user {0:?} refused: {1}")]
    BackendDown(String, crate::auth::BackendError),
    #[error("unsupported command {0:#04x}")]
    Command(u8),
    #[error("unsupported address type {0:#04x}")]
    AddressType(u8),
    #[error("domain name is not valid UTF-8")]
    BadDomain,
    #[error("negotiation timed out")]
    Timeout,
}

/// The SOCKS5 listener's role; `limits` guards the password check.
pub struct Socks5Proxy<C> {
    pub users: Arc<Authority>,
    pub limits: Arc<Limits>,
    pub connector: Arc<C>,
    /// UDP ASSOCIATE, or why this listener refuses it (logged as the hint).
    pub udp: Result<Arc<UdpSupport>, String>,
    /// CONNECT is carried (`protocols` lists tcp).
    pub tcp: bool,
}

impl<C: Connector> Serve for Socks5Proxy<C> {
    async fn serve(self: Arc<Self>, stream: TcpStream, peer: SocketAddr) {
        if let Err(e) = handle(stream, peer, &self).await {
            tracing::debug!(%peer, error = %e, "socks5 session ended");
        }
    }
}

async fn handle<C: Connector>(
    mut stream: TcpStream,
    peer: SocketAddr,
    proxy: &Socks5Proxy<C>,
) -> Result<(), Socks5Error> {
    let auth = Auth {
        users: &proxy.users,
        limits: &proxy.limits,
        peer,
    };
    let negotiated = tokio::time::timeout(NEGOTIATION_TIMEOUT, negotiate(&mut stream, &auth))
        .await
        .map_err(|_| Socks5Error::Timeout)?;
    let (command, target, (identity, hold)) = match negotiated {
        Ok(x) => x,
        Err(e) => {
            let code = match &e {
                Socks5Error::Command(_) => Some(REPLY_CMD_NOT_SUPPORTED),
                Socks5Error::AddressType(_) => Some(REPLY_ATYP_NOT_SUPPORTED),
                Socks5Error::BadDomain => Some(REPLY_GENERAL_FAILURE),
                _ => None,
            };
            if let Some(code) = code {
                let _ = reply(&mut stream, code).await;
            }
            return Err(e);
        }
    };
    let mut who = Requester::new(peer, identity);
    who.revoke = hold;
    match command {
        CMD_CONNECT if proxy.tcp => connect(stream, who, target, &*proxy.connector).await,
        CMD_CONNECT => {
            tracing::warn!(%peer, "socks5 CONNECT refused: proxy.socks5.protocols does not list tcp");
            reply(&mut stream, REPLY_CMD_NOT_SUPPORTED).await?;
            Ok(())
        }
        CMD_UDP_ASSOCIATE => associate(stream, who, target, &proxy.udp).await,
        other => {
            reply(&mut stream, REPLY_CMD_NOT_SUPPORTED).await?;
            Err(Socks5Error::Command(other))
        }
    }
}

async fn connect<C: Connector>(
    mut stream: TcpStream,
    who: Requester,
    target: HostPort,
    connector: &C,
) -> Result<(), Socks5Error> {
    let started = std::time::Instant::now();
    match connector.connect(&target, &who).await {
        Ok(conn) => {
            let conn = conn.with_revoke(who.revoke.clone());
            reply(&mut stream, REPLY_OK).await?;
            let access = Access::new("socks5")
                .requester(&who)
                .target(&target)
                .since(started);
            conn.relay_logged(stream, access).await;
        }
        Err(e) => {
            Access::new("socks5")
                .requester(&who)
                .target(&target)
                .since(started)
                .refused(e.code(), &e);
            reply(&mut stream, e.socks_reply()).await?;
        }
    }
    Ok(())
}

/// Who may connect, and the lockout guarding the password check.
struct Auth<'a> {
    users: &'a Authority,
    limits: &'a Limits,
    peer: SocketAddr,
}

async fn negotiate<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    auth: &Auth<'_>,
) -> Result<(u8, HostPort, (Identity, Option<Revoke>)), Socks5Error> {
    let users = auth.users;
    let version = stream.read_u8().await?;
    if version != VERSION {
        return Err(Socks5Error::Version(version));
    }
    let n = stream.read_u8().await? as usize;
    let mut methods = [0u8; 255];
    stream.read_exact(&mut methods[..n]).await?;
    let methods = &methods[..n];
    let identity = if users.is_open() {
        if !methods.contains(&METHOD_NONE) {
            stream.write_all(&[VERSION, METHOD_UNACCEPTABLE]).await?;
            return Err(Socks5Error::NoMethod);
        }
        stream.write_all(&[VERSION, METHOD_NONE]).await?;
        (users.anonymous(), None)
    } else {
        if !methods.contains(&METHOD_USERPASS) {
            stream.write_all(&[VERSION, METHOD_UNACCEPTABLE]).await?;
            return Err(Socks5Error::NoMethod);
        }
        stream.write_all(&[VERSION, METHOD_USERPASS]).await?;
        let (identity, hold) = sub_negotiate(stream, auth).await?;
        (identity, Some(hold))
    };
    let mut head = [0u8; 4];
    stream.read_exact(&mut head).await?;
    if head[0] != VERSION {
        return Err(Socks5Error::Version(head[0]));
    }
    let command = head[1];
    let host = match head[3] {
        ATYP_V4 => {
            let mut a = [0u8; 4];
            stream.read_exact(&mut a).await?;
            Ipv4Addr::from(a).to_string()
        }
        ATYP_V6 => {
            let mut a = [0u8; 16];
            stream.read_exact(&mut a).await?;
            Ipv6Addr::from(a).to_string()
        }
        ATYP_DOMAIN => {
            let len = stream.read_u8().await? as usize;
            let mut name = vec![0u8; len];
            stream.read_exact(&mut name).await?;
            String::from_utf8(name).map_err(|_| Socks5Error::BadDomain)?
        }
        other => return Err(Socks5Error::AddressType(other)),
    };
    let port = stream.read_u16().await?;
    Ok((command, HostPort { host, port }, identity))
}

async fn sub_negotiate<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    auth: &Auth<'_>,
) -> Result<(Identity, Revoke), Socks5Error> {
    let version = stream.read_u8().await?;
    if version != AUTH_VERSION {
        return Err(Socks5Error::Version(version));
    }
    let ulen = stream.read_u8().await? as usize;
    let mut user = vec![0u8; ulen];
    stream.read_exact(&mut user).await?;
    let plen = stream.read_u8().await? as usize;
    let mut pass = vec![0u8; plen];
    stream.read_exact(&mut pass).await?;
    let user = String::from_utf8_lossy(&user).into_owned();
    let pass = String::from_utf8_lossy(&pass);
    let attempt = Attempt {
        kind: Kind::Proxy,
        username: &user,
        password: &pass,
        client_ip: Some(auth.peer.ip()),
        client_id: None,
        listener: "socks5",
    };
    // Taken before the check: a reload removing the user after this revokes it, and
    // one before it is met by the check.
    let hold = auth.users.hold(&user);
    let verdict = auth
        .limits
        .proxy_auth(auth.peer.ip(), auth.users.authenticate(&attempt))
        .await;
    let log = |code: ErrorCode, why: &dyn std::fmt::Display| {
        Access::new("socks5")
            .client(auth.peer)
            .user(&user)
            .refused(code, why)
    };
    let refusal = match verdict {
        AuthVerdict::Accepted(identity) => {
            stream.write_all(&[AUTH_VERSION, 0x00]).await?;
            return Ok((identity, hold));
        }
        AuthVerdict::LockedOut => {
            log(ErrorCode::RateLimited, &LOCKED_OUT);
            Socks5Error::LockedOut(user.clone())
        }
        AuthVerdict::Unavailable => {
            log(ErrorCode::RateLimited, &STORE_DOWN);
            Socks5Error::LockedOut(user.clone())
        }
        AuthVerdict::BackendDown(e) => {
            log(ErrorCode::AuthFailed, &e);
            Socks5Error::BackendDown(user.clone(), e)
        }
        AuthVerdict::Rejected(reason) => {
            if let Some(reason) = reason {
                log(ErrorCode::AuthFailed, &reason);
            }
            Socks5Error::AuthFailed(user.clone())
        }
    };
    // RFC 1929 has one failure status (0x01): the reason goes to the log.
    stream.write_all(&[AUTH_VERSION, 0x01]).await?;
    Err(refusal)
}

/// A reply with BND.ADDR 0.0.0.0:0: the bound address is on the agent's side and of
/// no use to the client.
async fn reply<S: AsyncWrite + Unpin>(stream: &mut S, code: u8) -> std::io::Result<()> {
    reply_bound(stream, code, SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))).await
}

async fn reply_bound<S: AsyncWrite + Unpin>(
    stream: &mut S,
    code: u8,
    bound: SocketAddr,
) -> std::io::Result<()> {
    let mut msg = vec![VERSION, code, 0x00];
    match bound.ip().to_canonical() {
        std::net::IpAddr::V4(v4) => {
            msg.push(ATYP_V4);
            msg.extend_from_slice(&v4.octets());
        }
        std::net::IpAddr::V6(v6) => {
            msg.push(ATYP_V6);
            msg.extend_from_slice(&v6.octets());
        }
    }
    msg.extend_from_slice(&bound.port().to_be_bytes());
    stream.write_all(&msg).await?;
    stream.flush().await
}

/// UDP ASSOCIATE: binds the association's relay socket, tells the client where it is,
/// and relays until the control connection closes. `declared` is where the client
/// said it will send from (zeros: not known yet).
async fn associate(
    mut stream: TcpStream,
    who: Requester,
    declared: HostPort,
    udp: &Result<Arc<UdpSupport>, String>,
) -> Result<(), Socks5Error> {
    let support = match udp {
        Ok(s) => s.clone(),
        Err(why) => {
            tracing::warn!(peer = %who.peer, "socks5 UDP ASSOCIATE refused: {why}");
            Access::new("socks5-udp")
                .requester(&who)
                .refused(ErrorCode::ForbiddenHost, why);
            reply(&mut stream, REPLY_CMD_NOT_SUPPORTED).await?;
            return Ok(());
        }
    };
    // A domain name says nothing about the client's address: treat it as zeros.
    let ip = declared
        .host
        .parse::<std::net::IpAddr>()
        .unwrap_or(std::net::IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    let declared = SocketAddr::new(ip, declared.port);
    let socket = match socks5_udp::bind_relay(&stream).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(peer = %who.peer, error = %e, "cannot bind a UDP relay socket");
            reply(&mut stream, REPLY_GENERAL_FAILURE).await?;
            return Err(e.into());
        }
    };
    reply_bound(&mut stream, REPLY_OK, socket.local_addr()?).await?;
    socks5_udp::run_association(stream, socket, declared, who, support).await;
    Ok(())
}

/// The negotiation alone, for the fuzz targets (`crate::fuzzing`).
#[cfg(feature = "fuzzing")]
pub(crate) async fn negotiate_for_fuzzing<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    users: &Authority,
    limits: &Limits,
    peer: SocketAddr,
) -> Result<(HostPort, Identity), String> {
    let auth = Auth {
        users,
        limits,
        peer,
    };
    let (command, target, (identity, _)) =
        negotiate(stream, &auth).await.map_err(|e| e.to_string())?;
    // The request a CONNECT would carry; the other commands are `handle`'s to answer.
    if command != CMD_CONNECT {
        return Err(Socks5Error::Command(command).to_string());
    }
    Ok((target, identity))
}
