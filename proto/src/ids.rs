//! Connection ids as the peer writes them.
//!
//! On anyproxy's own wire a `connection_id` is a decimal `u32`. The API document types it
//! as a string (`"unique_connection_id"`), so a gateway written from the document may use
//! any string: a UUID, `"conn-17"`. A [`ConnIdMap`] translates between the peer's strings
//! and local [`ConnId`]s: [`json::decode_with`](crate::json::decode_with) asks it for the
//! local id of every `connection_id` it reads, and
//! [`json::encode_into_with`](crate::json::encode_into_with) asks it for the string to
//! write, so that a reply names the connection with the peer's own string.
//!
//! Decoding runs in a session's reader task and encoding in its writer task, so the
//! methods take `&self`; implementations use interior mutability.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::{ConnId, DecodeError};

/// Longest `connection_id` string (in bytes, after JSON unescaping) an interning map
/// accepts.
pub const MAX_WIRE_ID_LEN: usize = 128;

/// Maps `connection_id` strings of one peer to local ids and back. One map per session.
pub trait ConnIdMap {
    /// The local id for `wire`, the peer's `connection_id` as a string (a JSON number id
    /// arrives as its decimal text). An interning map allocates an id for a string it has
    /// not seen; calling it again with the same string gives the same id until
    /// [`ConnIdMap::release`].
    fn local(&self, wire: &str) -> Result<ConnId, DecodeError>;

    /// The string to write for local id `id`, or `None` to write its decimal form.
    fn wire(&self, id: ConnId) -> Option<Arc<str>>;

    /// The session is done with `id`: nothing more will be encoded for it. An interning
    /// map forgets the string; a later message with it allocates a fresh id.
    fn release(&self, id: ConnId);
}

/// anyproxy's own rule, and what [`json::decode`](crate::json::decode) and
/// [`json::encode_into`](crate::json::encode_into) use: a `connection_id` is one to ten
/// ASCII digits with a value in `0..=4294967295` (leading zeros allowed on input), written
/// as the plain decimal. Stateless.
#[derive(Clone, Copy, Debug, Default)]
pub struct NumericIds;

impl ConnIdMap for NumericIds {
    fn local(&self, wire: &str) -> Result<ConnId, DecodeError> {
        parse_decimal_id(wire)
    }

    fn wire(&self, _: ConnId) -> Option<Arc<str>> {
        None
    }

    fn release(&self, _: ConnId) {}
}

pub(crate) fn parse_decimal_id(s: &str) -> Result<ConnId, DecodeError> {
    let digits_only = !s.is_empty() && s.len() <= 10 && s.bytes().all(|b| b.is_ascii_digit());
    if !digits_only {
        return Err(DecodeError::InvalidConnId(truncate_for_error(s)));
    }
    s.parse::<u32>()
        .map(ConnId)
        .map_err(|_| DecodeError::InvalidConnId(truncate_for_error(s)))
}

pub(crate) fn truncate_for_error(s: &str) -> String {
    s.chars().take(64).collect()
}

/// The first local id [`InternedIds`] hands out for a string; ids below it are the
/// canonical decimal strings themselves.
pub const INTERNED_BASE: u32 = 1 << 31;

/// Default bound on the strings an [`InternedIds`] holds at once.
pub const DEFAULT_MAX_INTERNED: usize = 65_536;

/// The reference [`ConnIdMap`] for a session whose **peer allocates the ids** (an agent
/// talking to a gateway written from the document).
///
/// * A canonical decimal below [`INTERNED_BASE`] (`"0"`, `"17"`; no sign, no leading
///   zero) is its own local id and is written back as the same decimal: no lock, no
///   table, so anyproxy's own gateways cost nothing extra.
/// * Any other string of 1 to [`MAX_WIRE_ID_LEN`] bytes (`"3f2b8c1e-…"`, `"007"`,
///   `"4294967295"`) is interned: it gets a local id in `INTERNED_BASE..=u32::MAX`, and
///   every message encoded for that id carries the peer's string. The two ranges cannot
///   collide.
/// * At most `max` strings are held at once; beyond that [`ConnIdMap::local`] refuses
///   new strings ([`DecodeError::ConnIdRefused`]) until some are released.
///
/// It does not suit a session whose *own* side allocates ids over the whole `u32` range
/// (anyproxy's gateway): such a side uses [`NumericIds`].
#[derive(Debug)]
pub struct InternedIds {
    inner: Mutex<Interned>,
    max: usize,
}

