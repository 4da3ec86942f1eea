//! SOCKS5 UDP ASSOCIATE (RFC 1928 §7): a relay socket per association, bound on the
//! listener's address, living exactly as long as the TCP control connection.
//!
//! * Only datagrams from the client are taken: the address it declared in the request,
//!   or the control connection's peer IP when it declared zeros (and then the port of
//!   its first datagram). Anything else is dropped and counted, as is `FRAG != 0`.
//! * Each destination the client names (as it spelled it: a domain name goes to the
//!   agent unresolved) is one datagram flow through an agent, opened on its first
//!   datagram by a [`DatagramConnector`] (limits, then an agent of the user's group).
//! * Replies carry the SOCKS5 UDP header of the destination they came from.
//!
//! The socket's reader never waits: each destination has a queue bounded in datagrams
//! and bytes, and a datagram that finds it full is dropped and counted.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::connect::{Access, ConnectError, Hold, Requester};
use crate::limits::Grant;
use crate::net::HostPort;
use crate::tunnel::datagram::{DatagramFlow, DropReason, UdpStats, MAX_UDP_PAYLOAD};
use crate::tunnel::{Quota, RelayEnd, RelayStats};

/// Destinations one association may have at once; datagrams to more are dropped.
pub const MAX_FLOWS_PER_ASSOCIATION: usize = 256;
/// A destination's queue toward its flow, while the flow opens or is busy.
const DEST_QUEUE_DATAGRAMS: usize = 256;
const DEST_QUEUE_BYTES: usize = 1 << 20;

/// A datagram flow a [`DatagramConnector`] opened, with the admission it holds.
pub struct DatagramUpstream {
    pub flow: DatagramFlow,
    /// Places under the caps and the bandwidth budgets; released when dropped.
    pub grant: Grant,
    /// The policy's download quota: every reply counts against it, and the flow ends
    /// when one no longer fits (a datagram is never cut).
    pub quota: Option<Arc<dyn Quota>>,
    /// The policy's verdict, for the access line.
    pub verdict: Option<Arc<str>>,
}

impl DatagramUpstream {
    /// A flow admitted by the limits alone (no policy).
    pub fn new(flow: DatagramFlow, grant: Grant) -> Self {
        DatagramUpstream {
            flow,
            grant,
            quota: None,
            verdict: None,
        }
    }
}

pub type OpenFuture<'a> =
    Pin<Box<dyn Future<Output = Result<DatagramUpstream, ConnectError>> + Send + 'a>>;

/// Opens datagram flows to targets on behalf of proxy users (the gateway: limits,
/// then the least-loaded agent of the user's group).
pub trait DatagramConnector: Send + Sync {
    fn open<'a>(&'a self, target: &'a HostPort, who: &'a Requester) -> OpenFuture<'a>;
}

/// What a listener needs to carry UDP.
pub struct UdpSupport {
    pub connector: Arc<dyn DatagramConnector>,
    /// A flow with no datagram either way for this long is closed.
    pub idle_timeout: Duration,
    pub stats: Arc<UdpStats>,
}

/// Waits what the bandwidth budgets ask for `n` bytes.
pub async fn pace(grant: &Grant, n: usize) {
    if let Some(p) = grant.pace() {
        let mut wait = p.reserve(n);
        while !wait.is_zero() {
            tokio::time::sleep(wait).await;
            wait = p.pending();
        }
    }
}

/// A parsed SOCKS5 UDP request header: its length and the destination it names.
#[derive(Debug, PartialEq, Eq)]
pub struct UdpHeader {
    pub len: usize,
    pub target: HostPort,
}

/// Reads the header of one client datagram (RFC 1928 §7).
pub fn parse_header(d: &[u8]) -> Result<UdpHeader, DropReason> {
    if d.len() < 4 {
        return Err(DropReason::Malformed);
    }
    if d[2] != 0 {
        return Err(DropReason::Fragmented);
    }
    let (host, at) = match d[3] {
        0x01 if d.len() >= 10 => {
            let a: [u8; 4] = d[4..8].try_into().map_err(|_| DropReason::Malformed)?;
            (Ipv4Addr::from(a).to_string(), 8)
        }
        0x04 if d.len() >= 22 => {
            let a: [u8; 16] = d[4..20].try_into().map_err(|_| DropReason::Malformed)?;
            (Ipv6Addr::from(a).to_string(), 20)
        }
        0x03 if d.len() >= 5 => {
            let n = d[4] as usize;
            let end = 5 + n;
            if n == 0 || d.len() < end + 2 {
                return Err(DropReason::Malformed);
            }
            let name = std::str::from_utf8(&d[5..end]).map_err(|_| DropReason::Malformed)?;
            (name.to_owned(), end)
        }
        _ => return Err(DropReason::Malformed),
    };
    let port = u16::from_be_bytes([d[at], d[at + 1]]);
    Ok(UdpHeader {
        len: at + 2,
        target: HostPort::new(host, port),
    })
}

