//! The SOCKS5 UDP request header (RFC 1928 §7) that every client datagram starts with:
//! never panics; a header it accepts lies within the datagram, and writing its
//! destination back in the address type the datagram used gives exactly the header's
//! bytes after RSV; a fragment (FRAG ≠ 0) is always dropped as one. RSV is ignored, as
//! receivers of a reserved field conventionally do (the first ten-minute run found the
//! parser accepts any RSV, which this check had assumed zero:
//! `regressions/udp_header/nonzero_rsv`).

use std::net::{Ipv4Addr, Ipv6Addr};

use anyproxy::proxy::socks5_udp::parse_header;
use anyproxy::tunnel::datagram::DropReason;

pub fn check(data: &[u8]) {
    match parse_header(data) {
        Ok(h) => {
            assert!(
                h.len <= data.len(),
                "header of {} in {} bytes",
                h.len,
                data.len()
            );
            assert_eq!(data[2], 0, "a fragment was accepted");
            assert_eq!(
                written_back(data[3], &h.target.host, h.target.port)[2..],
                data[2..h.len],
                "the destination does not write back to the header"
            );
        }
        Err(DropReason::Fragmented) => {
            assert!(data.len() >= 4 && data[2] != 0, "not a fragment: {data:?}");
        }
        Err(_) => {}
    }
}

/// RSV (zero), FRAG, then the destination as RFC 1928 writes it, in address type `atyp`.
fn written_back(atyp: u8, host: &str, port: u16) -> Vec<u8> {
    let mut out = vec![0, 0, 0, atyp];
    match atyp {
        0x01 => out.extend(host.parse::<Ipv4Addr>().expect("an IPv4 host").octets()),
        0x04 => out.extend(host.parse::<Ipv6Addr>().expect("an IPv6 host").octets()),
        0x03 => {
            out.push(u8::try_from(host.len()).expect("a name of at most 255 bytes"));
            out.extend(host.as_bytes());
        }
        other => panic!("accepted address type {other}"),
    }
    out.extend(port.to_be_bytes());
    out
}
