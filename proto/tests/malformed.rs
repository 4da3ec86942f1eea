//! Malformed input in both encodings: every failure is a specific [`DecodeError`],
//! never a panic, and allocation is bounded before anything is read.

use anyproxy_proto::{
    binary, json, Auth, AuthResponse, Close, ConnId, Connect, ConnectResponse, Data, DecodeError,
    ErrorCode, ErrorMsg, Fin, Forward, ForwardResponse, Heartbeat, Message, MessageKind, Protocol,
    Unforward, WindowUpdate, MAX_DATA_PAYLOAD, MAX_STRING_LEN,
};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use bytes::{BufMut, Bytes, BytesMut};
use serde_json::{json as j, Value};

// ------------------------------------------------------------------ samples

/// At least one message of every type, with every variant that changes the layout.
fn samples() -> Vec<Message> {
    vec![
        Message::Auth(Auth {
            username: "agent".into(),
            password: "pässword".into(),
            client_id: "c-1".into(),
        }),
        Message::AuthResponse(AuthResponse {
            success: true,
            message: "ok".into(),
        }),
        Message::AuthResponse(AuthResponse {
            success: false,
            message: "no".into(),
        }),
        Message::Connect(Connect {
            id: ConnId(7),
            host: "example.com".into(),
            port: 443,
            protocol: Protocol::Tcp,
        }),
        Message::Connect(Connect {
            id: ConnId(8),
            host: "::1".into(),
            port: 53,
            protocol: Protocol::Udp,
        }),
        Message::ConnectResponse(ConnectResponse {
            id: ConnId(7),
            success: true,
            message: "".into(),
        }),
        Message::ConnectResponse(ConnectResponse {
            id: ConnId(8),
            success: false,
            message: "dns: no such host".into(),
        }),
        Message::Data(Data {
            id: ConnId(7),
            payload: Bytes::from_static(b"\xff\x00hello"),
        }),
        Message::Data(Data {
            id: ConnId(7),
            payload: Bytes::new(),
        }),
        Message::Close(Close {
            id: ConnId(7),
            reason: "eof".into(),
        }),
        Message::Ping(Heartbeat::new(42)),
        Message::Pong(Heartbeat::new(-42)),
        Message::Error(ErrorMsg {
            code: ErrorCode::ConnectionFailed,
            message: "refused: nope".into(),
            id: Some(ConnId(7)),
        }),
        Message::Error(ErrorMsg {
            code: ErrorCode::InternalError,
            message: "oops".into(),
            id: None,
        }),
        Message::WindowUpdate(WindowUpdate {
            id: ConnId(7),
            increment: 65536,
        }),
        Message::Fin(Fin { id: ConnId(7) }),
        Message::Forward(Forward {
            listen_port: 8022,
            target_host: "localhost".into(),
            target_port: 22,
            protocol: Protocol::Tcp,
        }),
        Message::ForwardResponse(ForwardResponse {
            listen_port: 8022,
            success: true,
            message: "listening".into(),
            protocol: Protocol::Tcp,
        }),
        Message::Unforward(Unforward {
            listen_port: 8022,
            protocol: Protocol::Tcp,
        }),
    ]
}

fn sample_of(kind: MessageKind) -> Message {
    samples()
        .into_iter()
        .find(|m| m.kind() == kind)
        .expect("a sample of every kind")
}

fn kind_tag(kind: MessageKind) -> u8 {
    MessageKind::ALL.iter().position(|k| *k == kind).unwrap() as u8 + 1
}

#[test]
fn samples_cover_every_type() {
    for kind in MessageKind::ALL {
        assert!(samples().iter().any(|m| m.kind() == kind), "{kind:?}");
        assert_eq!(
            binary::encode(&sample_of(kind))[0],
            kind_tag(kind),
            "tag of {kind:?}"
        );
    }
}

// ------------------------------------------------------------------ binary helpers

fn decode_bin(bytes: &[u8]) -> Result<Message, DecodeError> {
    binary::decode_frame(&mut Bytes::copy_from_slice(bytes))
}

fn frame(tag: u8, id: u32, body: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(binary::HEADER_LEN + body.len());
    f.push(tag);
    f.extend_from_slice(&id.to_be_bytes());
    f.extend_from_slice(&(body.len() as u32).to_be_bytes());
    f.extend_from_slice(body);
    f
}

fn header(tag: u8, id: u32, declared_len: u32) -> Vec<u8> {
    let mut f = vec![tag];
    f.extend_from_slice(&id.to_be_bytes());
    f.extend_from_slice(&declared_len.to_be_bytes());
    f
}

/// `u16` length prefix and the raw bytes, without any validation.
fn raw_str(bytes: &[u8]) -> Vec<u8> {
    let mut v = (bytes.len() as u16).to_be_bytes().to_vec();
    v.extend_from_slice(bytes);
    v
}

/// A control-frame body for `kind` whose string field number `which` is `bad` and
/// whose other strings are fine. Returns the field's name and the body.
fn body_with_string(kind: MessageKind, which: usize, bad: &[u8]) -> (&'static str, Vec<u8>) {
    let ok = raw_str(b"ok");
    let s = |i: usize| if i == which { raw_str(bad) } else { ok.clone() };
    match kind {
        MessageKind::Auth => {
            let names = ["username", "password", "client_id"];
            (names[which], [s(0), s(1), s(2)].concat())
        }
        MessageKind::AuthResponse | MessageKind::ConnectResponse => {
            ("message", [vec![1], s(0)].concat())
        }
        MessageKind::Connect => ("target_host", [vec![0, 0, 80], s(0)].concat()),
        MessageKind::Close => ("reason", s(0)),
        MessageKind::Error => ("message", [vec![2, 0], s(0)].concat()),
        _ => unreachable!("{kind:?} has no strings"),
    }
}

