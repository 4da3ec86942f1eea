//! UDP test parts, each written from its RFC alone: a SOCKS5 UDP ASSOCIATE client
//! (RFC 1928 §7, RFC 1929), a tiny DNS server and query (RFC 1035), and a UDP echo
//! server. All on loopback; every server task ends when its handle drops.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::task::JoinHandle;

/// Aborts the server task when dropped.
pub struct Server {
    pub addr: SocketAddr,
    /// Datagrams the server received.
    pub received: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Server {
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
}

/// A UDP echo server on 127.0.0.1: every datagram goes back to its sender.
pub async fn echo_server() -> Server {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let received = Arc::new(AtomicU64::new(0));
    let count = received.clone();
    let task = tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            count.fetch_add(1, Ordering::Relaxed);
            let _ = socket.send_to(&buf[..n], from).await;
        }
    });
    Server {
        addr,
        received,
        task,
    }
}

/// A DNS server on 127.0.0.1 that answers every `A` question with `answer`.
pub async fn dns_server(answer: Ipv4Addr) -> Server {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let received = Arc::new(AtomicU64::new(0));
    let count = received.clone();
    let task = tokio::spawn(async move {
        let mut buf = vec![0u8; 512];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            count.fetch_add(1, Ordering::Relaxed);
            if let Some(reply) = dns_answer(&buf[..n], answer) {
                let _ = socket.send_to(&reply, from).await;
            }
        }
    });
    Server {
        addr,
        received,
        task,
    }
}

/// A standard query (RFC 1035 §4.1) for the `A` record of `name`, with `id`.
pub fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::new();
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]); // RD, QDCOUNT 1
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]); // root, QTYPE A, QCLASS IN
    q
}

/// The answer to a query: the question echoed, one `A` record pointing at it.
fn dns_answer(query: &[u8], answer: Ipv4Addr) -> Option<Vec<u8>> {
    if query.len() < 12 {
        return None;
    }
    let mut at = 12;
    while *query.get(at)? != 0 {
        at += 1 + query[at] as usize;
    }
    let question_end = at + 5;
    let question = query.get(12..question_end)?;
    let mut r = Vec::new();
    r.extend_from_slice(&query[0..2]);
    r.extend_from_slice(&[0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0]); // QR RD RA, 1 Q, 1 A
    r.extend_from_slice(question);
    r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]); // name ptr, A IN, TTL 60
    r.extend_from_slice(&answer.octets());
    Some(r)
}

/// The id and the first `A` record of a DNS response, if it is one.
pub fn dns_parse_answer(r: &[u8]) -> Option<(u16, Ipv4Addr)> {
    if r.len() < 12 || r[2] & 0x80 == 0 {
        return None;
    }
    let id = u16::from_be_bytes([r[0], r[1]]);
    let ancount = u16::from_be_bytes([r[6], r[7]]);
    if ancount == 0 {
        return None;
    }
    let mut at = 12;
    while *r.get(at)? != 0 {
        at += 1 + r[at] as usize;
    }
    at += 5;
    // The answer's name is a 2-byte pointer here; then type, class, TTL, RDLENGTH.
    at += 2 + 2 + 2 + 4 + 2;
    let a: [u8; 4] = r.get(at..at + 4)?.try_into().ok()?;
    Some((id, Ipv4Addr::from(a)))
}

/// Where a datagram goes: an address or a name the proxy must not resolve itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dest {
    Addr(SocketAddr),
    Name(String, u16),
}

impl Dest {
    /// The SOCKS5 UDP request header (RFC 1928 §7) for this destination.
    pub fn header(&self) -> Vec<u8> {
        let mut h = vec![0, 0, 0];
        match self {
            Dest::Addr(SocketAddr::V4(a)) => {
                h.push(1);
                h.extend_from_slice(&a.ip().octets());
                h.extend_from_slice(&a.port().to_be_bytes());
            }
            Dest::Addr(SocketAddr::V6(a)) => {
                h.push(4);
                h.extend_from_slice(&a.ip().octets());
                h.extend_from_slice(&a.port().to_be_bytes());
            }
            Dest::Name(n, port) => {
                h.push(3);
                h.push(n.len() as u8);
                h.extend_from_slice(n.as_bytes());
                h.extend_from_slice(&port.to_be_bytes());
            }
        }
        h
    }
}