/// Who may send datagrams into an association, and where replies go.
pub struct Client {
    ip: IpAddr,
    /// 0 until known: the client declared none, and its first datagram sets it.
    port: std::sync::atomic::AtomicU16,
}

impl Client {
    pub fn new(declared: SocketAddr, control_peer: SocketAddr) -> Self {
        let ip = if declared.ip().is_unspecified() {
            control_peer.ip()
        } else {
            declared.ip()
        };
        Client {
            ip: ip.to_canonical(),
            port: std::sync::atomic::AtomicU16::new(declared.port()),
        }
    }

    /// Whether `src` is the client; the first datagram fixes an undeclared port.
    pub fn admits(&self, src: SocketAddr) -> bool {
        if src.ip().to_canonical() != self.ip {
            return false;
        }
        match self
            .port
            .compare_exchange(0, src.port(), Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => true,
            Err(port) => port == src.port(),
        }
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip, self.port.load(Ordering::Acquire))
    }
}

/// Where a flow's replies go.
pub enum Reply {
    /// A SOCKS5 association's client (its port may be learned late).
    Client(Arc<Client>),
    /// A forward's client.
    To(SocketAddr),
}

impl Reply {
    fn addr(&self) -> SocketAddr {
        match self {
            Reply::Client(c) => c.addr(),
            Reply::To(a) => *a,
        }
    }
}

/// One flow's route: who asks, for what, and how replies go back.
pub struct Route {
    /// The access line's `proto`.
    pub proto: &'static str,
    pub target: HostPort,
    /// Put before every reply (SOCKS5: the client's header for this destination).
    pub header: Bytes,
    pub who: Arc<Requester>,
    pub reply: Reply,
}

/// One flow of a shared socket (a destination of an association, a client of a
/// forward): its queue toward the flow's task. The socket's reader never waits on it.
pub struct Destination {
    tx: mpsc::Sender<Bytes>,
    queued: Arc<AtomicUsize>,
}

impl Destination {
    /// Starts the flow's task: it opens the flow, then relays until the flow ends,
    /// goes idle, or `stop`.
    pub fn spawn(
        route: Route,
        support: Arc<UdpSupport>,
        socket: Arc<UdpSocket>,
        stop: CancellationToken,
    ) -> Destination {
        let (tx, rx) = mpsc::channel(DEST_QUEUE_DATAGRAMS);
        let queued = Arc::new(AtomicUsize::new(0));
        let task = DestTask {
            route,
            support,
            socket,
            queued: queued.clone(),
        };
        tokio::spawn(task.run(rx, stop));
        Destination { tx, queued }
    }

    /// Whether its task ended (the flow closed, went idle or was refused long ago).
    pub fn is_gone(&self) -> bool {
        self.tx.is_closed()
    }

    /// Queues one datagram for the flow, or drops and counts it. Never waits.
    pub fn push(&self, payload: Bytes, stats: &UdpStats) {
        let len = payload.len();
        let over = self.queued.load(Ordering::Relaxed) + len > DEST_QUEUE_BYTES;
        if over || self.tx.try_send(payload).is_err() {
            stats.dropped(DropReason::QueueFull);
        } else {
            self.queued.fetch_add(len, Ordering::Relaxed);
        }
    }
}

