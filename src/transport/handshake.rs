//! The RFC 6455 opening handshake, both sides, with encoding negotiation through
//! `Sec-WebSocket-Protocol` and permessage-deflate through `Sec-WebSocket-Extensions`.
//! Written by hand (httparse) so that both are under our control; the ws layer takes
//! over after it.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use sha1::{Digest, Sha1};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use anyproxy_proto::Encoding;

use super::ws::deflate::extension;
use super::ws::DeflateParams;
use crate::config::DeflateConfig;

/// Path agents connect to.
pub const WS_PATH: &str = "/ws";
const MAX_HEAD: usize = 8192;
const MAX_HEADERS: usize = 48;
const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("i/o during handshake: {0}")]
    Io(#[from] std::io::Error),
    #[error("connection closed during handshake")]
    Eof,
    #[error("handshake head larger than {MAX_HEAD} bytes")]
    TooLarge,
    #[error("malformed HTTP: {0}")]
    Malformed(String),
    #[error("{status}: {reason}")]
    Refused { status: u16, reason: String },
    #[error("gateway answered HTTP {0} instead of 101 Switching Protocols")]
    Status(u16),
    #[error("gateway's Sec-WebSocket-Accept does not match the key")]
    BadAccept,
    #[error("gateway chose subprotocol {0:?}, which was not offered")]
    UnexpectedProtocol(String),
    #[error("gateway's Sec-WebSocket-Extensions: {0}")]
    Extension(String),
}

pub fn accept_key(key: &str) -> String {
    let mut sha = Sha1::new();
    sha.update(key.as_bytes());
    sha.update(GUID.as_bytes());
    STANDARD.encode(sha.finalize())
}

/// Reads an HTTP head up to and including the blank line. Anything after it would be
/// a peer speaking before the handshake completed, which RFC 6455 forbids.
async fn read_head<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Vec<u8>, HandshakeError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(HandshakeError::Eof);
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = find_head_end(&buf) {
            if end != buf.len() {
                return Err(HandshakeError::Malformed(
                    "data sent before the handshake completed".into(),
                ));
            }
            return Ok(buf);
        }
        if buf.len() > MAX_HEAD {
            return Err(HandshakeError::TooLarge);
        }
    }
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

fn header<'a>(headers: &'a [httparse::Header<'a>], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .and_then(|h| std::str::from_utf8(h.value).ok())
}

/// The values of every header called `name`, in order.
fn header_values<'a>(
    headers: &'a [httparse::Header<'a>],
    name: &'a str,
) -> impl Iterator<Item = &'a str> + 'a {
    headers
        .iter()
        .filter(move |h| h.name.eq_ignore_ascii_case(name))
        .filter_map(|h| std::str::from_utf8(h.value).ok())
}

/// All comma-separated tokens of every header called `name`, in order.
fn header_tokens<'a>(headers: &'a [httparse::Header<'a>], name: &'a str) -> Vec<&'a str> {
    header_values(headers, name)
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect()
}

fn has_token(headers: &[httparse::Header<'_>], name: &str, token: &str) -> bool {
    header_tokens(headers, name)
        .iter()
        .any(|t| t.eq_ignore_ascii_case(token))
}

async fn respond<S: AsyncWrite + Unpin>(
    stream: &mut S,
    status: u16,
    reason: &str,
    extra: &str,
) -> Result<(), HandshakeError> {
    let text = match status {
        400 => "Bad Request",
        404 => "Not Found",
        426 => "Upgrade Required",
        _ => "Error",
    };
    let body = format!("{reason}\n");
    let resp = format!(
        "HTTP/1.1 {status} {text}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n{body}",
        body.len()
    );
    stream.write_all(resp.as_bytes()).await?;
    stream.flush().await?;
    Ok(())
}

/// What the server side of the handshake decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub encoding: Encoding,
    /// Whether the client named the encoding (false: documented JSON mode by default).
    pub negotiated: bool,
    /// permessage-deflate, when enabled here and offered acceptably by the client.
    pub deflate: Option<DeflateParams>,
}

/// What the client side of the handshake agreed on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connected {
    pub encoding: Encoding,
    pub deflate: Option<DeflateParams>,
}

