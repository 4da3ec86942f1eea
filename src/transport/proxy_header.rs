//! The PROXY protocol header (HAProxy's `proxy-protocol.txt`, v1 text and v2 binary)
//! that a load balancer in front of a listener puts before the client's first byte, to
//! say whose connection it is. Parsing only, from bytes (no I/O here): [`parse_prefix`]
//! takes whatever has been read so far and says either how many more bytes the header
//! needs at least, or what it says and how long it was; the reading is in `listen.rs`.
//!
//! Every length is bounded before anything is buffered: a v1 header is at most
//! [`V1_MAX`] bytes including its CRLF, a v2 header at most [`V2_MAX`] (its fixed 16
//! bytes plus a 16-bit length). The addresses themselves are decoded by the `ppp` crate.

use std::net::{IpAddr, SocketAddr};

use crate::net::canonical;

/// The longest v1 header the specification allows, `PROXY TCP6 … \r\n` included.
pub const V1_MAX: usize = 107;
/// The v2 header's fixed part: signature, version and command, family, length.
pub const V2_FIXED: usize = 16;
/// The longest v2 header: the fixed part and the most its 16-bit length can say.
pub const V2_MAX: usize = V2_FIXED + u16::MAX as usize;

/// Both versions are recognised by their first six bytes.
const START: usize = 6;
const V1_START: &[u8; START] = b"PROXY ";
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// What a complete header says about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The client's address and port, as the load balancer saw them.
    Client(SocketAddr),
    /// No client address: a v2 `LOCAL` command (the balancer's own health check), v1
    /// `UNKNOWN`, or a v2 family without IP addresses (`UNSPEC`, `UNIX`). The
    /// connection is the balancer's own; keep the socket's peer.
    Local,
}

/// How far [`parse_prefix`] got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// The header is not complete: at least this many more bytes belong to it (and
    /// reading exactly that many never reads past its end).
    Need(usize),
    /// A complete header of `len` bytes; the connection's own bytes follow it.
    Done { source: Source, len: usize },
}

/// Why a connection's PROXY header was refused; one stable [`Self::reason`] each, for
/// the metric and the logs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("PROXY header from an untrusted address (not in gateway.trusted_proxies)")]
    Untrusted,
    #[error("no PROXY protocol header (this listener requires one)")]
    Missing,
    #[error("the connection closed before sending anything (a TCP health check?)")]
    Empty,
    #[error("the connection ended inside its PROXY header")]
    Truncated,
    #[error("no complete PROXY header within {0:?}")]
    TimedOut(std::time::Duration),
    #[error("PROXY v1 header without CRLF within {V1_MAX} bytes")]
    TooLong,
    #[error("malformed PROXY v{version} header: {detail}")]
    Malformed { version: u8, detail: String },
    #[error("reading the PROXY header: {0}")]
    Io(String),
}

impl HeaderError {
    /// A short, stable name (the metric's `reason` label).
    pub fn reason(&self) -> &'static str {
        match self {
            HeaderError::Untrusted => "untrusted",
            HeaderError::Missing => "missing",
            HeaderError::Empty => "empty",
            HeaderError::Truncated => "truncated",
            HeaderError::TimedOut(_) => "timed_out",
            HeaderError::TooLong => "too_long",
            HeaderError::Malformed { .. } => "malformed",
            HeaderError::Io(_) => "io",
        }
    }

    /// Every [`Self::reason`], for metrics that show each one from the start.
    pub const REASONS: [&'static str; 8] = [
        "untrusted",
        "missing",
        "empty",
        "truncated",
        "timed_out",
        "too_long",
        "malformed",
        "io",
    ];
}

fn malformed(version: u8, detail: impl std::fmt::Display) -> HeaderError {
    HeaderError::Malformed {
        version,
        detail: detail.to_string(),
    }
}

/// Parses the start of a connection, `buf` being every byte read from it so far (and
/// nothing else). Never panics, whatever `buf` holds.
pub fn parse_prefix(buf: &[u8]) -> Result<Progress, HeaderError> {
    if buf.len() < START {
        let could_be = V1_START.starts_with(buf) || V2_SIGNATURE.starts_with(buf);
        return if could_be {
            Ok(Progress::Need(START - buf.len()))
        } else {
            Err(HeaderError::Missing)
        };
    }
    if buf.starts_with(V1_START) {
        v1(buf)
    } else if buf.starts_with(&V2_SIGNATURE[..START]) {
        v2(buf)
    } else {
        Err(HeaderError::Missing)
    }
}

