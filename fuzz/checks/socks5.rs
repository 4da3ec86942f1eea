//! SOCKS5 negotiation (greeting, RFC 1929 username/password, request) over an
//! in-memory stream split at every place: never panics, and agrees with a plain
//! reference parser over the whole input on the outcome, the target, the user and
//! every byte the server wrote back.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use anyproxy::auth::{Accounts, Authority};
use anyproxy::config::LimitsConfig;
use anyproxy::limits::Limits;
use anyproxy::net::Credentials;

use super::mem::{block_on, Mem};

const USER: &str = "fuzz";
const PASSWORD: &str = "pass";

/// First byte: bit 0 set asks for a password (one account, `fuzz`/`pass`); the rest
/// is the chunking of the reads. Then the client's bytes.
pub fn check(data: &[u8]) {
    let Some((&mode, wire)) = data.split_first() else {
        return;
    };
    let closed = mode & 1 == 1;
    let accounts = if closed {
        vec![(
            Credentials {
                username: USER.into(),
                password: PASSWORD.into(),
            },
            Arc::from("default"),
        )]
    } else {
        Vec::new()
    };
    let users = Authority::of_accounts(Accounts::new(accounts, Arc::from("default")), Vec::new());
    let limits = Limits::new(&LimitsConfig::default(), None);
    let peer = SocketAddr::from(([192, 0, 2, 1], 40000));
    let mut stream = Mem::new(wire, (mode >> 1) % 32);
    let got = block_on(anyproxy::fuzzing::socks5_negotiate(
        &mut stream,
        &users,
        &limits,
        peer,
    ));
    let expected = reference(wire, closed);
    assert_eq!(stream.written, expected.written, "bytes written back");
    match (&got, &expected.outcome) {
        (Ok((target, identity)), Some((host, port, user))) => {
            assert_eq!((&target.host, target.port), (host, *port), "target");
            assert_eq!(identity.user.as_deref(), user.as_deref(), "user");
        }
        (Err(e), None) => assert!(!e.is_empty(), "an error says what went wrong"),
        _ => panic!("negotiate: {got:?}, reference: {:?}", expected.outcome),
    }
}

/// What the reference parser expects: the server's replies, and the target and user
/// of a request it accepts.
struct Expected {
    written: Vec<u8>,
    outcome: Option<(String, u16, Option<String>)>,
}

/// RFC 1928 and RFC 1929 read straight from a byte slice, without any async.
fn reference(wire: &[u8], closed: bool) -> Expected {
    let mut written = Vec::new();
    let outcome = reference_negotiate(&mut Cursor(wire), closed, &mut written);
    Expected { written, outcome }
}

struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn byte(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
}

fn reference_negotiate(
    c: &mut Cursor<'_>,
    closed: bool,
    written: &mut Vec<u8>,
) -> Option<(String, u16, Option<String>)> {
    if c.byte()? != 5 {
        return None;
    }
    let n = usize::from(c.byte()?);
    let methods = c.take(n)?;
    let wanted = if closed { 2 } else { 0 };
    if !methods.contains(&wanted) {
        written.extend([5, 0xff]);
        return None;
    }
    written.extend([5, wanted]);
    let mut user = None;
    if closed {
        if c.byte()? != 1 {
            return None;
        }
        let ulen = usize::from(c.byte()?);
        let name = c.take(ulen)?.to_vec();
        let plen = usize::from(c.byte()?);
        let password = c.take(plen)?;
        if name != USER.as_bytes() || password != PASSWORD.as_bytes() {
            written.extend([1, 1]);
            return None;
        }
        written.extend([1, 0]);
        user = Some(USER.to_owned());
    }
    let head = c.take(4)?.to_vec();
    if head[0] != 5 {
        return None;
    }
    let host = match head[3] {
        1 => Ipv4Addr::from(<[u8; 4]>::try_from(c.take(4)?).ok()?).to_string(),
        4 => Ipv6Addr::from(<[u8; 16]>::try_from(c.take(16)?).ok()?).to_string(),
        3 => {
            let len = usize::from(c.byte()?);
            String::from_utf8(c.take(len)?.to_vec()).ok()?
        }
        _ => return None,
    };
    let port = c.take(2)?;
    let port = u16::from_be_bytes([port[0], port[1]]);
    (head[1] == 1).then_some((host, port, user))
}