/// Runs one association: `socket` was bound and announced to the client already.
/// Returns when the control connection closes (or fails); every flow ends with it.
pub async fn run_association(
    mut control: TcpStream,
    socket: UdpSocket,
    declared: SocketAddr,
    who: Requester,
    support: Arc<UdpSupport>,
) {
    let peer = who.peer;
    let client = Arc::new(Client::new(declared, peer));
    let socket = Arc::new(socket);
    let stop = CancellationToken::new();
    let _stop_flows = stop.clone().drop_guard();
    let who = Arc::new(who);
    let mut dests: HashMap<Bytes, Destination> = HashMap::new();
    let mut buf = vec![0u8; MAX_UDP_PAYLOAD + 1];
    let mut sink = [0u8; 512];
    tracing::debug!(%peer, relay = ?socket.local_addr().ok(), "udp association open");
    loop {
        tokio::select! {
            // The association lives exactly as long as the control connection.
            r = control.read(&mut sink) => match r {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            },
            // A reload removed the user: their flows end with the association.
            reason = crate::net::Revoke::wait(who.revoke.as_ref()) => {
                tracing::info!(%peer, user = who.user.as_deref().unwrap_or(""), reason, "udp association closed");
                break;
            }
            r = socket.recv_from(&mut buf) => {
                let Ok((n, src)) = r else { continue };
                let d = &buf[..n];
                if !client.admits(src) {
                    support.stats.dropped(DropReason::ForeignSource);
                    continue;
                }
                let header = match parse_header(d) {
                    Ok(h) => h,
                    Err(why) => {
                        support.stats.dropped(why);
                        continue;
                    }
                };
                let key = Bytes::copy_from_slice(&d[3..header.len]);
                let payload = Bytes::copy_from_slice(&d[header.len..]);
                if dests.get(&key).is_none_or(Destination::is_gone) {
                    dests.retain(|_, dest| !dest.is_gone());
                    if dests.len() >= MAX_FLOWS_PER_ASSOCIATION {
                        support.stats.dropped(DropReason::Refused);
                        continue;
                    }
                    let route = Route {
                        proto: "socks5-udp",
                        target: header.target,
                        header: Bytes::copy_from_slice(&d[..header.len]),
                        who: who.clone(),
                        reply: Reply::Client(client.clone()),
                    };
                    let dest = Destination::spawn(route, support.clone(), socket.clone(), stop.clone());
                    dests.insert(key.clone(), dest);
                }
                if let Some(dest) = dests.get(&key) {
                    dest.push(payload, &support.stats);
                }
            }
        }
    }
    tracing::debug!(%peer, flows = dests.len(), "udp association closed with its control connection");
}

/// The task of one destination: opens its flow, then relays until the flow ends,
/// goes idle, or the association ends.
struct DestTask {
    route: Route,
    support: Arc<UdpSupport>,
    socket: Arc<UdpSocket>,
    queued: Arc<AtomicUsize>,
}

impl DestTask {
    async fn run(self, mut rx: mpsc::Receiver<Bytes>, stop: CancellationToken) {
        let started = Instant::now();
        let access = || {
            Access::new(self.route.proto)
                .requester(&self.route.who)
                .target(&self.route.target)
                .since(started)
        };
        let opened = tokio::select! {
            r = self.support.connector.open(&self.route.target, &self.route.who) => r,
            _ = stop.cancelled() => return,
        };
        let up = match opened {
            Ok(up) => up,
            Err(e) => {
                access().refused(e.code(), &e);
                return self.refused(rx, stop).await;
            }
        };
        let via = up.flow.session().peer_arc();
        let end = self.relay(&up, &mut rx, &stop).await;
        let t = up.flow.totals();
        access()
            .via(&via)
            .policy(up.verdict.as_deref())
            .datagrams(t.sent, t.received)
            .relayed(RelayStats {
                sent: t.sent_bytes,
                received: t.received_bytes,
                ended_by: end.relay_end(),
            });
        up.flow.close(end.as_str()).await;
    }

    /// Until the association ends or the client stops sending to a destination that
    /// was refused, its datagrams are dropped (counted) rather than opened again.
    async fn refused(&self, mut rx: mpsc::Receiver<Bytes>, stop: CancellationToken) {
        loop {
            tokio::select! {
                d = tokio::time::timeout(self.support.idle_timeout, rx.recv()) => match d {
                    Ok(Some(d)) => {
                        self.queued.fetch_sub(d.len(), Ordering::Relaxed);
                        self.support.stats.dropped(DropReason::Refused);
                    }
                    _ => return,
                },
                _ = stop.cancelled() => return,
            }
        }
    }

    async fn relay(
        &self,
        up: &DatagramUpstream,
        rx: &mut mpsc::Receiver<Bytes>,
        stop: &CancellationToken,
    ) -> DestEnd {
        let flow = &up.flow;
        let quiet = flow.idle(self.support.idle_timeout);
        tokio::pin!(quiet);
        loop {
            tokio::select! {
                d = rx.recv() => {
                    let Some(d) = d else { return DestEnd::Ended };
                    self.queued.fetch_sub(d.len(), Ordering::Relaxed);
                    pace(&up.grant, d.len()).await;
                    flow.send(d);
                }
                d = flow.recv() => {
                    let Some(d) = d else { return DestEnd::Closed };
                    if let Some(cut) = up.quota.as_ref().and_then(|q| q.admit(d.len()).err()) {
                        flow.dropped(DropReason::Quota);
                        tracing::info!(target = %self.route.target, reason = %cut.reason, "ending a udp flow at its quota");
                        return DestEnd::Quota;
                    }
                    pace(&up.grant, d.len()).await;
                    let header = &self.route.header;
                    let sent = if header.is_empty() {
                        self.socket.send_to(&d, self.route.reply.addr()).await
                    } else {
                        let mut out = BytesMut::with_capacity(header.len() + d.len());
                        out.put_slice(header);
                        out.put_slice(&d);
                        self.socket.send_to(&out, self.route.reply.addr()).await
                    };
                    match sent {
                        Ok(_) => flow.delivered(d.len()),
                        Err(_) => flow.dropped(DropReason::SendFailed),
                    }
                }
                _ = &mut quiet => return DestEnd::Idle,
                _ = stop.cancelled() => return DestEnd::Ended,
            }
        }
    }
}

