//! Any input through `json::decode_with` and an interning id map (`InternedIds`): never
//! panics; decoding is repeatable (the same string gives the same local id); whatever it
//! accepts re-encodes with the same map to a message that decodes to the same value and
//! names the connection with the peer's own `connection_id` string; an error about a
//! connection names a local id whose string is the peer's.
#![no_main]

use anyproxy_proto::{json, ConnId, ConnIdMap, InternedIds};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

/// The `data.connection_id` of a JSON text, as the string we must answer with.
fn peer_id(text: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(text).ok()?;
    match v.get("data")?.get("connection_id")? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn wire_of(ids: &InternedIds, id: ConnId) -> String {
    ids.wire(id).map_or_else(|| id.0.to_string(), |s| s.to_string())
}

fuzz_target!(|input: &[u8]| {
    let ids = InternedIds::with_max(8);
    let first = json::decode_with(input, &ids);
    assert_eq!(json::decode_with(input, &ids), first, "repeatable");
    match &first {
        Ok(msg) => {
            let wire = json::encode_with(msg, &ids);
            assert_eq!(json::decode_with(&wire, &ids).as_ref(), Ok(msg), "re-encode");
            if let Some(id) = msg.conn_id() {
                let ours = peer_id(&wire).expect("we write a string connection_id");
                assert_eq!(ours, wire_of(&ids, id));
                if let Some(theirs) = peer_id(input) {
                    assert_eq!(ours, theirs, "answered with the peer's own string");
                }
            }
        }
        Err(e) => {
            if let (Some(id), Some(theirs)) = (e.conn_id(), peer_id(input)) {
                assert_eq!(wire_of(&ids, id), theirs, "error names the peer's connection");
            }
        }
    }
    // Releasing every id empties the map.
    if let Ok(msg) = &first {
        if let Some(id) = msg.conn_id() {
            ids.release(id);
        }
    }
    if let Err(e) = &first {
        if let Some(id) = e.conn_id() {
            ids.release(id);
        }
    }
    assert!(ids.is_empty(), "{} ids left", ids.len());
});
