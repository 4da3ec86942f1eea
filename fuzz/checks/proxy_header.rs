//! The PROXY protocol header parser: never panics; read the way the listener reads
//! (what [`Progress::Need`] asks, or [`v1_take`] of a v1 line), it never reads past
//! the header and comes to what the whole input says; and a v1 line or v2 block
//! written from the input's bytes parses back to the client address it carries.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use anyproxy::transport::proxy_header::{
    is_v1, parse_prefix, v1_take, Progress, Source, V1_MAX, V2_MAX,
};

pub fn check(data: &[u8]) {
    incremental_agrees(data);
    v1_round_trip(data);
    v2_round_trip(data);
}

/// The listener's loop: parse what was read, read what it asks for, until done.
fn incremental_agrees(data: &[u8]) {
    let whole = parse_prefix(data);
    let mut have = 0;
    loop {
        match parse_prefix(&data[..have]) {
            Ok(Progress::Need(n)) => {
                assert!(n >= 1, "Need(0) at {have}");
                assert!(have + n <= V2_MAX, "asks past the longest header");
                if let Ok(Progress::Done { len, .. }) = whole {
                    assert!(
                        have + n <= len,
                        "asks for {n} at {have}, the header is {len}"
                    );
                }
                let take = if is_v1(&data[..have]) {
                    v1_take(have, &data[have..])
                } else {
                    n
                };
                if take == 0 || have + take > data.len() {
                    return;
                }
                have += take;
            }
            Ok(Progress::Done { source, len }) => {
                assert_eq!(len, have, "a header read to its end is all that was read");
                assert!(len <= V1_MAX || !is_v1(data));
                assert_eq!(whole, Ok(Progress::Done { source, len }), "prefix vs whole");
                return;
            }
            Err(e) => {
                assert!(
                    whole.is_err(),
                    "the prefix is refused ({e}), the whole is {whole:?}"
                );
                return;
            }
        }
    }
}

fn ipv4(b: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(b[0], b[1], b[2], b[3])
}

fn ipv6(b: &[u8]) -> Ipv6Addr {
    Ipv6Addr::from(<[u8; 16]>::try_from(b).expect("16 bytes"))
}

/// `PROXY TCP4|TCP6 src dst sport dport\r\n` from the first bytes of the input.
fn v1_round_trip(data: &[u8]) {
    let Some(b) = data.get(..37) else {
        return;
    };
    let (sport, dport) = (
        u16::from_be_bytes([b[1], b[2]]),
        u16::from_be_bytes([b[3], b[4]]),
    );
    let (line, src) = if b[0] & 1 == 0 {
        let (s, d) = (ipv4(&b[5..9]), ipv4(&b[9..13]));
        (
            format!("PROXY TCP4 {s} {d} {sport} {dport}\r\n"),
            IpAddr::V4(s),
        )
    } else {
        let (s, d) = (ipv6(&b[5..21]), ipv6(&b[21..37]));
        (
            format!("PROXY TCP6 {s} {d} {sport} {dport}\r\n"),
            IpAddr::V6(s),
        )
    };
    let mut wire = line.clone().into_bytes();
    wire.extend_from_slice(&data[37..]);
    let want = Progress::Done {
        source: Source::Client(SocketAddr::new(src.to_canonical(), sport)),
        len: line.len(),
    };
    assert_eq!(parse_prefix(&wire), Ok(want), "{line:?}");
}

/// A v2 PROXY block (TCP over IPv4 or IPv6) from the first bytes of the input, the
/// rest of them as its TLVs' room (ppp checks the TLVs it can read; the address is
/// what counts here).
fn v2_round_trip(data: &[u8]) {
    let Some(b) = data.get(..37) else {
        return;
    };
    let sport = u16::from_be_bytes([b[1], b[2]]);
    let (family, addresses, src) = if b[0] & 1 == 0 {
        let mut a = b[5..13].to_vec();
        a.extend_from_slice(&b[1..5]);
        (0x11, a, IpAddr::V4(ipv4(&b[5..9])))
    } else {
        let mut a = b[5..37].to_vec();
        a.extend_from_slice(&b[1..5]);
        (0x21, a, IpAddr::V6(ipv6(&b[5..21])))
    };
    let mut wire = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    wire.extend([0x21, family]);
    wire.extend((addresses.len() as u16).to_be_bytes());
    wire.extend(&addresses);
    let len = wire.len();
    wire.extend_from_slice(&data[37..]);
    let want = Progress::Done {
        source: Source::Client(SocketAddr::new(src.to_canonical(), sport)),
        len,
    };
    assert_eq!(parse_prefix(&wire), Ok(want));
}