#[derive(Debug, Default)]
struct Interned {
    by_wire: HashMap<Arc<str>, ConnId>,
    by_local: HashMap<ConnId, Arc<str>>,
    /// Next candidate local id (offset from INTERNED_BASE).
    next: u32,
}

impl Default for InternedIds {
    fn default() -> Self {
        Self::new()
    }
}

impl InternedIds {
    pub fn new() -> Self {
        Self::with_max(DEFAULT_MAX_INTERNED)
    }

    /// A map that holds at most `max` interned strings at once.
    pub fn with_max(max: usize) -> Self {
        InternedIds {
            inner: Mutex::new(Interned::default()),
            max: max.min((u32::MAX - INTERNED_BASE) as usize + 1),
        }
    }

    /// How many strings are interned now.
    pub fn len(&self) -> usize {
        self.lock().by_local.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> MutexGuard<'_, Interned> {
        // The tables stay consistent at every await-free step; a panic elsewhere while
        // holding the lock cannot leave them half-updated.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// `Some(n)` when `s` is the canonical decimal of `n < INTERNED_BASE`.
fn canonical_small_decimal(s: &str) -> Option<u32> {
    let b = s.as_bytes();
    let canonical = match b {
        [] => false,
        [b'0'] => true,
        [first, rest @ ..] => {
            (b'1'..=b'9').contains(first) && rest.len() < 10 && rest.iter().all(u8::is_ascii_digit)
        }
    };
    if !canonical {
        return None;
    }
    s.parse::<u32>().ok().filter(|&n| n < INTERNED_BASE)
}

impl ConnIdMap for InternedIds {
    fn local(&self, wire: &str) -> Result<ConnId, DecodeError> {
        if let Some(n) = canonical_small_decimal(wire) {
            return Ok(ConnId(n));
        }
        let refuse = |reason: String| DecodeError::ConnIdRefused {
            id: truncate_for_error(wire),
            reason,
        };
        if wire.is_empty() {
            return Err(refuse("empty".into()));
        }
        if wire.len() > MAX_WIRE_ID_LEN {
            return Err(refuse(format!(
                "{} bytes exceed the limit of {MAX_WIRE_ID_LEN}",
                wire.len()
            )));
        }
        let mut t = self.lock();
        if let Some(&id) = t.by_wire.get(wire) {
            return Ok(id);
        }
        if t.by_local.len() >= self.max {
            return Err(refuse(format!(
                "{} connection ids are live, the limit",
                self.max
            )));
        }
        // There is a free id: fewer than `max` <= 2^31 of the 2^31 are taken.
        let id = loop {
            let candidate = ConnId(INTERNED_BASE + t.next);
            t.next = t.next.wrapping_add(1) & (INTERNED_BASE - 1);
            if !t.by_local.contains_key(&candidate) {
                break candidate;
            }
        };
        let wire: Arc<str> = Arc::from(wire);
        t.by_wire.insert(wire.clone(), id);
        t.by_local.insert(id, wire);
        Ok(id)
    }

    fn wire(&self, id: ConnId) -> Option<Arc<str>> {
        if id.0 < INTERNED_BASE {
            return None;
        }
        self.lock().by_local.get(&id).cloned()
    }

    fn release(&self, id: ConnId) {
        if id.0 < INTERNED_BASE {
            return;
        }
        let mut t = self.lock();
        if let Some(wire) = t.by_local.remove(&id) {
            t.by_wire.remove(&wire);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numeric_ids_keep_todays_rule() {
        let m = NumericIds;
        assert_eq!(m.local("17"), Ok(ConnId(17)));
        assert_eq!(m.local("0017"), Ok(ConnId(17)));
        assert_eq!(m.local("4294967295"), Ok(ConnId(u32::MAX)));
        for bad in ["", "-1", "+1", " 1", "1.0", "4294967296", "abc"] {
            assert!(
                matches!(m.local(bad), Err(DecodeError::InvalidConnId(_))),
                "{bad}"
            );
        }
        assert_eq!(m.wire(ConnId(17)), None);
    }

    #[test]
    fn small_canonical_decimals_are_themselves_without_the_table() {
        let m = InternedIds::new();
        assert_eq!(m.local("0"), Ok(ConnId(0)));
        assert_eq!(m.local("17"), Ok(ConnId(17)));
        assert_eq!(m.local("2147483647"), Ok(ConnId(INTERNED_BASE - 1)));
        assert!(m.is_empty());
        assert_eq!(m.wire(ConnId(17)), None);
        m.release(ConnId(17));
    }

    #[test]
    fn other_strings_are_interned_and_written_back() {
        let m = InternedIds::new();
        let uuid = "3f2b8c1e-9d4a-4b7e-8c21-5a6f0e9d1b2c";
        let a = m.local(uuid).unwrap();
        assert!(a.0 >= INTERNED_BASE);
        assert_eq!(m.local(uuid), Ok(a), "same string, same id");
        for other in ["007", "2147483648", "4294967295", "-1", "é", "a\"b"] {
            let id = m.local(other).unwrap();
            assert!(id.0 >= INTERNED_BASE && id != a, "{other}");
            assert_eq!(m.wire(id).as_deref(), Some(other));
        }
        assert_eq!(m.wire(a).as_deref(), Some(uuid));
        assert_eq!(m.len(), 7);
        m.release(a);
        assert_eq!(m.wire(a), None);
        assert_eq!(m.len(), 6);
        let again = m.local(uuid).unwrap();
        assert_eq!(m.wire(again).as_deref(), Some(uuid));
    }

    #[test]
    fn bounds_empty_long_and_count() {
        let m = InternedIds::with_max(2);
        assert!(matches!(
            m.local(""),
            Err(DecodeError::ConnIdRefused { .. })
        ));
        let long = "x".repeat(MAX_WIRE_ID_LEN + 1);
        assert!(matches!(
            m.local(&long),
            Err(DecodeError::ConnIdRefused { .. })
        ));
        assert!(m.local(&"x".repeat(MAX_WIRE_ID_LEN)).is_ok());
        let b = m.local("b").unwrap();
        let full = m.local("c").unwrap_err();
        assert!(full.to_string().contains("limit"), "{full}");
        // Known strings and small decimals still work when full.
        assert_eq!(m.local("b"), Ok(b));
        assert_eq!(m.local("5"), Ok(ConnId(5)));
        m.release(b);
        assert!(m.local("c").is_ok());
    }

    #[test]
    fn allocation_skips_ids_still_taken_after_wrapping() {
        let m = InternedIds::with_max(3);
        let a = m.local("a").unwrap();
        let b = m.local("b").unwrap();
        m.release(a);
        // Force the counter back to the start: the next candidates are a (free), b (taken).
        m.lock().next = 0;
        let c = m.local("c").unwrap();
        assert_eq!(c, a);
        let d = m.local("d").unwrap();
        assert_ne!(d, b);
        assert_eq!(m.wire(b).as_deref(), Some("b"));
        assert_eq!(m.wire(d).as_deref(), Some("d"));
    }

    #[test]
    fn shared_between_a_reader_and_a_writer_thread() {
        let m = Arc::new(InternedIds::new());
        let reader = {
            let m = m.clone();
            std::thread::spawn(move || {
                (0..1000)
                    .map(|i| m.local(&format!("conn-{i}")).unwrap())
                    .collect::<Vec<_>>()
            })
        };
        let ids = reader.join().unwrap();
        let writer = std::thread::spawn(move || {
            for (i, id) in ids.into_iter().enumerate() {
                assert_eq!(m.wire(id).as_deref(), Some(format!("conn-{i}").as_str()));
                m.release(id);
            }
            assert!(m.is_empty());
        });
        writer.join().unwrap();
    }
}