/// Server side: validates the upgrade request at [`WS_PATH`], picks the encoding and
/// answers 101; anything else is answered with 400/404/426 and an error. With `deflate`
/// enabled, the first acceptable permessage-deflate offer is taken; none (or only
/// invalid ones) just means an uncompressed session.
pub async fn accept<S>(
    stream: &mut S,
    allowed: &[Encoding],
    deflate: Option<&DeflateConfig>,
) -> Result<Accepted, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let head = read_head(stream).await?;
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let parsed = match req.parse(&head) {
        Ok(httparse::Status::Complete(_)) => Ok(()),
        // httparse skips blank lines before the request line, so a head of blank
        // lines alone is still partial (fuzz/regressions/ws_handshake).
        Ok(httparse::Status::Partial) => Err("no request line".to_owned()),
        Err(e) => Err(e.to_string()),
    };
    if let Err(e) = parsed {
        let reason = format!("malformed request: {e}");
        respond(stream, 400, &reason, "").await?;
        return Err(HandshakeError::Malformed(reason));
    }
    let path = req.path.unwrap_or("");
    let path = path.split('?').next().unwrap_or("");
    let refuse = |status: u16, reason: &str| HandshakeError::Refused {
        status,
        reason: reason.to_owned(),
    };
    if path != WS_PATH {
        let reason = format!("no such path {path:?}; agents connect to {WS_PATH}");
        respond(stream, 404, &reason, "").await?;
        return Err(refuse(404, &reason));
    }
    let headers = req.headers;
    let is_upgrade = req.method == Some("GET")
        && has_token(headers, "upgrade", "websocket")
        && has_token(headers, "connection", "upgrade");
    if !is_upgrade {
        let reason = "expected a WebSocket upgrade (GET with Upgrade: websocket)";
        respond(stream, 400, reason, "").await?;
        return Err(refuse(400, reason));
    }
    if header(headers, "sec-websocket-version").map(str::trim) != Some("13") {
        let reason = "unsupported WebSocket version; use 13";
        respond(stream, 426, reason, "Sec-WebSocket-Version: 13\r\n").await?;
        return Err(refuse(426, reason));
    }
    let key = match header(headers, "sec-websocket-key").map(str::trim) {
        Some(k) if STANDARD.decode(k).map(|d| d.len() == 16).unwrap_or(false) => k.to_owned(),
        _ => {
            let reason = "missing or invalid Sec-WebSocket-Key";
            respond(stream, 400, reason, "").await?;
            return Err(refuse(400, reason));
        }
    };
    let offered = header_tokens(headers, "sec-websocket-protocol");
    let chosen = offered
        .iter()
        .filter_map(|t| Encoding::from_subprotocol(t))
        .find(|e| allowed.contains(e));
    let (encoding, negotiated) = match chosen {
        Some(e) => (e, true),
        None if allowed.contains(&Encoding::Json) => (Encoding::Json, false),
        None => {
            let reason = "this gateway requires a negotiated encoding (Sec-WebSocket-Protocol: anyproxy-binary.v2)";
            respond(stream, 400, reason, "").await?;
            return Err(refuse(400, reason));
        }
    };
    let protocol_line = if negotiated {
        format!("Sec-WebSocket-Protocol: {}\r\n", encoding.subprotocol())
    } else {
        String::new()
    };
    let agreed = deflate.and_then(|config| {
        extension::accept(
            &extension::parse(header_values(headers, "sec-websocket-extensions")),
            config,
        )
    });
    let extension_line = match &agreed {
        Some((response, _)) => format!("Sec-WebSocket-Extensions: {response}\r\n"),
        None => String::new(),
    };
    let resp = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n{protocol_line}{extension_line}\r\n",
        accept_key(&key)
    );
    stream.write_all(resp.as_bytes()).await?;
    stream.flush().await?;
    Ok(Accepted {
        encoding,
        negotiated,
        deflate: agreed.map(|(_, params)| params.for_encoding(encoding)),
    })
}

