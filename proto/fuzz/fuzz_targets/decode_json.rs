//! Any input: `json::decode` never panics, and whatever it accepts re-encodes to a
//! message that decodes to the same value (in both encodings; binary carries a foreign
//! non-integer timestamp as its truncated integer).
#![no_main]

use anyproxy_proto::{binary, json, Heartbeat, Message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    if let Ok(msg) = json::decode(input) {
        let wire = json::encode(&msg);
        assert_eq!(json::decode(&wire).as_ref(), Ok(&msg), "JSON re-encode");
        let mut frame = binary::encode(&msg);
        let want = match &msg {
            Message::Ping(h) => Message::Ping(Heartbeat::new(h.timestamp)),
            Message::Pong(h) => Message::Pong(Heartbeat::new(h.timestamp)),
            other => other.clone(),
        };
        assert_eq!(
            binary::decode_frame(&mut frame).as_ref(),
            Ok(&want),
            "binary"
        );
        assert!(frame.is_empty());
    }
});