/// (kind, index) of every string field of the binary encoding.
fn string_fields() -> Vec<(MessageKind, usize)> {
    vec![
        (MessageKind::Auth, 0),
        (MessageKind::Auth, 1),
        (MessageKind::Auth, 2),
        (MessageKind::AuthResponse, 0),
        (MessageKind::Connect, 0),
        (MessageKind::ConnectResponse, 0),
        (MessageKind::Close, 0),
        (MessageKind::Error, 0),
    ]
}

fn is_char_boundary(bytes: &[u8], at: usize) -> bool {
    at == bytes.len() || (bytes[at] as i8) >= -0x40
}

// ------------------------------------------------------------------ binary: truncation

#[test]
fn binary_truncated_at_every_offset_is_truncated() {
    for msg in samples() {
        let wire = binary::encode(&msg);
        for cut in 0..wire.len() {
            let result = decode_bin(&wire[..cut]);
            match result {
                Err(DecodeError::Truncated { needed, available }) => {
                    assert!(needed > available, "{msg:?} cut at {cut}");
                    assert_eq!(available, cut, "{msg:?} cut at {cut}");
                }
                other => panic!("{msg:?} cut at {cut}: {other:?}"),
            }
            // The iterator reports it too, then stops.
            let mut frames = binary::Frames::new(Bytes::copy_from_slice(&wire[..cut]));
            if cut > 0 {
                assert!(matches!(
                    frames.next(),
                    Some(Err(DecodeError::Truncated { .. }))
                ));
            }
            assert!(frames.next().is_none());
        }
        assert_eq!(decode_bin(&wire), Ok(msg));
    }
}

#[test]
fn binary_second_frame_truncated_after_a_good_one() {
    for msg in samples() {
        let wire = binary::encode(&msg);
        for cut in 1..wire.len() {
            let mut buf = wire.to_vec();
            buf.extend_from_slice(&wire[..cut]);
            let items: Vec<_> = binary::Frames::new(Bytes::from(buf)).collect();
            assert_eq!(items.len(), 2);
            assert_eq!(items[0], Ok(msg.clone()));
            assert!(matches!(items[1], Err(DecodeError::Truncated { .. })));
        }
    }
}

#[test]
fn binary_body_shorter_than_its_fields_is_truncated() {
    // The frame is complete, but its declared body ends inside a field.
    for msg in samples() {
        if msg.kind() == MessageKind::Data {
            continue; // any length is a valid data payload
        }
        let wire = binary::encode(&msg);
        let body = &wire[binary::HEADER_LEN..];
        for short in 0..body.len() {
            let f = frame(wire[0], 7, &body[..short]);
            assert!(
                matches!(decode_bin(&f), Err(DecodeError::Truncated { .. })),
                "{msg:?} with a body of {short} bytes: {:?}",
                decode_bin(&f)
            );
        }
    }
}

// ------------------------------------------------------------------ binary: limits

#[test]
fn binary_data_over_max_payload_is_too_large() {
    for len in [MAX_DATA_PAYLOAD as u32 + 1, u32::MAX] {
        // Only the header is present: the limit is checked before waiting for the body.
        let err = decode_bin(&header(binary::tag::DATA, 1, len)).unwrap_err();
        assert_eq!(
            err,
            DecodeError::TooLarge {
                what: "frame body",
                len: len as usize,
                max: MAX_DATA_PAYLOAD
            }
        );
    }
    // Exactly at the limit is allowed.
    assert!(matches!(
        decode_bin(&header(binary::tag::DATA, 1, MAX_DATA_PAYLOAD as u32)),
        Err(DecodeError::Truncated { .. })
    ));
    let payload = vec![0xab; MAX_DATA_PAYLOAD];
    let f = frame(binary::tag::DATA, 1, &payload);
    assert_eq!(
        decode_bin(&f),
        Ok(Message::Data(Data {
            id: ConnId(1),
            payload: payload.into()
        }))
    );
}

#[test]
fn binary_control_over_max_body_is_too_large() {
    for kind in MessageKind::ALL {
        if kind == MessageKind::Data {
            continue;
        }
        for len in [binary::MAX_CONTROL_BODY as u32 + 1, u32::MAX] {
            let err = decode_bin(&header(kind_tag(kind), 1, len)).unwrap_err();
            assert_eq!(
                err,
                DecodeError::TooLarge {
                    what: "frame body",
                    len: len as usize,
                    max: binary::MAX_CONTROL_BODY
                },
                "{kind:?}"
            );
        }
        // At the limit: not refused for size (it is merely incomplete here).
        assert!(matches!(
            decode_bin(&header(kind_tag(kind), 1, binary::MAX_CONTROL_BODY as u32)),
            Err(DecodeError::Truncated { .. })
        ));
    }
    // A data frame may be larger than a control body.
    let payload = vec![1u8; binary::MAX_CONTROL_BODY + 1];
    assert!(decode_bin(&frame(binary::tag::DATA, 1, &payload)).is_ok());
}

#[test]
fn binary_max_control_body_fits_the_largest_message() {
    // Three maximal strings (auth) must fit, so the encoder's output is always accepted.
    let s = "x".repeat(MAX_STRING_LEN);
    let msg = Message::Auth(Auth {
        username: s.clone(),
        password: s.clone(),
        client_id: s,
    });
    let wire = binary::encode(&msg);
    assert!(wire.len() - binary::HEADER_LEN <= binary::MAX_CONTROL_BODY);
    assert_eq!(decode_bin(&wire), Ok(msg));
}