/// Why a destination's flow ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DestEnd {
    /// The association (or the forward) ended.
    Ended,
    /// The agent closed it.
    Closed,
    Idle,
    /// A reply did not fit the user's download quota.
    Quota,
}

impl DestEnd {
    fn as_str(self) -> &'static str {
        match self {
            DestEnd::Ended => "association ended",
            DestEnd::Closed => "closed",
            DestEnd::Idle => "idle timeout",
            DestEnd::Quota => RelayEnd::QuotaExceeded.as_str(),
        }
    }

    fn relay_end(self) -> Option<RelayEnd> {
        match self {
            DestEnd::Idle => Some(RelayEnd::IdleTimeout),
            DestEnd::Quota => Some(RelayEnd::QuotaExceeded),
            DestEnd::Ended | DestEnd::Closed => None,
        }
    }
}

/// The relay socket of a new association: on the listener's own address (the one the
/// client reached), any port.
pub async fn bind_relay(control: &TcpStream) -> std::io::Result<UdpSocket> {
    let local = control.local_addr()?;
    UdpSocket::bind(SocketAddr::new(local.ip(), 0)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_of_every_address_type() {
        let v4 = [0, 0, 0, 1, 127, 0, 0, 1, 0, 53, b'q'];
        assert_eq!(
            parse_header(&v4),
            Ok(UdpHeader {
                len: 10,
                target: HostPort::new("127.0.0.1", 53)
            })
        );
        let mut name = vec![0, 0, 0, 3, 9];
        name.extend_from_slice(b"localhost");
        name.extend_from_slice(&[0x1f, 0x90]);
        let h = parse_header(&name).unwrap();
        assert_eq!((h.len, h.target), (16, HostPort::new("localhost", 8080)));
        let mut v6 = vec![0, 0, 0, 4];
        v6.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        v6.extend_from_slice(&[0, 7]);
        assert_eq!(parse_header(&v6).unwrap().target, HostPort::new("::1", 7));
    }

    #[test]
    fn bad_headers_are_dropped_with_their_reason() {
        assert_eq!(parse_header(&[0, 0]), Err(DropReason::Malformed));
        assert_eq!(
            parse_header(&[0, 0, 1, 1, 127, 0, 0, 1, 0, 53]),
            Err(DropReason::Fragmented)
        );
        assert_eq!(
            parse_header(&[0, 0, 0, 1, 127, 0]),
            Err(DropReason::Malformed)
        );
        assert_eq!(
            parse_header(&[0, 0, 0, 3, 5, b'a']),
            Err(DropReason::Malformed)
        );
        assert_eq!(
            parse_header(&[0, 0, 0, 9, 0, 0]),
            Err(DropReason::Malformed)
        );
        assert_eq!(
            parse_header(&[0, 0, 0, 3, 1, 0xff, 0, 1]),
            Err(DropReason::Malformed)
        );
    }

    #[test]
    fn only_the_client_may_send() {
        let control: SocketAddr = "10.0.0.1:4000".parse().unwrap();
        let undeclared = Client::new("0.0.0.0:0".parse().unwrap(), control);
        assert!(!undeclared.admits("10.0.0.2:5000".parse().unwrap()));
        assert!(undeclared.admits("10.0.0.1:5000".parse().unwrap()));
        // The first datagram fixed the port.
        assert!(!undeclared.admits("10.0.0.1:5001".parse().unwrap()));
        let declared = Client::new("10.0.0.9:6000".parse().unwrap(), control);
        assert!(declared.admits("10.0.0.9:6000".parse().unwrap()));
        assert!(!declared.admits("10.0.0.1:6000".parse().unwrap()));
        let mapped = Client::new(
            "0.0.0.0:0".parse().unwrap(),
            "[::ffff:10.0.0.1]:1".parse().unwrap(),
        );
        assert!(mapped.admits("10.0.0.1:7".parse().unwrap()));
    }
}
