//! What a peer written from the API document alone may send, and how anyproxy answers:
//! the forms the document leaves open (PROTOCOL.md section 3.1), string connection ids
//! through a `ConnIdMap`, and errors that name the connection they are about.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyproxy_proto::json::{self, split};
use anyproxy_proto::{
    binary, Close, ConnId, ConnIdMap, Connect, ConnectResponse, Data, DecodeError, ErrorCode,
    ErrorMsg, Heartbeat, InternedIds, Message, NumericIds, Protocol, INTERNED_BASE,
    MAX_WIRE_ID_LEN,
};
use bytes::Bytes;
use proptest::prelude::*;

const UUID: &str = "3f2b8c1e-9d4a-4b7e-8c21-5a6f0e9d1b2c";

fn accepted_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("vectors/accepted")
}

#[test]
fn accepted_vectors_decode_and_re_encode_as_generated() {
    let mut names = BTreeSet::new();
    for entry in std::fs::read_dir(accepted_dir()).unwrap() {
        let file = entry.unwrap().file_name().into_string().unwrap();
        let stem = file
            .strip_suffix(".in.json")
            .or_else(|| file.strip_suffix(".out.json"))
            .unwrap_or_else(|| panic!("unexpected file in vectors/accepted: {file}"));
        names.insert(stem.to_string());
    }
    assert!(names.len() >= 11, "{names:?}");
    for name in names {
        let read = |ext: &str| std::fs::read(accepted_dir().join(format!("{name}.{ext}"))).unwrap();
        let (given, want) = (read("in.json"), read("out.json"));
        let ids = InternedIds::new();
        let msg = json::decode_with(&given, &ids).unwrap_or_else(|e| panic!("{name}: {e}"));
        let got = json::encode_with(&msg, &ids);
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(&want),
            "{name}: re-encoded"
        );
        assert_eq!(json::decode_with(&want, &ids), Ok(msg.clone()), "{name}");
        // Without string ids, everything but the string-id vectors decodes the same.
        if !name.contains("string_id") {
            assert_eq!(json::decode(&given), Ok(msg), "{name}: numeric ids");
        }
    }
}

#[test]
fn connect_response_without_message_is_accepted() {
    let text = br#"{"type":"connect_response","data":{"connection_id":"4","success":true}}"#;
    assert_eq!(
        json::decode(text),
        Ok(Message::ConnectResponse(ConnectResponse {
            id: ConnId(4),
            success: true,
            message: String::new(),
        }))
    );
}