fn v1(buf: &[u8]) -> Result<Progress, HeaderError> {
    let Some(lf) = buf.iter().position(|&b| b == b'\n') else {
        if buf.len() >= V1_MAX {
            return Err(HeaderError::TooLong);
        }
        // The header ends with CRLF: after a CR one more byte may end it, otherwise
        // two are needed at least.
        let need = if buf.ends_with(b"\r") { 1 } else { 2 };
        return Ok(Progress::Need(need.min(V1_MAX - buf.len())));
    };
    let header = &buf[..=lf];
    if header.len() > V1_MAX {
        return Err(HeaderError::TooLong);
    }
    if !header.ends_with(b"\r\n") {
        return Err(malformed(1, "the line does not end with CRLF"));
    }
    let parsed = ppp::v1::Header::try_from(header).map_err(|e| malformed(1, e))?;
    if parsed.header.len() != header.len() {
        return Err(malformed(1, "stray CR inside the line"));
    }
    let source = match parsed.addresses {
        ppp::v1::Addresses::Tcp4(a) => client(IpAddr::V4(a.source_address), a.source_port),
        ppp::v1::Addresses::Tcp6(a) => client(IpAddr::V6(a.source_address), a.source_port),
        ppp::v1::Addresses::Unknown => Source::Local,
    };
    Ok(Progress::Done {
        source,
        len: header.len(),
    })
}

fn v2(buf: &[u8]) -> Result<Progress, HeaderError> {
    let signed = buf.len().min(V2_SIGNATURE.len());
    if buf[..signed] != V2_SIGNATURE[..signed] {
        return Err(HeaderError::Missing);
    }
    if buf.len() < V2_FIXED {
        return Ok(Progress::Need(V2_FIXED - buf.len()));
    }
    // Refuse a wrong version or command before waiting for up to 64 KiB of it.
    let version_command = buf[12];
    if version_command >> 4 != 2 {
        return Err(malformed(2, format!("version {}", version_command >> 4)));
    }
    if version_command & 0x0f > 1 {
        return Err(malformed(2, format!("command {}", version_command & 0x0f)));
    }
    let len = V2_FIXED + usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if buf.len() < len {
        return Ok(Progress::Need(len - buf.len()));
    }
    let parsed = ppp::v2::Header::try_from(&buf[..len]).map_err(|e| malformed(2, e))?;
    use ppp::v2::{Addresses, Command, Protocol};
    let source = match (parsed.command, parsed.protocol, parsed.addresses) {
        (Command::Local, _, _) => Source::Local,
        (Command::Proxy, Protocol::Datagram, _) => {
            return Err(malformed(2, "a UDP (DGRAM) header on a TCP connection"))
        }
        (Command::Proxy, Protocol::Stream, Addresses::IPv4(a)) => {
            client(IpAddr::V4(a.source_address), a.source_port)
        }
        (Command::Proxy, Protocol::Stream, Addresses::IPv6(a)) => {
            client(IpAddr::V6(a.source_address), a.source_port)
        }
        // UNSPEC protocol or family, or a UNIX socket: no address to use.
        (Command::Proxy, _, _) => Source::Local,
    };
    Ok(Progress::Done { source, len })
}

/// IPv4-mapped IPv6 from a dual-stack balancer is the IPv4 client it carries, so that
/// per-address caps, lockouts and policy see one address whichever way it came.
fn client(ip: IpAddr, port: u16) -> Source {
    Source::Client(SocketAddr::new(canonical(ip), port))
}

/// How many bytes of `peeked` (bytes waiting in the socket after the `have` bytes read
/// so far) still belong to a v1 header: up to its LF, and never past [`V1_MAX`]. Lets
/// the reader take the rest of a v1 line in one read instead of two bytes at a time.
pub fn v1_take(have: usize, peeked: &[u8]) -> usize {
    let room = V1_MAX.saturating_sub(have).min(peeked.len());
    match peeked[..room].iter().position(|&b| b == b'\n') {
        Some(lf) => lf + 1,
        None => room,
    }
}

