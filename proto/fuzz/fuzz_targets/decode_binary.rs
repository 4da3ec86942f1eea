//! Any input as one WebSocket message: iterating `binary::Frames` never panics, and
//! every frame it accepts re-encodes to the same value (in both encodings).
#![no_main]

use anyproxy_proto::{binary, json, Message};
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let mut ok = Vec::new();
    for item in binary::Frames::new(Bytes::copy_from_slice(input)) {
        match item {
            Ok(msg) => {
                let mut frame = binary::encode(&msg);
                assert_eq!(
                    binary::decode_frame(&mut frame).as_ref(),
                    Ok(&msg),
                    "binary"
                );
                assert!(frame.is_empty());
                assert_eq!(json::decode(&json::encode(&msg)).as_ref(), Ok(&msg), "JSON");
                ok.push(msg);
            }
            Err(_) => break,
        }
    }
    // The good frames, re-encoded back to back, decode to the same sequence.
    let mut again = bytes::BytesMut::new();
    for msg in &ok {
        binary::encode_into(msg, &mut again);
    }
    let decoded: Vec<Message> = binary::Frames::new(again.freeze())
        .collect::<Result<_, _>>()
        .expect("re-encoded frames decode");
    assert_eq!(decoded, ok);
});