/// Client side: requests the upgrade, offering `offer` in preference order and
/// permessage-deflate when `deflate` is enabled, and checks the answer (status,
/// `Sec-WebSocket-Accept`, chosen subprotocol, agreed extension).
pub async fn connect<S>(
    stream: &mut S,
    host_header: &str,
    offer: &[Encoding],
    deflate: Option<&DeflateConfig>,
) -> Result<Connected, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let key = STANDARD.encode(rand::random::<[u8; 16]>());
    let protocols: Vec<&str> = offer.iter().map(|e| e.subprotocol()).collect();
    let no_deflate = DeflateConfig::default();
    let deflate = deflate.unwrap_or(&no_deflate);
    let extension_line = match extension::offer(deflate) {
        Some(offer) => format!("Sec-WebSocket-Extensions: {offer}\r\n"),
        None => String::new(),
    };
    let req = format!(
        "GET {WS_PATH} HTTP/1.1\r\nHost: {host_header}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: {}\r\n{extension_line}User-Agent: anyproxy/{}\r\n\r\n",
        protocols.join(", "),
        env!("CARGO_PKG_VERSION"),
    );
    stream.write_all(req.as_bytes()).await?;
    stream.flush().await?;
    let head = read_head(stream).await?;
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    resp.parse(&head)
        .map_err(|e| HandshakeError::Malformed(e.to_string()))?;
    let status = resp.code.unwrap_or(0);
    if status != 101 {
        return Err(HandshakeError::Status(status));
    }
    if header(resp.headers, "sec-websocket-accept").map(str::trim) != Some(&accept_key(&key)) {
        return Err(HandshakeError::BadAccept);
    }
    let encoding = match header(resp.headers, "sec-websocket-protocol").map(str::trim) {
        None => Encoding::Json,
        Some(token) => Encoding::from_subprotocol(token)
            .filter(|e| offer.contains(e))
            .ok_or_else(|| HandshakeError::UnexpectedProtocol(token.to_owned()))?,
    };
    let deflate = extension::check_response(
        header_values(resp.headers, "sec-websocket-extensions"),
        deflate,
    )
    .map_err(HandshakeError::Extension)?
    .map(|params| params.for_encoding(encoding));
    Ok(Connected { encoding, deflate })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc6455_accept_example() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[tokio::test]
    async fn negotiates_both_ways() {
        for (offer, allowed, expect) in [
            (
                vec![Encoding::Binary, Encoding::Json],
                vec![Encoding::Binary, Encoding::Json],
                Encoding::Binary,
            ),
            (
                vec![Encoding::Binary, Encoding::Json],
                vec![Encoding::Json],
                Encoding::Json,
            ),
            (
                vec![Encoding::Json],
                vec![Encoding::Binary, Encoding::Json],
                Encoding::Json,
            ),
        ] {
            let (mut a, mut b) = tokio::io::duplex(4096);
            let server = tokio::spawn(async move { accept(&mut b, &allowed, None).await.unwrap() });
            let got = connect(&mut a, "localhost", &offer, None).await.unwrap();
            assert_eq!(got.encoding, expect);
            assert_eq!(got.deflate, None);
            assert_eq!(server.await.unwrap().encoding, expect);
        }
    }

    #[tokio::test]
    async fn wrong_path_gets_404() {
        let (mut a, mut b) = tokio::io::duplex(4096);
        let server = tokio::spawn(async move { accept(&mut b, &[Encoding::Json], None).await });
        a.write_all(b"GET /other HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut resp = String::new();
        a.read_to_string(&mut resp).await.unwrap();
        assert!(resp.starts_with("HTTP/1.1 404"), "{resp}");
        assert!(server.await.unwrap().is_err());
    }

    #[tokio::test]
    async fn plain_get_gets_400() {
        let (mut a, mut b) = tokio::io::duplex(4096);
        let server = tokio::spawn(async move { accept(&mut b, &[Encoding::Json], None).await });
        a.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut resp = String::new();
        a.read_to_string(&mut resp).await.unwrap();
        assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
        assert!(server.await.unwrap().is_err());
    }

    /// A regression input of the ws_handshake fuzz target: httparse skips the blank
    /// lines, so the head was still partial, which once reached `unreachable!`.
    #[tokio::test]
    async fn blank_lines_alone_get_400() {
        let (mut a, mut b) = tokio::io::duplex(4096);
        let server = tokio::spawn(async move { accept(&mut b, &[Encoding::Json], None).await });
        a.write_all(b"\r\n\r\n").await.unwrap();
        let mut resp = String::new();
        a.read_to_string(&mut resp).await.unwrap();
        assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
        assert!(resp.contains("no request line"), "{resp}");
        let err = server.await.unwrap().unwrap_err();
        assert!(matches!(err, HandshakeError::Malformed(_)), "{err}");
    }

    fn deflate_on() -> DeflateConfig {
        DeflateConfig {
            enabled: true,
            ..DeflateConfig::default()
        }
    }

    /// The 101 a server sends for a raw request.
    async fn answer(request: &str, deflate: Option<DeflateConfig>) -> (String, Accepted) {
        let (mut a, mut b) = tokio::io::duplex(4096);
        let server = tokio::spawn(async move {
            accept(&mut b, &[Encoding::Json], deflate.as_ref())
                .await
                .unwrap()
        });
        a.write_all(request.as_bytes()).await.unwrap();
        let accepted = server.await.unwrap();
        let mut resp = vec![0; 4096];
        let n = a.read(&mut resp).await.unwrap();
        (String::from_utf8_lossy(&resp[..n]).into_owned(), accepted)
    }

    const REQUEST: &str = "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n";

    #[tokio::test]
    async fn server_takes_a_browser_or_python_offer() {
        let req = format!(
            "{REQUEST}Sec-WebSocket-Extensions: x-webkit-deflate-frame\r\nSec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n"
        );
        let (resp, accepted) = answer(&req, Some(deflate_on())).await;
        assert!(
            resp.contains("\r\nSec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; client_no_context_takeover\r\n"),
            "{resp}"
        );
        let p = accepted.deflate.unwrap();
        assert!(p.compress_reset && p.decompress_reset);
        // Disabled here: the offer is ignored.
        let (resp, accepted) = answer(&req, None).await;
        assert!(!resp.contains("Extensions"), "{resp}");
        assert_eq!(accepted.deflate, None);
    }

    #[tokio::test]
    async fn server_without_offer_or_with_only_bad_ones() {
        for ext in [
            "",
            "Sec-WebSocket-Extensions: permessage-deflate; server_max_window_bits=8\r\n",
        ] {
            let (resp, accepted) = answer(&format!("{REQUEST}{ext}\r\n"), Some(deflate_on())).await;
            assert!(resp.starts_with("HTTP/1.1 101"), "{resp}");
            assert!(!resp.contains("Extensions"), "{resp}");
            assert_eq!(accepted.deflate, None);
        }
    }

    /// A fake gateway answering our offer with `extensions`.
    async fn client_against(extensions: &str) -> Result<Connected, HandshakeError> {
        let (mut a, mut b) = tokio::io::duplex(4096);
        let extensions = extensions.to_owned();
        tokio::spawn(async move {
            let head = read_head(&mut b).await.unwrap();
            let head = String::from_utf8(head).unwrap();
            assert!(head
                .contains("Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits"));
            let key = head
                .lines()
                .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
                .unwrap();
            let resp = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n{extensions}\r\n",
                accept_key(key.trim())
            );
            b.write_all(resp.as_bytes()).await.unwrap();
            // Keep the pipe open until the client is done.
            let _ = b.read(&mut [0u8; 1]).await;
        });
        connect(&mut a, "x", &[Encoding::Json], Some(&deflate_on())).await
    }

    #[tokio::test]
    async fn client_checks_the_response() {
        let ok = client_against(
            "Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover\r\n",
        )
        .await
        .unwrap();
        assert!(ok.deflate.unwrap().decompress_reset);
        assert_eq!(client_against("").await.unwrap().deflate, None);
        for bad in [
            "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n",
            "Sec-WebSocket-Extensions: permessage-deflate; foo\r\n",
            "Sec-WebSocket-Extensions: permessage-deflate; server_max_window_bits=7\r\n",
            "Sec-WebSocket-Extensions: x-other\r\n",
        ] {
            let err = client_against(bad).await.unwrap_err();
            assert!(matches!(err, HandshakeError::Extension(_)), "{bad}: {err}");
        }
    }
}
