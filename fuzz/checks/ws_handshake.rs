//! The WebSocket opening handshake, both sides, over an in-memory stream split at
//! every place, and the permessage-deflate negotiation.
//!
//! - Server (`accept`): never panics; a success wrote one complete `101` whose
//!   `Sec-WebSocket-Accept` answers the request's key, with an allowed encoding and
//!   deflate only when enabled; a refusal wrote the status it names.
//! - Client (`connect`): never panics; the input is the gateway's answer, in which
//!   `@ACCEPT@` stands for the right `Sec-WebSocket-Accept` value (the key is random);
//!   a success has an offered encoding, and deflate only when offered.
//! - `Sec-WebSocket-Extensions`: the input as an offer never panics the parser, and
//!   whatever the server answers to it, our client accepts, with the same idea of who
//!   resets its compression context; and our client's own offer, answered by a server
//!   with any settings, is accepted by the client, with windows that fit what it asked.
//!
//! First byte: bit 0 picks the side, bits 1-2 the encodings allowed or offered, bits
//! 3-7 the deflate settings; the second byte is the chunking of the reads.

use anyproxy::config::DeflateConfig;
use anyproxy::transport::handshake::{accept, accept_key, connect, HandshakeError};
use anyproxy::transport::ws::deflate::extension;
use anyproxy_proto::Encoding;

use super::mem::{block_on, Mem};

pub fn check(data: &[u8]) {
    let Some((&[mode, chunking], wire)) = data.split_first_chunk::<2>() else {
        return;
    };
    let encodings: &[Encoding] = match (mode >> 1) & 3 {
        0 => &[Encoding::Json],
        1 => &[Encoding::Binary],
        _ => &[Encoding::Binary, Encoding::Json],
    };
    let deflate = deflate_config(mode >> 3);
    let stream = Mem::new(wire, chunking % 32);
    if mode & 1 == 0 {
        server(stream, wire, encodings, &deflate);
    } else {
        client(stream, encodings, &deflate);
    }
    negotiation(wire, &deflate);
}

/// Bits 0-1: off, or on with a window of 15, 12 or 9 bits; bit 2: no context takeover.
fn deflate_config(bits: u8) -> DeflateConfig {
    let window = [15, 15, 12, 9][usize::from(bits & 3)];
    DeflateConfig {
        enabled: bits & 3 != 0,
        no_context_takeover: bits & 4 != 0,
        max_window_bits: window,
        ..DeflateConfig::default()
    }
}

fn server(mut stream: Mem, wire: &[u8], allowed: &[Encoding], deflate: &DeflateConfig) {
    let got = block_on(accept(&mut stream, allowed, Some(deflate)));
    let written = String::from_utf8(stream.written).expect("the server writes ASCII");
    match got {
        Ok(accepted) => {
            assert!(allowed.contains(&accepted.encoding));
            assert!(accepted.deflate.is_none() || deflate.enabled);
            let mut headers = [httparse::EMPTY_HEADER; 16];
            let mut resp = httparse::Response::new(&mut headers);
            let end = match resp.parse(written.as_bytes()) {
                Ok(httparse::Status::Complete(end)) => end,
                other => panic!("{other:?}: {written:?}"),
            };
            assert_eq!(end, written.len(), "one response and nothing else");
            assert_eq!(resp.code, Some(101));
            let key = request_key(wire).expect("an accepted request has a key");
            let answer = header(resp.headers, "sec-websocket-accept");
            assert_eq!(answer, Some(accept_key(&key)), "{written:?}");
        }
        Err(HandshakeError::Refused { status, .. }) => {
            assert!(
                written.starts_with(&format!("HTTP/1.1 {status} ")),
                "{written:?}"
            );
        }
        Err(_) => {}
    }
}

fn header(headers: &[httparse::Header<'_>], name: &str) -> Option<String> {
    headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .map(|h| String::from_utf8_lossy(h.value).trim().to_owned())
}

/// The `Sec-WebSocket-Key` of the request head at the start of `wire`.
fn request_key(wire: &[u8]) -> Option<String> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    req.parse(wire).ok()?;
    header(req.headers, "sec-websocket-key")
}

fn client(stream: Mem, offer: &[Encoding], deflate: &DeflateConfig) {
    let mut stream = stream.answering(|request, answer| {
        let key = request
            .split(|&b| b == b'\n')
            .find_map(|l| l.strip_prefix(b"Sec-WebSocket-Key: "))
            .map(|k| String::from_utf8_lossy(k).trim().to_owned())
            .expect("the request has a key");
        replace(answer, b"@ACCEPT@", accept_key(&key).as_bytes())
    });
    match block_on(connect(&mut stream, "gateway.test", offer, Some(deflate))) {
        Ok(connected) => {
            assert!(offer.contains(&connected.encoding) || connected.encoding == Encoding::Json);
            assert!(connected.deflate.is_none() || deflate.enabled);
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}

fn replace(haystack: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(haystack.len());
    let mut i = 0;
    while i < haystack.len() {
        if haystack[i..].starts_with(from) {
            out.extend_from_slice(to);
            i += from.len();
        } else {
            out.push(haystack[i]);
            i += 1;
        }
    }
    out
}

fn negotiation(wire: &[u8], server_config: &DeflateConfig) {
    // Our client takes whatever a server may answer (any window, either context mode).
    let lenient_client = DeflateConfig {
        enabled: true,
        no_context_takeover: false,
        max_window_bits: 15,
        ..DeflateConfig::default()
    };
    let text = String::from_utf8_lossy(wire);
    let offers = extension::parse(text.split("\r\n"));
    if let Some((response, server)) = extension::accept(&offers, server_config) {
        let client = extension::check_response([response.as_str()], &lenient_client)
            .unwrap_or_else(|e| panic!("answer {response:?} to {text:?} refused: {e}"))
            .expect("an answer is an agreement");
        assert_eq!(
            client.decompress_reset, server.compress_reset,
            "{response:?}"
        );
        assert!(
            !server.decompress_reset || client.compress_reset,
            "{response:?}"
        );
    }
    // Our own offer, with the settings the input's first bytes pick.
    let client_config = deflate_config(wire.first().copied().unwrap_or(0) | 1);
    let offer = extension::offer(&client_config).expect("enabled");
    let Some((response, server)) =
        extension::accept(&extension::parse([offer.as_str()]), server_config)
    else {
        assert!(!server_config.enabled, "our offer {offer:?} declined");
        return;
    };
    let client = extension::check_response([response.as_str()], &client_config)
        .unwrap_or_else(|e| panic!("answer {response:?} to our offer {offer:?} refused: {e}"))
        .expect("an agreement");
    assert_eq!(client.decompress_reset, server.compress_reset);
    assert_eq!(client.compress_reset, server.decompress_reset);
    assert!(server.compress_window_bits <= client_config.max_window_bits);
    assert!(client.compress_window_bits <= client_config.max_window_bits);
}