#[test]
fn binary_string_over_max_len_is_too_large() {
    let long = vec![b'a'; MAX_STRING_LEN + 1];
    for (kind, which) in string_fields() {
        let (field, body) = body_with_string(kind, which, &long);
        let err = decode_bin(&frame(kind_tag(kind), 3, &body)).unwrap_err();
        assert_eq!(
            err,
            DecodeError::TooLarge {
                what: field,
                len: MAX_STRING_LEN + 1,
                max: MAX_STRING_LEN
            },
            "{kind:?} {field}"
        );
        // A declared length of u16::MAX with no bytes behind it: still TooLarge.
        let mut body = body.clone();
        let prefix_at = body.len() - long.len() - 2;
        body.truncate(prefix_at);
        body.extend_from_slice(&u16::MAX.to_be_bytes());
        assert!(matches!(
            decode_bin(&frame(kind_tag(kind), 3, &body)),
            Err(DecodeError::TooLarge { what, .. }) if what == field
        ));
        // Exactly at the limit is fine.
        let (_, body) = body_with_string(kind, which, &long[..MAX_STRING_LEN]);
        assert!(
            decode_bin(&frame(kind_tag(kind), 3, &body)).is_ok(),
            "{kind:?}"
        );
    }
}

#[test]
fn binary_encoder_clamps_oversized_strings_at_a_char_boundary() {
    // "é" is two bytes: 4097 bytes of them cannot be cut at exactly 4096 + 1.
    let long = format!("a{}", "é".repeat(MAX_STRING_LEN));
    let msg = Message::Close(Close {
        id: ConnId(1),
        reason: long.clone(),
    });
    let Ok(Message::Close(c)) = decode_bin(&binary::encode(&msg)) else {
        panic!("the encoder's output must decode");
    };
    assert!(c.reason.len() <= MAX_STRING_LEN);
    assert_eq!(c.reason.len(), MAX_STRING_LEN - 1);
    assert!(long.starts_with(&c.reason));
}

// ------------------------------------------------------------------ binary: bad content

#[test]
fn binary_unknown_tag_is_unknown_type() {
    for tag in [0x00u8, 0x0f, 0x3f, 0x40, 0x80, 0xff] {
        let err = decode_bin(&frame(tag, 0, &[1, 2, 3])).unwrap_err();
        assert_eq!(err, DecodeError::UnknownType(format!("0x{tag:02x}")));
        // Even with an empty body, or a header only.
        assert_eq!(
            decode_bin(&frame(tag, 0, &[])),
            Err(DecodeError::UnknownType(format!("0x{tag:02x}")))
        );
    }
}

