//! The HTTP proxy's request heads: hyper's HTTP/1 server with the front end's
//! settings, over an in-memory stream split at every place, and the front end's own
//! readings of each head it parses (Basic credentials, the CONNECT and forward
//! targets, the hop-by-hop headers it strips). Never panics, and each reading holds:
//! credentials decode from, and re-encode to, exactly what the header carries; a
//! target is the URI's host (brackets off) and port (80 by default for a forward); no
//! hop-by-hop header, nor one the `Connection` header names, is left to forward.

use std::convert::Infallible;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use bytes::Bytes;
use http_body_util::Empty;
use hyper::header::{HeaderMap, HeaderName, CONNECTION, PROXY_AUTHORIZATION};
use hyper::{Request, Response, Uri};
use hyper_util::rt::{TokioIo, TokioTimer};

use super::mem::{block_on, Mem};

const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// First byte: the chunking of the reads; then the client's bytes.
pub fn check(data: &[u8]) {
    let Some(stream) = Mem::split(data) else {
        return;
    };
    let service = hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
        check_head(req.uri(), req.headers());
        Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new()))
    });
    let serving = hyper::server::conn::http1::Builder::new()
        .preserve_header_case(true)
        .title_case_headers(true)
        .timer(TokioTimer::new())
        .header_read_timeout(std::time::Duration::from_secs(30))
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    let _ = block_on(serving);
}

fn check_head(uri: &Uri, original: &HeaderMap) {
    let mut headers = original.clone();
    let read = anyproxy::fuzzing::http_read_head(uri, &mut headers);

    if let Some((user, password)) = &read.credentials {
        let value = original[PROXY_AUTHORIZATION].to_str().expect("ASCII");
        let (scheme, encoded) = value.trim().split_once(' ').expect("scheme and token");
        assert!(scheme.eq_ignore_ascii_case("basic"));
        assert!(!user.contains(':'), "the user ends at the first colon");
        assert_eq!(
            STANDARD.encode(format!("{user}:{password}")),
            encoded.trim()
        );
    }

    let authority = uri.authority();
    let host = authority.map(|a| a.host().trim_start_matches('[').trim_end_matches(']'));
    let host = host.filter(|h| !h.is_empty());
    let port = authority.and_then(|a| a.port_u16());
    let target = |t: &Option<anyproxy::net::HostPort>| t.as_ref().map(|t| (t.host.clone(), t.port));
    assert_eq!(
        target(&read.connect_target),
        host.zip(port).map(|(h, p)| (h.to_owned(), p)),
        "CONNECT target of {uri}"
    );
    assert_eq!(
        target(&read.forward_target),
        host.map(|h| (h.to_owned(), port.unwrap_or(80))),
        "forward target of {uri}"
    );

    for name in HOP_BY_HOP {
        assert!(!headers.contains_key(*name), "{name} is forwarded");
    }
    let named = original
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok());
    for name in named {
        assert!(
            !headers.contains_key(&name),
            "{name} is named by Connection"
        );
    }
    for (name, value) in &headers {
        assert!(
            original.get_all(name).iter().any(|v| v == value),
            "{name} was added"
        );
    }
}
