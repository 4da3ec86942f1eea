//! Golden vectors: the exact bytes of every message type in both encodings.
//!
//! The files in `proto/vectors/` were written by `proto/vectors/generate.py`, an
//! implementation of PROTOCOL.md independent of this crate. For every vector the Rust
//! encoder must produce the file's bytes and the Rust decoder must read them back to the
//! value constructed here.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyproxy_proto::{
    binary, json, Auth, AuthResponse, Close, ConnId, Connect, ConnectResponse, Data, ErrorCode,
    ErrorMsg, Fin, Forward, ForwardResponse, Heartbeat, Message, MessageKind, Protocol, Unforward,
    WindowUpdate,
};
use bytes::Bytes;

fn vectors() -> Vec<(&'static str, Message)> {
    fn error(code: ErrorCode, message: &str, id: Option<u32>) -> Message {
        Message::Error(ErrorMsg {
            code,
            message: message.into(),
            id: id.map(ConnId),
        })
    }
    vec![
        (
            "auth",
            Message::Auth(Auth {
                username: "agent-1".into(),
                password: "s3cret!".into(),
                client_id: "client-é01".into(),
            }),
        ),
        (
            "auth_response_ok",
            Message::AuthResponse(AuthResponse {
                success: true,
                message: "Authentication successful".into(),
            }),
        ),
        (
            "auth_response_fail",
            Message::AuthResponse(AuthResponse {
                success: false,
                message: "invalid credentials".into(),
            }),
        ),
        (
            "connect_tcp",
            Message::Connect(Connect {
                id: ConnId(1),
                host: "example.com".into(),
                port: 443,
                protocol: Protocol::Tcp,
            }),
        ),
        (
            "connect_udp",
            Message::Connect(Connect {
                id: ConnId(u32::MAX),
                host: "2001:db8::53".into(),
                port: 53,
                protocol: Protocol::Udp,
            }),
        ),
        (
            "connect_response_ok",
            Message::ConnectResponse(ConnectResponse {
                id: ConnId(1),
                success: true,
                message: "connected".into(),
            }),
        ),
        (
            "connect_response_fail",
            Message::ConnectResponse(ConnectResponse {
                id: ConnId(2),
                success: false,
                message: "refused: connection refused".into(),
            }),
        ),
        (
            "data",
            Message::Data(Data {
                id: ConnId(1),
                // Not UTF-8: 0xff, 0xfe and a lone continuation byte 0x80.
                payload: Bytes::from_static(b"\x00\x01\xff\xfe\x80GET /\r\n"),
            }),
        ),
        (
            "data_empty",
            Message::Data(Data {
                id: ConnId(3),
                payload: Bytes::new(),
            }),
        ),
        (
            "close",
            Message::Close(Close {
                id: ConnId(1),
                reason: "peer said \"bye\"\n".into(),
            }),
        ),
        ("ping", Message::Ping(Heartbeat::new(1_640_995_200))),
        ("pong", Message::Pong(Heartbeat::new(1_640_995_200))),
        ("ping_negative", Message::Ping(Heartbeat::new(-2))),
        (
            "error_auth_failed",
            error(ErrorCode::AuthFailed, "invalid credentials", None),
        ),
        (
            "error_invalid_message",
            error(
                ErrorCode::InvalidMessage,
                "unknown message type \"hello\"",
                None,
            ),
        ),
        (
            "error_connection_failed",
            error(
                ErrorCode::ConnectionFailed,
                "timeout: no answer in 10s",
                Some(7),
            ),
        ),
        (
            "error_forbidden_host",
            error(
                ErrorCode::ForbiddenHost,
                "10.0.0.1:22 is forbidden",
                Some(8),
            ),
        ),
        (
            // Connection id 0 is a real id: "has id" must not be inferred from id != 0.
            "error_rate_limited",
            error(ErrorCode::RateLimited, "too many connections", Some(0)),
        ),
        (
            "error_internal_error",
            error(ErrorCode::InternalError, "internal error", None),
        ),
        (
            "window_update",
            Message::WindowUpdate(WindowUpdate {
                id: ConnId(5),
                increment: 262_144,
            }),
        ),
        (
            "window_update_max",
            Message::WindowUpdate(WindowUpdate {
                id: ConnId(u32::MAX),
                increment: u32::MAX,
            }),
        ),
        ("fin", Message::Fin(Fin { id: ConnId(5) })),
        (
            "forward",
            Message::Forward(Forward {
                listen_port: 20022,
                target_host: "db.internal".into(),
                target_port: 5432,
                protocol: Protocol::Tcp,
            }),
        ),
        (
            "forward_udp",
            Message::Forward(Forward {
                listen_port: 20053,
                target_host: "10.0.0.53".into(),
                target_port: 53,
                protocol: Protocol::Udp,
            }),
        ),
        (
            "forward_response_fail",
            Message::ForwardResponse(ForwardResponse {
                listen_port: 20022,
                success: false,
                message: "port 20022 is already forwarded by agent \"a1\"".into(),
                protocol: Protocol::Tcp,
            }),
        ),
        (
            "forward_response_udp_ok",
            Message::ForwardResponse(ForwardResponse {
                listen_port: 20053,
                success: true,
                message: "listening on 127.0.0.1:20053/udp".into(),
                protocol: Protocol::Udp,
            }),
        ),
        (
            "unforward",
            Message::Unforward(Unforward {
                listen_port: 20022,
                protocol: Protocol::Tcp,
            }),
        ),
        (
            "unforward_udp",
            Message::Unforward(Unforward {
                listen_port: 20053,
                protocol: Protocol::Udp,
            }),
        ),
    ]
}

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("vectors")
}