#[test]
fn zero_window_increment_is_refused_in_both_encodings() {
    let err = decode_bin(&frame(0x0a, 3, &0u32.to_be_bytes())).unwrap_err();
    assert!(
        matches!(
            err,
            DecodeError::InvalidField {
                msg_type: "window_update",
                ..
            }
        ),
        "{err:?}"
    );
    let err =
        json::decode(br#"{"type":"window_update","data":{"connection_id":"3","increment":0}}"#)
            .unwrap_err();
    assert!(
        matches!(
            err,
            DecodeError::InvalidField {
                msg_type: "window_update",
                ..
            }
        ),
        "{err:?}"
    );
    // A body of the wrong size is refused, not misread.
    assert!(decode_bin(&frame(0x0a, 3, &[0, 1])).is_err());
    assert!(decode_bin(&frame(0x0b, 3, &[0])).is_err());
}

#[test]
fn binary_bad_utf8_in_every_string_is_invalid_utf8() {
    let bad: [&[u8]; 5] = [
        b"\xff",
        b"ok\x80",
        b"\xc3",         // truncated two-byte sequence
        b"\xed\xa0\x80", // UTF-16 surrogate
        b"\xc0\xaf",     // overlong '/'
    ];
    for (kind, which) in string_fields() {
        for bytes in bad {
            let (field, body) = body_with_string(kind, which, bytes);
            assert_eq!(
                decode_bin(&frame(kind_tag(kind), 3, &body)),
                Err(DecodeError::InvalidUtf8(field)),
                "{kind:?} {field} {bytes:?}"
            );
        }
    }
}

/// The message with every optional binary field present: a forward's protocol byte is
/// written for `udp` only, so bytes after a TCP forward would read as that byte.
fn with_optional_fields(msg: Message) -> Message {
    match msg {
        Message::Forward(f) => Message::Forward(Forward {
            protocol: Protocol::Udp,
            ..f
        }),
        Message::ForwardResponse(f) => Message::ForwardResponse(ForwardResponse {
            protocol: Protocol::Udp,
            ..f
        }),
        Message::Unforward(f) => Message::Unforward(Unforward {
            protocol: Protocol::Udp,
            ..f
        }),
        other => other,
    }
}

#[test]
fn binary_trailing_bytes_in_a_body_are_invalid_field() {
    for msg in samples().into_iter().map(with_optional_fields) {
        if msg.kind() == MessageKind::Data {
            continue; // a data body is all payload
        }
        let wire = binary::encode(&msg);
        for extra in [&[0u8][..], &[1, 2, 3]] {
            let mut body = wire[binary::HEADER_LEN..].to_vec();
            body.extend_from_slice(extra);
            let id = u32::from_be_bytes(wire[1..5].try_into().unwrap());
            match decode_bin(&frame(wire[0], id, &body)) {
                Err(DecodeError::InvalidField { msg_type, detail }) => {
                    assert_eq!(msg_type, msg.kind().as_str());
                    assert!(
                        detail.contains(&format!("{} unexpected bytes", extra.len())),
                        "{detail}"
                    );
                }
                other => panic!("{msg:?} + {extra:?}: {other:?}"),
            }
        }
    }
}

#[test]
fn binary_bool_byte_other_than_0_or_1_is_invalid_field() {
    let cases: [(MessageKind, Vec<u8>); 3] = [
        (MessageKind::AuthResponse, [vec![2], raw_str(b"m")].concat()),
        (
            MessageKind::ConnectResponse,
            [vec![2], raw_str(b"m")].concat(),
        ),
        // error: code 1, then the has-connection-id flag
        (MessageKind::Error, [vec![1, 2], raw_str(b"m")].concat()),
    ];
    for (kind, body) in cases {
        for bad in [2u8, 0x80, 0xff] {
            let mut body = body.clone();
            let at = if kind == MessageKind::Error { 1 } else { 0 };
            body[at] = bad;
            match decode_bin(&frame(kind_tag(kind), 1, &body)) {
                Err(DecodeError::InvalidField { msg_type, detail }) => {
                    assert_eq!(msg_type, kind.as_str());
                    assert!(detail.contains(&bad.to_string()), "{detail}");
                }
                other => panic!("{kind:?} bool {bad}: {other:?}"),
            }
        }
    }
}

#[test]
fn binary_unknown_protocol_byte() {
    for bad in [2u8, 6, 17, 0xff] {
        let body = [vec![bad, 0, 80], raw_str(b"h")].concat();
        assert_eq!(
            decode_bin(&frame(binary::tag::CONNECT, 1, &body)),
            Err(DecodeError::UnknownProtocol(bad.to_string()))
        );
    }
}

#[test]
fn binary_forward_protocol_byte_is_optional_and_checked() {
    let fixed = [vec![0x1f, 0x40, 0, 53], raw_str(b"h")].concat();
    let decoded = |trailer: &[u8]| {
        let body = [fixed.clone(), trailer.to_vec()].concat();
        decode_bin(&frame(binary::tag::FORWARD, 0, &body))
    };
    let forward = |protocol| {
        Ok(Message::Forward(Forward {
            listen_port: 8000,
            target_host: "h".into(),
            target_port: 53,
            protocol,
        }))
    };
    assert_eq!(decoded(&[]), forward(Protocol::Tcp), "absent means tcp");
    assert_eq!(decoded(&[0]), forward(Protocol::Tcp));
    assert_eq!(decoded(&[1]), forward(Protocol::Udp));
    for bad in [2u8, 17, 0xff] {
        assert_eq!(
            decoded(&[bad]),
            Err(DecodeError::UnknownProtocol(bad.to_string()))
        );
    }
    let response = [vec![0x1f, 0x40, 1], raw_str(b"ok"), vec![1]].concat();
    assert_eq!(
        decode_bin(&frame(binary::tag::FORWARD_RESPONSE, 0, &response)),
        Ok(Message::ForwardResponse(ForwardResponse {
            listen_port: 8000,
            success: true,
            message: "ok".into(),
            protocol: Protocol::Udp,
        }))
    );
    assert_eq!(
        decode_bin(&frame(binary::tag::UNFORWARD, 0, &[0x1f, 0x40, 1])),
        Ok(Message::Unforward(Unforward {
            listen_port: 8000,
            protocol: Protocol::Udp,
        }))
    );
    assert_eq!(
        decode_bin(&frame(binary::tag::UNFORWARD, 0, &[0x1f, 0x40, 9])),
        Err(DecodeError::UnknownProtocol("9".into()))
    );
}

#[test]
fn binary_unknown_error_code_byte() {
    for bad in [0u8, 7, 0xff] {
        let body = [vec![bad, 0], raw_str(b"m")].concat();
        assert_eq!(
            decode_bin(&frame(binary::tag::ERROR, 0, &body)),
            Err(DecodeError::UnknownErrorCode(bad.to_string()))
        );
    }
}

#[test]
fn binary_error_without_id_flag_ignores_the_header_id() {
    let body = [vec![2, 0], raw_str(b"m")].concat();
    assert_eq!(
        decode_bin(&frame(binary::tag::ERROR, 99, &body)),
        Ok(Message::Error(ErrorMsg {
            code: ErrorCode::InvalidMessage,
            message: "m".into(),
            id: None
        }))
    );
}

#[test]
fn binary_data_payload_is_a_zero_copy_slice_of_the_input() {
    let payload: Vec<u8> = (0..=255u8).cycle().take(10_000).collect();
    let mut buf = BytesMut::new();
    binary::encode_into(&Message::Ping(Heartbeat::new(1)), &mut buf);
    binary::encode_into(
        &Message::Data(Data {
            id: ConnId(5),
            payload: Bytes::from(payload.clone()),
        }),
        &mut buf,
    );
    let input = buf.freeze();
    let range = input.as_ptr() as usize..input.as_ptr() as usize + input.len();
    let msgs: Vec<Message> = binary::Frames::new(input.clone())
        .collect::<Result<_, _>>()
        .unwrap();
    let Message::Data(d) = &msgs[1] else {
        panic!("{msgs:?}")
    };
    assert_eq!(d.payload, payload);
    let start = d.payload.as_ptr() as usize;
    assert!(range.contains(&start), "payload was copied");
    assert!(start + d.payload.len() <= range.end);
    // Exactly where the payload sits in the frame: after two headers and the ping body.
    assert_eq!(start - range.start, binary::HEADER_LEN * 2 + 8);

    // decode_frame too.
    let mut single = binary::encode(&Message::Data(Data {
        id: ConnId(5),
        payload: Bytes::from(payload),
    }));
    let base = single.as_ptr() as usize;
    let Ok(Message::Data(d)) = binary::decode_frame(&mut single) else {
        panic!()
    };
    assert_eq!(d.payload.as_ptr() as usize, base + binary::HEADER_LEN);
}

#[test]
fn binary_never_panics_on_short_garbage() {
    // Every 1- and 2-byte input, and every tag with a few body shapes.
    for a in 0..=255u8 {
        let _ = decode_bin(&[a]);
        for b in 0..=255u8 {
            let _ = decode_bin(&[a, b]);
        }
        for body in [
            &[][..],
            &[0],
            &[1],
            &[0, 0],
            &[0xff; 3],
            &[0, 1, 0xff, 0xff],
        ] {
            let _ = decode_bin(&frame(a, 0, body));
            let _: Vec<_> = binary::Frames::new(Bytes::from(frame(a, 1, body))).collect();
        }
    }
}

// ------------------------------------------------------------------ JSON helpers

fn decode_value(v: &Value) -> Result<Message, DecodeError> {
    json::decode(&serde_json::to_vec(v).unwrap())
}

fn as_value(msg: &Message) -> Value {
    serde_json::from_slice(&json::encode(msg)).unwrap()
}

#[derive(Clone, Copy, Debug)]
enum FieldType {
    Str,
    Bool,
    Port,
    Timestamp,
    Id,
    Code,
    Protocol,
    Payload,
}

/// Every body field of the JSON encoding: (type, field, its type, required).
fn json_fields() -> Vec<(MessageKind, &'static str, FieldType, bool)> {
    use FieldType::*;
    use MessageKind as K;
    vec![
        (K::Auth, "username", Str, true),
        (K::Auth, "password", Str, true),
        (K::Auth, "client_id", Str, true),
        (K::AuthResponse, "success", Bool, true),
        // The texts for people are optional (absent or null: empty), as the API document
        // leaves them open.
        (K::AuthResponse, "message", Str, false),
        (K::Connect, "connection_id", Id, true),
        (K::Connect, "target_host", Str, true),
        (K::Connect, "target_port", Port, true),
        (K::Connect, "protocol", Protocol, true),
        (K::ConnectResponse, "connection_id", Id, true),
        (K::ConnectResponse, "success", Bool, true),
        (K::ConnectResponse, "message", Str, false),
        (K::Data, "connection_id", Id, true),
        (K::Data, "payload", Payload, true),
        (K::Close, "connection_id", Id, true),
        (K::Close, "reason", Str, false),
        (K::Ping, "timestamp", Timestamp, true),
        (K::Pong, "timestamp", Timestamp, true),
        (K::Error, "code", Code, true),
        (K::Error, "message", Str, false),
        (K::Error, "connection_id", Id, false),
    ]
}

/// A sample whose JSON carries every field of its kind (the error sample with an id).
fn full_sample(kind: MessageKind) -> Value {
    let msg = samples()
        .into_iter()
        .find(|m| m.kind() == kind && (kind != MessageKind::Error || m.conn_id().is_some()))
        .unwrap();
    as_value(&msg)
}

fn with_field(kind: MessageKind, field: &str, value: Value) -> Value {
    let mut v = full_sample(kind);
    v["data"][field] = value;
    v
}

fn without_field(kind: MessageKind, field: &str) -> Value {
    let mut v = full_sample(kind);
    v["data"].as_object_mut().unwrap().remove(field);
    v
}

fn assert_invalid_field(result: Result<Message, DecodeError>, kind: MessageKind, field: &str) {
    match result {
        Err(DecodeError::InvalidField { msg_type, detail }) => {
            assert_eq!(msg_type, kind.as_str(), "{detail}");
            assert!(
                detail.contains(field),
                "detail of {kind:?}.{field} should name the field: {detail}"
            );
        }
        other => panic!("{kind:?}.{field}: expected InvalidField, got {other:?}"),
    }
}

// ------------------------------------------------------------------ JSON: structure

#[test]
fn json_missing_required_field_is_invalid_field_naming_it() {
    for (kind, field, _, required) in json_fields() {
        let result = decode_value(&without_field(kind, field));
        if required {
            assert_invalid_field(result, kind, field);
        } else {
            assert!(result.is_ok(), "{kind:?}.{field} is optional: {result:?}");
        }
    }
}

#[test]
fn json_wrong_type_is_invalid_field_naming_it() {
    use FieldType::*;
    for (kind, field, ty, required) in json_fields() {
        let wrong: Vec<Value> = match ty {
            Str | Code | Protocol | Payload => vec![j!(5), j!(true), j!(["x"]), j!({"a": "b"})],
            Bool => vec![j!("true"), j!(1), j!(null)],
            Port => vec![j!("80"), j!(-1), j!(65536), j!(80.5), j!(null)],
            // Any JSON number is a timestamp (1.5 and 2^63 included); nothing else is.
            Timestamp => vec![j!("1640995200"), j!(true), j!([1]), j!({"t": 1}), j!(null)],
            Id => vec![j!(true), j!(-1), j!(1.5), j!(["1"]), j!({"id": "1"})],
        };
        for w in wrong {
            let result = decode_value(&with_field(kind, field, w.clone()));
            assert_invalid_field(result, kind, field);
        }
        // `null` for a required string field is a wrong type too (for an optional one it
        // means absent).
        if required && matches!(ty, Str | Code | Protocol | Payload) {
            assert_invalid_field(
                decode_value(&with_field(kind, field, j!(null))),
                kind,
                field,
            );
        }
    }
}

#[test]
fn json_missing_or_wrong_data_is_invalid_field() {
    for kind in MessageKind::ALL {
        for data in [
            None,
            Some(j!(null)),
            Some(j!(5)),
            Some(j!("x")),
            Some(j!([])),
        ] {
            let mut v = j!({ "type": kind.as_str() });
            if let Some(d) = data.clone() {
                v["data"] = d;
            }
            match decode_value(&v) {
                Err(DecodeError::InvalidField { msg_type, .. }) => {
                    assert_eq!(msg_type, kind.as_str())
                }
                other => panic!("{kind:?} data={data:?}: {other:?}"),
            }
        }
        let missing = decode_value(&j!({ "type": kind.as_str() }));
        assert!(
            matches!(missing, Err(DecodeError::InvalidField { detail, .. }) if detail.contains("data"))
        );
    }
}

#[test]
fn json_unknown_type_is_unknown_type() {
    for t in ["hello", "", "AUTH", "Ping", "data ", "auth\u{0}", "éé"] {
        let v = j!({"type": t, "data": {"timestamp": 1}});
        assert_eq!(decode_value(&v), Err(DecodeError::UnknownType(t.into())));
    }
    // A huge type string is cut in the error, so that it can be echoed safely.
    let long = "x".repeat(10_000);
    match decode_value(&j!({"type": long, "data": {}})) {
        Err(DecodeError::UnknownType(t)) => assert!(t.len() <= 64 && long.starts_with(&t)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn json_malformed_envelope_is_json_error() {
    let cases: [&[u8]; 12] = [
        b"",
        b"   ",
        b"null",
        b"[1,2]",
        b"\"ping\"",
        b"{",
        b"{\"type\":\"ping\",\"data\":{\"timestamp\":1}",
        b"{\"data\":{\"timestamp\":1}}",
        b"{\"type\":5,\"data\":{\"timestamp\":1}}",
        b"{\"type\":\"ping\",\"data\":{\"timestamp\":1}} trailing",
        b"{\"type\":\"ping\",\"type\":\"pong\",\"data\":{\"timestamp\":1}}",
        b"{'type':'ping'}",
    ];
    for input in cases {
        assert!(
            matches!(json::decode(input), Err(DecodeError::Json(_))),
            "{:?}: {:?}",
            String::from_utf8_lossy(input),
            json::decode(input)
        );
    }
}

#[test]
fn json_truncated_at_every_offset_is_an_error() {
    for msg in samples() {
        let wire = json::encode(&msg);
        for cut in 0..wire.len() {
            let result = json::decode(&wire[..cut]);
            if is_char_boundary(&wire, cut) {
                assert!(
                    matches!(result, Err(DecodeError::Json(_))),
                    "{msg:?} cut at {cut}: {result:?}"
                );
            } else {
                assert_eq!(result, Err(DecodeError::InvalidUtf8("message")));
            }
        }
    }
}

// ------------------------------------------------------------------ JSON: bad content

#[test]
fn json_bad_utf8_is_invalid_utf8() {
    for msg in samples() {
        let good = String::from_utf8(json::encode(&msg)).unwrap();
        // Inside an existing string value, and in an unknown field.
        let mut in_string = good.clone().into_bytes();
        let at = in_string.len() - 3;
        in_string.splice(at..at, [0xff, 0xfe]);
        let in_extra = good
            .replacen("\"data\":{", "\"data\":{\"x\":\"\u{1}\",", 1)
            .into_bytes()
            .into_iter()
            .map(|b| if b == 1 { 0x80 } else { b })
            .collect::<Vec<u8>>();
        for input in [in_string, in_extra] {
            assert_eq!(
                json::decode(&input),
                Err(DecodeError::InvalidUtf8("message")),
                "{}",
                String::from_utf8_lossy(&input)
            );
        }
    }
    // A JSON escape for a lone surrogate is not a valid string either; it names the field.
    let v = br#"{"type":"close","data":{"connection_id":"1","reason":"\ud800"}}"#;
    assert_invalid_field(json::decode(v), MessageKind::Close, "reason");
}

#[test]
fn json_bad_base64_is_invalid_base64() {
    for payload in [
        "!!!!",
        "AAA",  // missing padding
        "A",    // impossible length
        "AB==", // non-zero trailing bits
        "A===",
        "AAAA====",
        "AA==AA==", // padding in the middle
        "-_8=",     // URL-safe alphabet
        "AAAA AAAA",
        "AAAA\nAAAA",
        "é",
    ] {
        let v = with_field(MessageKind::Data, "payload", j!(payload));
        assert!(
            matches!(decode_value(&v), Err(DecodeError::InvalidBase64(_))),
            "{payload:?}: {:?}",
            decode_value(&v)
        );
    }
}

#[test]
fn json_non_numeric_connection_id_is_invalid_conn_id() {
    let bad = [
        "abc",
        "unique_connection_id",
        "-1",
        "+1",
        " 1",
        "1 ",
        "1.0",
        "1e3",
        "0x10",
        "4294967296",
        "99999999999999999999",
        "１", // fullwidth digit one
    ];
    for kind in [
        MessageKind::Connect,
        MessageKind::ConnectResponse,
        MessageKind::Data,
        MessageKind::Close,
        MessageKind::Error,
    ] {
        for id in bad {
            let v = with_field(kind, "connection_id", j!(id));
            assert_eq!(
                decode_value(&v),
                Err(DecodeError::InvalidConnId(id.into())),
                "{kind:?} {id:?}"
            );
        }
        // The empty string means "none" only where the id is optional.
        let empty = decode_value(&with_field(kind, "connection_id", j!("")));
        if kind == MessageKind::Error {
            assert!(matches!(
                empty,
                Ok(Message::Error(ErrorMsg { id: None, .. }))
            ));
        } else {
            assert_eq!(empty, Err(DecodeError::InvalidConnId(String::new())));
        }
        // A number out of u32 range.
        let v = with_field(kind, "connection_id", j!(4_294_967_296u64));
        assert_eq!(
            decode_value(&v),
            Err(DecodeError::InvalidConnId("4294967296".into()))
        );
    }
    // A long id is cut in the error.
    let long = "z".repeat(1000);
    match decode_value(&with_field(MessageKind::Close, "connection_id", j!(long))) {
        Err(DecodeError::InvalidConnId(s)) => assert!(s.len() <= 64),
        other => panic!("{other:?}"),
    }
}

#[test]
fn json_unknown_error_code() {
    for code in ["auth_failed", "NOPE", "", "AUTH_FAILED "] {
        let v = with_field(MessageKind::Error, "code", j!(code));
        assert_eq!(
            decode_value(&v),
            Err(DecodeError::UnknownErrorCode(code.into()))
        );
    }
}

#[test]
fn json_unknown_protocol() {
    for p in ["TCP", "Udp", "sctp", "", "tcp6"] {
        let v = with_field(MessageKind::Connect, "protocol", j!(p));
        assert_eq!(
            decode_value(&v),
            Err(DecodeError::UnknownProtocol(p.into()))
        );
    }
}

// ------------------------------------------------------------------ JSON: limits

#[test]
fn json_over_max_message_len_is_too_large() {
    // Valid JSON, but one byte over the limit (padded with whitespace).
    let mut input = json::encode(&Message::Ping(Heartbeat::new(1)));
    input.resize(json::MAX_MESSAGE_LEN + 1, b' ');
    assert_eq!(
        json::decode(&input),
        Err(DecodeError::TooLarge {
            what: "JSON message",
            len: json::MAX_MESSAGE_LEN + 1,
            max: json::MAX_MESSAGE_LEN
        })
    );
    // At the limit it decodes.
    input.truncate(json::MAX_MESSAGE_LEN);
    assert_eq!(json::decode(&input), Ok(Message::Ping(Heartbeat::new(1))));
}

#[test]
fn json_max_data_payload_fits_and_one_more_byte_does_not() {
    let max = Message::Data(Data {
        id: ConnId(u32::MAX),
        payload: Bytes::from(vec![0xa5; MAX_DATA_PAYLOAD]),
    });
    let wire = json::encode(&max);
    assert!(wire.len() <= json::MAX_MESSAGE_LEN);
    assert_eq!(json::decode(&wire), Ok(max));

    let over = STANDARD.encode(vec![0u8; MAX_DATA_PAYLOAD + 3]);
    let v = with_field(MessageKind::Data, "payload", j!(over));
    assert!(serde_json::to_vec(&v).unwrap().len() <= json::MAX_MESSAGE_LEN);
    assert!(matches!(
        decode_value(&v),
        Err(DecodeError::TooLarge {
            what: "data payload",
            max: MAX_DATA_PAYLOAD,
            ..
        })
    ));
}

#[test]
fn json_string_over_max_len_is_too_large() {
    let long = "é".repeat(MAX_STRING_LEN / 2) + "x"; // MAX_STRING_LEN + 1 bytes
    let at_limit = "é".repeat(MAX_STRING_LEN / 2);
    for (kind, field, ty, _) in json_fields() {
        if !matches!(ty, FieldType::Str) {
            continue;
        }
        let v = with_field(kind, field, j!(long));
        assert_eq!(
            decode_value(&v),
            Err(DecodeError::TooLarge {
                what: field,
                len: MAX_STRING_LEN + 1,
                max: MAX_STRING_LEN
            }),
            "{kind:?}.{field}"
        );
        assert!(decode_value(&with_field(kind, field, j!(at_limit))).is_ok());
    }
}

// ------------------------------------------------------------------ JSON: leniency

#[test]
fn json_unknown_fields_are_ignored() {
    for msg in samples() {
        let mut v = as_value(&msg);
        v["data"]["extra"] = j!({"nested": [1, 2, {"x": null}]});
        v["data"]["zzz"] = j!("\u{1F980}");
        v["version"] = j!(2);
        v["id"] = j!("top-level extra");
        assert_eq!(decode_value(&v), Ok(msg.clone()), "{v}");
    }
}

#[test]
fn json_key_order_does_not_matter() {
    for msg in samples() {
        let good = String::from_utf8(json::encode(&msg)).unwrap();
        let v = as_value(&msg);
        let data = serde_json::to_string(&v["data"]).unwrap();
        let reordered = format!(r#"{{"data":{data},"type":"{}"}}"#, msg.kind().as_str());
        assert_eq!(json::decode(reordered.as_bytes()), Ok(msg.clone()));
        // Body fields reversed too.
        let fields: Vec<String> = v["data"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, x)| format!("{}:{x}", Value::from(k.as_str())))
            .rev()
            .collect();
        let reversed = format!(
            r#"{{"data":{{{}}},"type":"{}"}}"#,
            fields.join(","),
            msg.kind().as_str()
        );
        assert_eq!(json::decode(reversed.as_bytes()), Ok(msg.clone()), "{good}");
    }
}

#[test]
fn json_whitespace_and_escapes_are_accepted() {
    let input = "\n{ \"type\" : \"p\\u0069ng\" ,\r\n\t\"data\" : { \"timestamp\" : 5 } }\n";
    assert_eq!(
        json::decode(input.as_bytes()),
        Ok(Message::Ping(Heartbeat::new(5)))
    );
    let input =
        r#"{"type":"close","data":{"connection_id":"1\u0030","reason":"\ud83e\udd80\"\\\/"}}"#;
    assert_eq!(
        json::decode(input.as_bytes()),
        Ok(Message::Close(Close {
            id: ConnId(10),
            reason: "🦀\"\\/".into()
        }))
    );
}

#[test]
fn json_error_connection_id_absent_null_or_empty_is_none() {
    for id in [None, Some(j!(null)), Some(j!(""))] {
        let mut v = j!({"type": "error", "data": {"code": "RATE_LIMITED", "message": "slow down"}});
        if let Some(id) = id {
            v["data"]["connection_id"] = id;
        }
        assert_eq!(
            decode_value(&v),
            Ok(Message::Error(ErrorMsg {
                code: ErrorCode::RateLimited,
                message: "slow down".into(),
                id: None
            }))
        );
    }
}

#[test]
fn json_bare_number_connection_id_is_accepted() {
    for kind in [
        MessageKind::Connect,
        MessageKind::ConnectResponse,
        MessageKind::Data,
        MessageKind::Close,
        MessageKind::Error,
    ] {
        for n in [0u32, 7, u32::MAX] {
            let v = with_field(kind, "connection_id", j!(n));
            let msg = decode_value(&v).unwrap_or_else(|e| panic!("{kind:?} {n}: {e}"));
            assert_eq!(msg.conn_id(), Some(ConnId(n)), "{kind:?}");
            // It re-encodes as the documented string.
            let again = as_value(&msg);
            assert_eq!(again["data"]["connection_id"], j!(n.to_string()));
        }
    }
}

#[test]
fn json_document_examples() {
    // Verbatim from the API document (pretty-printed, trailing space after "string",).
    let auth = r#"{
  "type": "auth",
  "data": {
    "username": "string",
    "password": "string", 
    "client_id": "string"
  }
}"#;
    assert_eq!(
        json::decode(auth.as_bytes()),
        Ok(Message::Auth(Auth {
            username: "string".into(),
            password: "string".into(),
            client_id: "string".into()
        }))
    );
    let response = r#"{
  "type": "auth_response",
  "data": {
    "success": true,
    "message": "Authentication successful"
  }
}"#;
    assert_eq!(
        json::decode(response.as_bytes()),
        Ok(Message::AuthResponse(AuthResponse {
            success: true,
            message: "Authentication successful".into()
        }))
    );
    let ping = "{\n  \"type\": \"ping\",\n  \"data\": {\n    \"timestamp\": 1640995200\n  }\n}";
    assert_eq!(
        json::decode(ping.as_bytes()),
        Ok(Message::Ping(Heartbeat::new(1_640_995_200)))
    );
    // The document's placeholder id is not a connection id anyproxy accepts.
    let connect = r#"{
  "type": "connect",
  "data": {
    "connection_id": "unique_connection_id",
    "target_host": "target.example.com",
    "target_port": 80,
    "protocol": "tcp"
  }
}"#;
    assert_eq!(
        json::decode(connect.as_bytes()),
        Err(DecodeError::InvalidConnId("unique_connection_id".into()))
    );
}

// ------------------------------------------------------------------ all errors

#[test]
fn every_decode_error_maps_to_invalid_message_and_says_something() {
    let errors = [
        decode_bin(&[1, 2]).unwrap_err(),
        decode_bin(&header(binary::tag::DATA, 0, u32::MAX)).unwrap_err(),
        decode_bin(&frame(0x42, 0, &[])).unwrap_err(),
        json::decode(b"{").unwrap_err(),
        json::decode(br#"{"type":"ping","data":{}}"#).unwrap_err(),
        json::decode(b"\xff").unwrap_err(),
        decode_value(&with_field(MessageKind::Data, "payload", j!("!"))).unwrap_err(),
        decode_value(&with_field(MessageKind::Data, "connection_id", j!("x"))).unwrap_err(),
        decode_value(&with_field(MessageKind::Error, "code", j!("X"))).unwrap_err(),
        decode_value(&with_field(MessageKind::Connect, "protocol", j!("x"))).unwrap_err(),
    ];
    for e in errors {
        assert_eq!(e.code(), ErrorCode::InvalidMessage);
        assert!(e.to_string().len() > 10, "{e:?}");
    }
}

#[test]
fn binary_frames_built_by_hand_match_the_encoder() {
    // Guards the helpers above: a hand-built frame equals the encoder's output.
    let mut body = BytesMut::new();
    body.put_u8(1);
    body.put_u16(80);
    body.extend_from_slice(&raw_str(b"h"));
    assert_eq!(
        frame(binary::tag::CONNECT, 9, &body),
        binary::encode(&Message::Connect(Connect {
            id: ConnId(9),
            host: "h".into(),
            port: 80,
            protocol: Protocol::Udp
        }))
        .to_vec()
    );
}
