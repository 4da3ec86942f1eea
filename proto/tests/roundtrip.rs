//! Property tests: every message survives encode → decode in both encodings.

use anyproxy_proto::{
    binary, json, Auth, AuthResponse, Close, ConnId, Connect, ConnectResponse, Data, ErrorCode,
    ErrorMsg, Fin, Forward, ForwardResponse, Heartbeat, Message, Protocol, Unforward, WindowUpdate,
    MAX_STRING_LEN,
};
use bytes::{Bytes, BytesMut};
use proptest::prelude::*;

/// Cuts `s` to at most `max` bytes at a char boundary.
fn clamp(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// Strings of any Unicode (incl. control characters, quotes, astral planes), from empty
/// up to exactly MAX_STRING_LEN bytes.
fn any_string() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => ".{0,40}",
        2 => "[a-z0-9.-]{0,64}",
        1 => proptest::collection::vec(any::<char>(), 0..=MAX_STRING_LEN)
            .prop_map(|cs| clamp(cs.into_iter().collect(), MAX_STRING_LEN)),
        // Exactly at the limit, made of multi-byte characters.
        1 => Just(clamp("é🦀".repeat(MAX_STRING_LEN), MAX_STRING_LEN)),
        1 => Just("x".repeat(MAX_STRING_LEN)),
    ]
}

fn any_id() -> impl Strategy<Value = ConnId> {
    prop_oneof![
        Just(ConnId(0)),
        Just(ConnId(u32::MAX)),
        any::<u32>().prop_map(ConnId)
    ]
}

fn any_payload() -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..=4096).prop_map(Bytes::from)
}

fn any_protocol() -> impl Strategy<Value = Protocol> {
    prop_oneof![Just(Protocol::Tcp), Just(Protocol::Udp)]
}

fn any_code() -> impl Strategy<Value = ErrorCode> {
    proptest::sample::select(ErrorCode::ALL.to_vec())
}

fn any_message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (any_string(), any_string(), any_string()).prop_map(|(username, password, client_id)| {
            Message::Auth(Auth {
                username,
                password,
                client_id,
            })
        }),
        (any::<bool>(), any_string()).prop_map(|(success, message)| Message::AuthResponse(
            AuthResponse { success, message }
        )),
        (any_id(), any_string(), any::<u16>(), any_protocol()).prop_map(
            |(id, host, port, protocol)| Message::Connect(Connect {
                id,
                host,
                port,
                protocol
            })
        ),
        (any_id(), any::<bool>(), any_string()).prop_map(|(id, success, message)| {
            Message::ConnectResponse(ConnectResponse {
                id,
                success,
                message,
            })
        }),
        (any_id(), any_payload()).prop_map(|(id, payload)| Message::Data(Data { id, payload })),
        (any_id(), any_string()).prop_map(|(id, reason)| Message::Close(Close { id, reason })),
        any::<i64>().prop_map(|timestamp| Message::Ping(Heartbeat::new(timestamp))),
        any::<i64>().prop_map(|timestamp| Message::Pong(Heartbeat::new(timestamp))),
        (any_code(), any_string(), proptest::option::of(any_id()))
            .prop_map(|(code, message, id)| Message::Error(ErrorMsg { code, message, id })),
        (any_id(), 1..=u32::MAX)
            .prop_map(|(id, increment)| Message::WindowUpdate(WindowUpdate { id, increment })),
        any_id().prop_map(|id| Message::Fin(Fin { id })),
        (any::<u16>(), any_string(), any::<u16>(), any_protocol()).prop_map(
            |(listen_port, target_host, target_port, protocol)| Message::Forward(Forward {
                listen_port,
                target_host,
                target_port,
                protocol,
            })
        ),
        (any::<u16>(), any::<bool>(), any_string(), any_protocol()).prop_map(
            |(listen_port, success, message, protocol)| {
                Message::ForwardResponse(ForwardResponse {
                    listen_port,
                    success,
                    message,
                    protocol,
                })
            }
        ),
        (any::<u16>(), any_protocol()).prop_map(|(listen_port, protocol)| {
            Message::Unforward(Unforward {
                listen_port,
                protocol,
            })
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn json_round_trip(msg in any_message()) {
        let wire = json::encode(&msg);
        prop_assert!(wire.len() <= json::MAX_MESSAGE_LEN);
        prop_assert_eq!(json::decode(&wire), Ok(msg));
    }

    #[test]
    fn binary_round_trip(msg in any_message()) {
        let mut wire = binary::encode(&msg);
        prop_assert_eq!(binary::decode_frame(&mut wire), Ok(msg));
        prop_assert!(wire.is_empty());
    }

    #[test]
    fn json_encode_into_appends(prefix in proptest::collection::vec(any::<u8>(), 0..16), msg in any_message()) {
        let mut out = prefix.clone();
        json::encode_into(&msg, &mut out);
        prop_assert_eq!(&out[..prefix.len()], &prefix[..]);
        prop_assert_eq!(&out[prefix.len()..], &json::encode(&msg)[..]);
    }

    #[test]
    fn binary_frames_concatenated_decode_in_order(msgs in proptest::collection::vec(any_message(), 0..12)) {
        let mut buf = BytesMut::new();
        for m in &msgs {
            binary::encode_into(m, &mut buf);
        }
        let decoded: Result<Vec<Message>, _> = binary::Frames::new(buf.freeze()).collect();
        prop_assert_eq!(decoded, Ok(msgs));
    }

    #[test]
    fn data_header_matches_encoder(id in any_id(), payload in any_payload()) {
        let wire = binary::encode(&Message::Data(Data { id, payload: payload.clone() }));
        prop_assert_eq!(&wire[..binary::HEADER_LEN], &binary::data_header(id, payload.len())[..]);
        prop_assert_eq!(&wire[binary::HEADER_LEN..], &payload[..]);
    }
}

#[test]
fn frames_of_an_empty_message_is_empty() {
    assert_eq!(binary::Frames::new(Bytes::new()).count(), 0);
}

#[test]
fn frames_stop_at_the_first_bad_frame() {
    let mut buf = BytesMut::new();
    binary::encode_into(&Message::Ping(Heartbeat::new(1)), &mut buf);
    buf.extend_from_slice(&[0x7f, 0, 0, 0, 0, 0, 0, 0, 0]); // reserved tag
    binary::encode_into(&Message::Pong(Heartbeat::new(2)), &mut buf);
    let items: Vec<_> = binary::Frames::new(buf.freeze()).collect();
    assert_eq!(items.len(), 2, "nothing after the bad frame: {items:?}");
    assert_eq!(items[0], Ok(Message::Ping(Heartbeat::new(1))));
    assert!(items[1].is_err());
}