fn read(name: &str, ext: &str) -> Vec<u8> {
    let path = dir().join(format!("{name}.{ext}"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn read_hex(name: &str) -> Vec<u8> {
    let text = String::from_utf8(read(name, "bin.hex")).expect("hex file is text");
    let digits: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    assert!(
        digits
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
        "{name}.bin.hex must be lowercase hex"
    );
    hex::decode(&digits).unwrap_or_else(|e| panic!("{name}.bin.hex: {e}"))
}

#[test]
fn json_vectors_encode_exactly() {
    for (name, msg) in vectors() {
        let want = read(name, "json");
        let got = json::encode(&msg);
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(&want),
            "{name}.json: encoder output differs"
        );
        assert_eq!(got, want, "{name}.json");
    }
}

#[test]
fn json_vectors_decode_exactly() {
    for (name, msg) in vectors() {
        let input = read(name, "json");
        assert_eq!(json::decode(&input), Ok(msg), "{name}.json");
    }
}

#[test]
fn binary_vectors_encode_exactly() {
    for (name, msg) in vectors() {
        let want = read_hex(name);
        let got = binary::encode(&msg);
        assert_eq!(
            hex::encode(&got),
            hex::encode(&want),
            "{name}.bin.hex: encoder output differs"
        );
    }
}

#[test]
fn binary_vectors_decode_exactly() {
    for (name, msg) in vectors() {
        let mut input = Bytes::from(read_hex(name));
        assert_eq!(binary::decode_frame(&mut input), Ok(msg), "{name}.bin.hex");
        assert!(
            input.is_empty(),
            "{name}.bin.hex: bytes left after the frame"
        );
    }
}

#[test]
fn binary_vectors_concatenated_decode_in_order() {
    let all = vectors();
    let mut buf = Vec::new();
    for (name, _) in &all {
        buf.extend_from_slice(&read_hex(name));
    }
    let decoded: Vec<Message> = binary::Frames::new(Bytes::from(buf))
        .collect::<Result<_, _>>()
        .expect("all frames decode");
    let want: Vec<Message> = all.into_iter().map(|(_, m)| m).collect();
    assert_eq!(decoded, want);
}

#[test]
fn vector_files_match_the_table() {
    let table: BTreeSet<String> = vectors().iter().map(|(n, _)| n.to_string()).collect();
    assert_eq!(table.len(), vectors().len(), "duplicate vector names");
    let mut json_files = BTreeSet::new();
    let mut hex_files = BTreeSet::new();
    for entry in std::fs::read_dir(dir()).unwrap() {
        let file = entry.unwrap().file_name().into_string().unwrap();
        if let Some(stem) = file.strip_suffix(".bin.hex") {
            hex_files.insert(stem.to_string());
        } else if let Some(stem) = file.strip_suffix(".json") {
            json_files.insert(stem.to_string());
        } else {
            // `accepted/`: decode-only vectors of foreign forms, checked by tests/foreign.rs.
            assert!(
                file == "README.md" || file == "generate.py" || file == "accepted",
                "unexpected file in vectors/: {file}"
            );
        }
    }
    assert_eq!(
        json_files, table,
        "every vector has a .json file, no strays"
    );
    assert_eq!(
        hex_files, table,
        "every vector has a .bin.hex file, no strays"
    );
}

#[test]
fn json_vector_files_are_one_line_without_trailing_newline() {
    for (name, _) in vectors() {
        let bytes = read(name, "json");
        assert!(!bytes.contains(&b'\n'), "{name}.json must be one line");
    }
}

#[test]
fn vectors_cover_every_type_and_variant() {
    let all = vectors();
    for kind in MessageKind::ALL {
        assert!(
            all.iter().any(|(_, m)| m.kind() == kind),
            "no vector for {kind:?}"
        );
    }
    for code in ErrorCode::ALL {
        assert!(
            all.iter()
                .any(|(_, m)| matches!(m, Message::Error(e) if e.code == code)),
            "no vector for {code}"
        );
    }
    let has = |f: &dyn Fn(&Message) -> bool| all.iter().any(|(_, m)| f(m));
    assert!(has(&|m| matches!(m, Message::Error(e) if e.id.is_some())));
    assert!(has(&|m| matches!(m, Message::Error(e) if e.id.is_none())));
    for success in [true, false] {
        assert!(has(
            &|m| matches!(m, Message::AuthResponse(r) if r.success == success)
        ));
        assert!(has(
            &|m| matches!(m, Message::ConnectResponse(r) if r.success == success)
        ));
    }
    for protocol in [Protocol::Tcp, Protocol::Udp] {
        assert!(has(
            &|m| matches!(m, Message::Connect(c) if c.protocol == protocol)
        ));
    }
    assert!(has(
        &|m| matches!(m, Message::Data(d) if d.payload.is_empty())
    ));
    assert!(has(
        &|m| matches!(m, Message::Data(d) if std::str::from_utf8(&d.payload).is_err())
    ));
}