/// Whether the header being read is v1 (its rest may be taken with [`v1_take`]).
pub fn is_v1(buf: &[u8]) -> bool {
    buf.starts_with(V1_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` the way the reader does (at most what is asked for) and returns
    /// the outcome and the bytes consumed.
    fn feed(input: &[u8]) -> (Result<Source, HeaderError>, usize) {
        let mut have = 0;
        loop {
            match parse_prefix(&input[..have]) {
                Err(e) => return (Err(e), have),
                Ok(Progress::Done { source, len }) => {
                    assert_eq!(len, have, "a complete header is all that was read");
                    return (Ok(source), len);
                }
                Ok(Progress::Need(n)) => {
                    // A read of at most `n` bytes returns what has arrived.
                    assert!(n > 0);
                    if have == input.len() {
                        return (Err(HeaderError::Truncated), have);
                    }
                    have = (have + n).min(input.len());
                }
            }
        }
    }

    fn v2_header(command: u8, family: u8, addrs: &[u8], tlvs: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(0x20 | command);
        h.push(family);
        h.extend(((addrs.len() + tlvs.len()) as u16).to_be_bytes());
        h.extend(addrs);
        h.extend(tlvs);
        h
    }

    fn v4_addrs() -> Vec<u8> {
        let mut a = vec![203, 0, 113, 7, 192, 0, 2, 1];
        a.extend(51234u16.to_be_bytes());
        a.extend(443u16.to_be_bytes());
        a
    }

    #[test]
    fn v1_tcp4_tcp6_and_unknown() {
        let cases: [(&[u8], Source); 4] = [
            (
                b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 443\r\n",
                Source::Client("203.0.113.7:51234".parse().unwrap()),
            ),
            (
                b"PROXY TCP6 2001:db8::7 2001:db8::1 51234 443\r\n",
                Source::Client("[2001:db8::7]:51234".parse().unwrap()),
            ),
            (
                b"PROXY TCP6 ::ffff:203.0.113.7 ::ffff:192.0.2.1 1 2\r\n",
                Source::Client("203.0.113.7:1".parse().unwrap()),
            ),
            (b"PROXY UNKNOWN\r\n", Source::Local),
        ];
        for (input, want) in cases {
            let mut stream = input.to_vec();
            stream.extend_from_slice(b"GET / HTTP/1.1\r\n");
            let (got, used) = feed(&stream);
            assert_eq!(got, Ok(want), "{}", String::from_utf8_lossy(input));
            assert_eq!(
                used,
                input.len(),
                "the stream after the header is untouched"
            );
        }
        // The longest header the specification shows fits.
        let longest = b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n";
        assert_eq!(feed(longest).0, Ok(Source::Local));
    }

    #[test]
    fn v2_proxy_local_and_families() {
        let h = v2_header(1, 0x11, &v4_addrs(), &[]);
        let mut stream = h.clone();
        stream.extend_from_slice(b"\x05\x01\x00");
        assert_eq!(
            feed(&stream),
            (
                Ok(Source::Client("203.0.113.7:51234".parse().unwrap())),
                h.len()
            )
        );

        let mut v6 = vec![0x20, 0x01, 0x0d, 0xb8];
        v6.extend([0; 11]);
        v6.push(7);
        v6.extend([0; 16]);
        v6.extend(8080u16.to_be_bytes());
        v6.extend(443u16.to_be_bytes());
        // A TLV (here NOOP, type 4) after the addresses is part of the header.
        let h = v2_header(1, 0x21, &v6, &[0x04, 0x00, 0x02, 0xaa, 0xbb]);
        assert_eq!(
            feed(&h),
            (
                Ok(Source::Client("[2001:db8::7]:8080".parse().unwrap())),
                h.len()
            )
        );

        // LOCAL (a health check), with or without addresses: the socket's peer.
        assert_eq!(feed(&v2_header(0, 0x00, &[], &[])).0, Ok(Source::Local));
        assert_eq!(
            feed(&v2_header(0, 0x11, &v4_addrs(), &[])).0,
            Ok(Source::Local)
        );
        // PROXY over UNSPEC: no address to take.
        assert_eq!(feed(&v2_header(1, 0x00, &[], &[])).0, Ok(Source::Local));
    }

    #[test]
    fn v2_refusals() {
        let mut bad_version = v2_header(1, 0x11, &v4_addrs(), &[]);
        bad_version[12] = 0x11;
        let mut bad_command = v2_header(1, 0x11, &v4_addrs(), &[]);
        bad_command[12] = 0x2f;
        for (input, reason) in [
            (bad_version, "malformed"),
            (bad_command, "malformed"),
            // UDP over IPv4 on a TCP listener.
            (v2_header(1, 0x12, &v4_addrs(), &[]), "malformed"),
            // IPv4 with fewer than 12 address bytes.
            (v2_header(1, 0x11, &[1, 2, 3, 4], &[]), "malformed"),
            // An unknown family.
            (v2_header(1, 0x41, &v4_addrs(), &[]), "malformed"),
        ] {
            assert_eq!(feed(&input).0.unwrap_err().reason(), reason);
        }
        // A signature that goes wrong after its first six bytes.
        let mut sig = v2_header(1, 0x11, &v4_addrs(), &[]);
        sig[8] = b'X';
        assert_eq!(feed(&sig).0, Err(HeaderError::Missing));
        // The length is read, and waited for, but never more.
        let mut big = v2_header(1, 0x11, &v4_addrs(), &[]);
        big[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
        assert_eq!(parse_prefix(&big), Ok(Progress::Need(V2_MAX - big.len())));
    }

    #[test]
    fn v1_refusals() {
        for (input, reason) in [
            (&b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n"[..], "malformed"),
            (b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", "malformed"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "malformed"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "malformed"),
            (b"PROXY TCP4 ::1 ::1 1 2\r\n", "malformed"),
            (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "malformed"),
            (b"PROXY TCP4 1.2.3.4\r5.6.7.8 1 2\r\n", "malformed"),
            (b"PROXY TCP4 \xff\xfe 5.6.7.8 1 2\r\n", "malformed"),
            (b"PROXY \r\n", "malformed"),
        ] {
            let got = feed(input).0;
            assert_eq!(
                got.as_ref().map_err(HeaderError::reason),
                Err(reason),
                "{}: {got:?}",
                String::from_utf8_lossy(input)
            );
        }
        let long = [b"PROXY ".as_slice(), &[b'1'; 200]].concat();
        assert_eq!(feed(&long), (Err(HeaderError::TooLong), V1_MAX));
    }

    #[test]
    fn garbage_and_plain_clients_are_missing_headers() {
        for input in [
            &b"GET / HTTP/1.1\r\n\r\n"[..],
            b"\x05\x01\x00",
            b"CONNECT example.com:443 HTTP/1.1\r\n",
            b"\x16\x03\x01\x02\x00",
            b"PROXY\r\n",
            b"\r\n\r\n\r\n",
        ] {
            assert_eq!(feed(input).0, Err(HeaderError::Missing), "{input:?}");
        }
    }

    #[test]
    fn every_truncation_asks_for_more_and_never_past_the_end() {
        let mut inputs = vec![
            b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 443\r\n".to_vec(),
            b"PROXY UNKNOWN\r\n".to_vec(),
            v2_header(1, 0x11, &v4_addrs(), &[4, 0, 1, 0]),
        ];
        inputs.push(v2_header(0, 0x00, &[], &[]));
        for input in inputs {
            for cut in 0..input.len() {
                match parse_prefix(&input[..cut]) {
                    Ok(Progress::Need(n)) => assert!(cut + n <= input.len(), "{cut}"),
                    other => panic!("{cut} of {input:?}: {other:?}"),
                }
            }
        }
    }

    #[test]
    fn never_panics_on_any_short_input() {
        // Every input of up to three bytes after each known start, and random ones.
        let starts: [&[u8]; 3] = [b"", b"PROXY ", &V2_SIGNATURE[..]];
        for start in starts {
            for a in 0..=255u8 {
                for b in [0u8, 1, 0x0a, 0x0d, 0x11, 0x20, 0x21, 0xff] {
                    let mut v = start.to_vec();
                    v.extend([a, b, a ^ b]);
                    let _ = parse_prefix(&v);
                }
            }
        }
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            let mut v = if x & 1 == 0 {
                V2_SIGNATURE.to_vec()
            } else {
                b"PROXY ".to_vec()
            };
            for _ in 0..(x >> 8) % 120 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                v.push(x as u8);
            }
            let _ = parse_prefix(&v);
        }
    }

    #[test]
    fn v1_take_stops_at_the_line_and_the_bound() {
        assert_eq!(v1_take(6, b"UNKNOWN\r\nGET"), 9);
        assert_eq!(v1_take(6, b"TCP4 1.2"), 8);
        assert_eq!(v1_take(100, &[b'x'; 50]), 7);
        assert_eq!(v1_take(200, b"abc"), 0);
    }
}
