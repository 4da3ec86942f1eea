//! The JSON `data` fast path and the general (serde) parser agree on every input: what
//! the fast path decodes, the general parser decodes to the same message, so that
//! `json::decode` (fast path first) and the general parser alone give the same result,
//! success or error, with numeric ids and with an interning id map.
//!
//! The input is used twice: as a whole message, and as the pieces of a message in the
//! fast path's shape (first byte: length of the id text; then the id; then the payload
//! text), which random bytes would almost never hit.
#![no_main]

use anyproxy_proto::json::split;
use anyproxy_proto::{json, ConnIdMap, InternedIds, NumericIds};
use libfuzzer_sys::fuzz_target;

const PREFIX: &[u8] = br#"{"type":"data","data":{"connection_id":""#;
const MIDDLE: &[u8] = br#"","payload":""#;
const SUFFIX: &[u8] = br#""}}"#;

fn check(input: &[u8]) {
    // Numeric ids (stateless map).
    let whole = json::decode_with(input, &NumericIds);
    let general = split::general(input, &NumericIds);
    assert_eq!(whole, general, "decode_with vs general, numeric ids");
    if let Some(fast) = split::fast(input, &NumericIds) {
        assert_eq!(general.as_ref(), Ok(&fast), "fast vs general, numeric ids");
    }
    assert_eq!(json::decode(input), general.map_err(|e| e.into_cause()));

    // Interning ids: a fresh map for each side, so both allocate alike.
    let (a, b) = (InternedIds::new(), InternedIds::new());
    let whole = json::decode_with(input, &a);
    let general = split::general(input, &b);
    assert_eq!(whole, general, "decode_with vs general, interned ids");
    if let Ok(msg) = &whole {
        if let Some(id) = msg.conn_id() {
            assert_eq!(a.wire(id), b.wire(id), "same peer string");
        }
    }
    let c = InternedIds::new();
    if let Some(fast) = split::fast(input, &c) {
        let d = InternedIds::new();
        assert_eq!(split::general(input, &d).as_ref(), Ok(&fast), "fast vs general, interned");
        let id = fast.conn_id().unwrap();
        assert_eq!(c.wire(id), d.wire(id));
    }
}

fuzz_target!(|input: &[u8]| {
    check(input);
    if let Some((&n, rest)) = input.split_first() {
        let n = usize::from(n).min(rest.len());
        let (id, payload) = rest.split_at(n);
        let mut shaped = PREFIX.to_vec();
        shaped.extend_from_slice(id);
        shaped.extend_from_slice(MIDDLE);
        shaped.extend_from_slice(payload);
        shaped.extend_from_slice(SUFFIX);
        check(&shaped);
    }
});