/// Splits a datagram from the relay into the destination its header names and the data.
pub fn split_reply(d: &[u8]) -> Option<(Dest, &[u8])> {
    if d.len() < 4 || d[2] != 0 {
        return None;
    }
    match d[3] {
        1 if d.len() >= 10 => {
            let ip = Ipv4Addr::new(d[4], d[5], d[6], d[7]);
            let port = u16::from_be_bytes([d[8], d[9]]);
            Some((Dest::Addr(SocketAddr::new(IpAddr::V4(ip), port)), &d[10..]))
        }
        3 => {
            let n = *d.get(4)? as usize;
            let name = std::str::from_utf8(d.get(5..5 + n)?).ok()?.to_owned();
            let port = u16::from_be_bytes([*d.get(5 + n)?, *d.get(6 + n)?]);
            Some((Dest::Name(name, port), &d[7 + n..]))
        }
        _ => None,
    }
}

/// One UDP association through a SOCKS5 proxy on 127.0.0.1: the control connection
/// (which the association lives as long as) and the client's UDP socket.
pub struct Association {
    pub control: TcpStream,
    pub socket: UdpSocket,
    /// Where the proxy relays (BND.ADDR:BND.PORT of its reply).
    pub relay: SocketAddr,
}

/// Why an association was not set up: the RFC 1928 reply code, or 0xff for an
/// authentication failure.
pub type Refused = u8;

impl Association {
    /// Negotiates username/password auth and UDP ASSOCIATE, declaring the client's
    /// address as zeros (not known yet), as most clients do.
    pub async fn open(proxy_port: u16, user: &str, pass: &str) -> Result<Association, Refused> {
        let mut c = TcpStream::connect(("127.0.0.1", proxy_port)).await.unwrap();
        c.write_all(&[5, 1, 2]).await.unwrap();
        let mut choice = [0u8; 2];
        c.read_exact(&mut choice).await.unwrap();
        assert_eq!(choice, [5, 2], "the proxy must ask for username/password");
        let mut auth = vec![1, user.len() as u8];
        auth.extend_from_slice(user.as_bytes());
        auth.push(pass.len() as u8);
        auth.extend_from_slice(pass.as_bytes());
        c.write_all(&auth).await.unwrap();
        let mut status = [0u8; 2];
        c.read_exact(&mut status).await.unwrap();
        if status[1] != 0 {
            return Err(0xff);
        }
        c.write_all(&[5, 3, 0, 1, 0, 0, 0, 0, 0, 0]).await.unwrap();
        let mut head = [0u8; 4];
        c.read_exact(&mut head).await.unwrap();
        let relay = match head[3] {
            1 => {
                let mut a = [0u8; 6];
                c.read_exact(&mut a).await.unwrap();
                SocketAddr::new(
                    Ipv4Addr::new(a[0], a[1], a[2], a[3]).into(),
                    u16::from_be_bytes([a[4], a[5]]),
                )
            }
            4 => {
                let mut a = [0u8; 18];
                c.read_exact(&mut a).await.unwrap();
                let ip: [u8; 16] = a[..16].try_into().unwrap();
                SocketAddr::new(ip.into(), u16::from_be_bytes([a[16], a[17]]))
            }
            other => panic!("reply with address type {other}"),
        };
        if head[1] != 0 {
            return Err(head[1]);
        }
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        Ok(Association {
            control: c,
            socket,
            relay,
        })
    }

    pub async fn send(&self, to: &Dest, data: &[u8]) {
        let mut d = to.header();
        d.extend_from_slice(data);
        self.socket.send_to(&d, self.relay).await.unwrap();
    }

    /// The next datagram from the relay within `wait`: the destination it came from
    /// and its data.
    pub async fn recv(&self, wait: Duration) -> Option<(Dest, Vec<u8>)> {
        let mut buf = vec![0u8; 65_536];
        let (n, from) = tokio::time::timeout(wait, self.socket.recv_from(&mut buf))
            .await
            .ok()?
            .ok()?;
        assert_eq!(from, self.relay, "replies come from the relay socket");
        let (dest, data) = split_reply(&buf[..n])?;
        Some((dest, data.to_vec()))
    }

    /// Sends a DNS query for `name` to the server at `to`, and returns the answer.
    pub async fn resolve(&self, to: &Dest, id: u16, name: &str) -> Option<Ipv4Addr> {
        let query = dns_query(id, name);
        // UDP may lose the first query while the flow opens: ask up to three times.
        for _ in 0..3 {
            self.send(to, &query).await;
            if let Some((from, data)) = self.recv(Duration::from_secs(5)).await {
                assert_eq!(&from, to, "the reply names the destination it came from");
                let (got_id, ip) = dns_parse_answer(&data)?;
                assert_eq!(got_id, id);
                return Some(ip);
            }
        }
        None
    }
}