#[test]
fn texts_for_people_may_be_absent_or_null() {
    for text in [
        r#"{"type":"auth_response","data":{"success":false}}"#,
        r#"{"type":"auth_response","data":{"success":false,"message":null}}"#,
        r#"{"type":"close","data":{"connection_id":"1"}}"#,
        r#"{"type":"error","data":{"code":"AUTH_FAILED"}}"#,
        r#"{"type":"error","data":{"code":"AUTH_FAILED","message":null,"connection_id":null}}"#,
    ] {
        let msg = json::decode(text.as_bytes()).unwrap_or_else(|e| panic!("{text}: {e}"));
        let empty = match &msg {
            Message::AuthResponse(m) => m.message.is_empty(),
            Message::Close(m) => m.reason.is_empty(),
            Message::Error(m) => m.message.is_empty() && m.id.is_none(),
            _ => false,
        };
        assert!(empty, "{text}: {msg:?}");
    }
    // Still a string when present.
    assert!(json::decode(br#"{"type":"close","data":{"connection_id":"1","reason":5}}"#).is_err());
}

/// Any JSON number is a timestamp; the pong answering a ping carries the same text.
#[test]
fn any_json_number_timestamp_is_echoed_exactly() {
    let cases: &[(&str, i64, bool)] = &[
        // (text, integer value, kept as text)
        ("1640995200", 1_640_995_200, false),
        ("-3", -3, false),
        ("0", 0, false),
        ("9223372036854775807", i64::MAX, false),
        ("-9223372036854775808", i64::MIN, false),
        ("1640995200.5", 1_640_995_200, true),
        ("-1.5", -1, true),
        ("0.999", 0, true),
        ("1e9", 1_000_000_000, true),
        ("1.6409952E+9", 1_640_995_200, true),
        ("25e-1", 2, true),
        ("-0", 0, true),
        ("-0.0", 0, true),
        ("9223372036854775808", i64::MAX, true),
        ("-99999999999999999999999", i64::MIN, true),
        ("1e999", i64::MAX, true),
        ("-1e999", i64::MIN, true),
    ];
    for &(text, value, kept) in cases {
        let ping = format!(r#"{{"type":"ping","data":{{"timestamp":{text}}}}}"#);
        let msg = json::decode(ping.as_bytes()).unwrap_or_else(|e| panic!("{text}: {e}"));
        let Message::Ping(h) = msg else {
            panic!("{text}: {msg:?}")
        };
        assert_eq!(h.timestamp, value, "{text}");
        assert_eq!(h.raw_json(), kept.then_some(text), "{text}");
        assert_eq!(h.integer(), (!kept).then_some(value), "{text}");
        // The session answers Ping(h) with Pong(h).
        let pong = json::encode(&Message::Pong(h.clone()));
        assert_eq!(
            String::from_utf8(pong).unwrap(),
            format!(r#"{{"type":"pong","data":{{"timestamp":{text}}}}}"#)
        );
        // Binary has no room for the text: it carries the integer.
        let mut frame = binary::encode(&Message::Pong(h));
        assert_eq!(
            binary::decode_frame(&mut frame),
            Ok(Message::Pong(Heartbeat::new(value)))
        );
    }
    // Spacing around the number is not part of it.
    let spaced = br#"{"type":"ping","data":{"timestamp":  2.50  }}"#;
    let Ok(Message::Ping(h)) = json::decode(spaced) else {
        panic!()
    };
    assert_eq!(h.raw_json(), Some("2.50"));
    // Not numbers.
    for bad in [r#""1""#, "true", "null", "[1]", r#"{"t":1}"#] {
        let ping = format!(r#"{{"type":"ping","data":{{"timestamp":{bad}}}}}"#);
        match json::decode(ping.as_bytes()) {
            Err(DecodeError::InvalidField { msg_type, detail }) => {
                assert_eq!(msg_type, "ping");
                assert!(detail.contains("timestamp"), "{detail}");
            }
            other => panic!("{bad}: {other:?}"),
        }
    }
    let long = format!(
        r#"{{"type":"ping","data":{{"timestamp":1{}}}}}"#,
        "0".repeat(5000)
    );
    assert!(matches!(
        json::decode(long.as_bytes()),
        Err(DecodeError::TooLarge {
            what: "timestamp",
            ..
        })
    ));
}

#[test]
fn heartbeat_from_json_number_checks_the_grammar() {
    for good in ["0", "-0", "12", "1.0", "1e5", "1E-5", "-1.25e+10"] {
        assert!(Heartbeat::from_json_number(good).is_some(), "{good}");
    }
    for bad in [
        "", "-", "01", "1.", ".5", "1e", "1e+", "+1", " 1", "1 ", "0x10", "NaN", "1_0",
    ] {
        assert!(Heartbeat::from_json_number(bad).is_none(), "{bad:?}");
    }
    assert_eq!(Heartbeat::new(7).integer(), Some(7));
}

/// An agent serving a gateway that names connections with UUIDs: it answers every
/// message about a connection with the gateway's own string.
#[test]
fn string_ids_are_interned_and_answered_with_the_peers_string() {
    let ids = InternedIds::new();
    let connect = format!(
        r#"{{"type":"connect","data":{{"connection_id":"{UUID}","target_host":"example.com","target_port":80,"protocol":"tcp"}}}}"#
    );
    let Ok(Message::Connect(c)) = json::decode_with(connect.as_bytes(), &ids) else {
        panic!()
    };
    assert!(c.id.0 >= INTERNED_BASE);
    assert_eq!(ids.wire(c.id).as_deref(), Some(UUID));
    // Today's decoder refuses the same message, naming the id.
    assert!(matches!(
        json::decode(connect.as_bytes()),
        Err(DecodeError::InvalidConnId(s)) if s == UUID
    ));
    let replies = [
        Message::ConnectResponse(ConnectResponse {
            id: c.id,
            success: true,
            message: "connected".into(),
        }),
        Message::Data(Data {
            id: c.id,
            payload: Bytes::from_static(b"hello"),
        }),
        Message::Close(Close {
            id: c.id,
            reason: "done".into(),
        }),
        Message::Error(ErrorMsg {
            code: ErrorCode::ConnectionFailed,
            message: "refused: nope".into(),
            id: Some(c.id),
        }),
    ];
    for reply in replies {
        let text = json::encode_with(&reply, &ids);
        let v: serde_json::Value = serde_json::from_slice(&text).unwrap();
        assert_eq!(v["data"]["connection_id"], UUID, "{reply:?}");
        assert_eq!(json::decode_with(&text, &ids), Ok(reply));
    }
    // Data from the gateway for that connection, in the fast path's shape.
    let data = format!(r#"{{"type":"data","data":{{"connection_id":"{UUID}","payload":"aGk="}}}}"#);
    assert!(split::fast(data.as_bytes(), &ids).is_some());
    assert_eq!(
        json::decode_with(data.as_bytes(), &ids),
        Ok(Message::Data(Data {
            id: c.id,
            payload: Bytes::from_static(b"hi")
        }))
    );
    // Released: the string is forgotten; our numeric ids never touch the table.
    ids.release(c.id);
    assert!(ids.is_empty());
    assert_eq!(ids.wire(c.id), None);
    assert_eq!(ids.local("12"), Ok(ConnId(12)));
    assert!(ids.is_empty());
}

#[test]
fn numeric_ids_still_round_trip_through_an_interning_map() {
    let ids = InternedIds::new();
    let msg = Message::Connect(Connect {
        id: ConnId(17),
        host: "example.com".into(),
        port: 443,
        protocol: Protocol::Tcp,
    });
    let text = json::encode_with(&msg, &ids);
    assert_eq!(text, json::encode(&msg));
    assert_eq!(json::decode_with(&text, &ids), Ok(msg));
    // A JSON number id is its decimal text.
    let num = br#"{"type":"close","data":{"connection_id":17,"reason":"x"}}"#;
    assert_eq!(
        json::decode_with(num, &ids).unwrap().conn_id(),
        Some(ConnId(17))
    );
}

#[test]
fn string_id_bounds() {
    let ids = InternedIds::new();
    let at = "x".repeat(MAX_WIRE_ID_LEN);
    let over = "x".repeat(MAX_WIRE_ID_LEN + 1);
    let data =
        |id: &str| format!(r#"{{"type":"data","data":{{"connection_id":"{id}","payload":""}}}}"#);
    assert!(json::decode_with(data(&at).as_bytes(), &ids).is_ok());
    assert!(matches!(
        json::decode_with(data(&over).as_bytes(), &ids),
        Err(DecodeError::ConnIdRefused { .. })
    ));
    assert!(matches!(
        json::decode_with(data("").as_bytes(), &ids),
        Err(DecodeError::ConnIdRefused { .. })
    ));
    // In an error, "" still means "no connection".
    let e =
        br#"{"type":"error","data":{"code":"INTERNAL_ERROR","message":"m","connection_id":""}}"#;
    assert!(matches!(
        json::decode_with(e, &ids),
        Ok(Message::Error(ErrorMsg { id: None, .. }))
    ));
}

/// A message that names a connection but cannot be decoded says which connection.
#[test]
fn undecodable_messages_name_their_connection() {
    let cases: &[(&str, &str)] = &[
        // (message, what the cause is)
        (
            r#"{"type":"data","data":{"connection_id":"7","payload":"aGk"}}"#,
            "base64",
        ),
        (
            r#"{"type":"data","data":{"payload":"!!!!","connection_id":7}}"#,
            "base64",
        ),
        (
            r#"{"type":"data","data":{"connection_id":"7","payload":5}}"#,
            "payload",
        ),
        (r#"{"type":"data","data":{"connection_id":"7"}}"#, "payload"),
        (
            r#"{"type":"connect","data":{"connection_id":"7","target_host":"h","target_port":1,"protocol":"sctp"}}"#,
            "protocol",
        ),
        (
            r#"{"type":"connect","data":{"connection_id":"7","target_host":"h","target_port":70000,"protocol":"tcp"}}"#,
            "target_port",
        ),
        (
            r#"{"type":"connect_response","data":{"connection_id":"7","success":"yes"}}"#,
            "success",
        ),
        (
            r#"{"type":"close","data":{"connection_id":"7","reason":[]}}"#,
            "reason",
        ),
        (
            r#"{"type":"error","data":{"code":"NOPE","message":"m","connection_id":"7"}}"#,
            "NOPE",
        ),
        (
            r#"{"type":"window_update","data":{"connection_id":"7","increment":0}}"#,
            "increment",
        ),
    ];
    for &(text, cause) in cases {
        let e = json::decode_with(text.as_bytes(), &NumericIds).unwrap_err();
        assert_eq!(e.conn_id(), Some(ConnId(7)), "{text}: {e:?}");
        // The text a peer is told is the cause's own.
        assert_eq!(e.to_string(), e.cause().to_string());
        assert!(e.to_string().contains(cause), "{text}: {e}");
        // `decode` keeps returning the bare cause.
        assert_eq!(json::decode(text.as_bytes()), Err(e.into_cause()), "{text}");
    }
    // Through an interning map, the id's string is the peer's.
    let ids = InternedIds::new();
    let text = format!(r#"{{"type":"data","data":{{"connection_id":"{UUID}","payload":"aGk"}}}}"#);
    let e = json::decode_with(text.as_bytes(), &ids).unwrap_err();
    assert!(matches!(e.cause(), DecodeError::InvalidBase64(_)));
    assert_eq!(ids.wire(e.conn_id().unwrap()).as_deref(), Some(UUID));
    // No readable id, no connection.
    for text in [
        r#"{"type":"data","data":{"connection_id":"x7","payload":"aGk="}}"#,
        r#"{"type":"data","data":{"connection_id":true,"payload":"aGk"}}"#,
        r#"{"type":"error","data":{"code":"NOPE","message":"m"}}"#,
        r#"{"type":"data","data":"#,
    ] {
        let e = json::decode_with(text.as_bytes(), &NumericIds).unwrap_err();
        assert_eq!(e.conn_id(), None, "{text}: {e:?}");
    }
}

fn wire_id() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<u32>().prop_map(|n| n.to_string()),
        "[0-9]{1,12}",
        "[ -~]{1,130}",
        "\\PC{1,40}",
        Just(UUID.to_string()),
    ]
}

proptest! {
    /// Fast path and general parser agree on data messages with any id, numeric or
    /// interned, and the encoder's output decodes back with the peer's string.
    #[test]
    fn data_fast_path_and_general_parser_agree_on_string_ids(
        id in wire_id(),
        payload in proptest::collection::vec(any::<u8>(), 0..600),
        corrupt in proptest::option::of((any::<prop::sample::Index>(), any::<u8>())),
    ) {
        use base64::Engine;
        let escaped = serde_json::to_string(&id).unwrap();
        let b64 = base64::engine::general_purpose::STANDARD.encode(&payload);
        let mut text = format!(r#"{{"type":"data","data":{{"connection_id":{escaped},"payload":"{b64}"}}}}"#).into_bytes();
        if let Some((at, byte)) = corrupt {
            let i = at.index(text.len());
            text[i] = byte;
        }
        for numeric in [true, false] {
            let (a, b) = (InternedIds::new(), InternedIds::new());
            let (whole, general) = if numeric {
                (json::decode_with(&text, &NumericIds), split::general(&text, &NumericIds))
            } else {
                (json::decode_with(&text, &a), split::general(&text, &b))
            };
            prop_assert_eq!(&whole, &general);
            if !numeric {
                if let Ok(msg) = &whole {
                    let local = msg.conn_id().unwrap();
                    prop_assert_eq!(a.wire(local), b.wire(local));
                    let again = json::encode_with(msg, &a);
                    let back = json::decode_with(&again, &a);
                    prop_assert_eq!(back.as_ref(), Ok(msg));
                    if corrupt.is_none() {
                        let v: serde_json::Value = serde_json::from_slice(&again).unwrap();
                        prop_assert_eq!(v["data"]["connection_id"].as_str(), Some(id.as_str()));
                        prop_assert_eq!(v["data"]["payload"].as_str(), Some(b64.as_str()));
                    }
                }
            }
        }
        if corrupt.is_none() {
            let ids = InternedIds::new();
            prop_assert!(json::decode_with(&text, &ids).is_ok() == (id.len() <= MAX_WIRE_ID_LEN));
        }
    }
}
