//! The HTTPS proxy listener (`proxy.https`) driven by real curl and headless Chromium
//! through a real gateway and agent: CONNECT and absolute-form with the credentials
//! inside TLS, wrong credentials, a plain-HTTP client on the TLS port, the certificate
//! rotated by SIGHUP, and a listener with certificate files of its own.

mod common;

use std::path::Path;

use common::browser::{chromium, run_chromium};
use common::*;

/// A `proxy.https` listener on `port`, with the stack's HTTP credentials when `auth`,
/// and `extra` lines (each `key: value`).
fn https_listener(port: u16, auth: bool, extra: &[String]) -> String {
    let mut text = format!("  https:\n    listen_addr: \"127.0.0.1:{port}\"");
    if auth {
        text +=
            &format!("\n    auth_username: \"{HTTP_USER}\"\n    auth_password: \"{HTTP_PASS}\"");
    }
    for line in extra {
        text += &format!("\n    {line}");
    }
    text
}

async fn https_stack(port: u16, auth: bool, extra: &[String]) -> Stack {
    let stack = Stack::start(StackOptions {
        proxy_extra: https_listener(port, auth, extra),
        ..Default::default()
    })
    .await;
    wait_for_port(port).await;
    stack
}

/// The SHA-256 of a certificate's public key (base64), as Chromium's
/// `--ignore-certificate-errors-spki-list` names the certificates it accepts.
fn spki_hash(cert: &Path) -> String {
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(
            "openssl x509 -in \"$1\" -pubkey -noout | openssl pkey -pubin -outform der \
             | openssl dgst -sha256 -binary | base64",
        )
        .arg("sh")
        .arg(cert)
        .output()
        .expect("openssl");
    assert!(out.status.success(), "openssl: {out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_sends_proxy_credentials_inside_tls_for_connect_and_absolute_form() {
    let port = free_port();
    let stack = https_stack(port, true, &[]).await;
    let ca = stack.certs.cert.to_str().unwrap();
    let proxy = format!("https://{HTTP_USER}:{HTTP_PASS}@127.0.0.1:{port}");
    let plain = http_target().await;
    let secure = https_target(&stack.certs).await;

    // Absolute-form forwarding and CONNECT, the proxy verified by curl.
    let url = format!("http://{plain}/");
    let got = curl_status_body(&["-x", &proxy, "--proxy-cacert", ca, &url]).await;
    assert_eq!(got, ("200".into(), "hello".into()));
    let got = curl_status_body(&["-p", "-x", &proxy, "--proxy-cacert", ca, &url]).await;
    assert_eq!(got, ("200".into(), "hello".into()));
    // https:// inside the TLS session to the proxy: TLS in TLS, a MiB intact.
    let big = format!("https://localhost:{}/bytes/1048576", secure.port());
    let (code, body) = curl(&["-x", &proxy, "--proxy-cacert", ca, "--cacert", ca, &big]).await;
    assert_eq!(code, 0);
    assert_eq!(sha256_hex(&body), sha256_hex(&pattern(1 << 20, 7)));

    // Wrong or missing credentials: asked again, over TLS.
    let wrong = format!("https://{HTTP_USER}:nope@127.0.0.1:{port}");
    let anonymous = format!("https://127.0.0.1:{port}");
    for p in [&wrong, &anonymous] {
        assert_eq!(
            curl_status(&["-x", p, "--proxy-cacert", ca, &url]).await,
            "407"
        );
        assert_eq!(
            curl_connect_status(&["-x", p, "--proxy-cacert", ca, &url]).await,
            "407"
        );
    }
    // A proxy certificate the client does not trust: curl refuses it (exit 60).
    let other = certs();
    let (code, _) = curl(&[
        "-x",
        &proxy,
        "--proxy-cacert",
        other.cert.to_str().unwrap(),
        &url,
    ])
    .await;
    assert_eq!(
        code, 60,
        "an untrusted proxy certificate must fail verification"
    );

    let log = stack.log("gateway");
    assert!(
        log.lines().any(|l| l.contains(r#"listener="https proxy""#)
            && l.contains(r#"proto="connect""#)
            && l.contains(&format!("user={HTTP_USER}"))
            && l.contains(r#"result="ok""#)),
        "no access line of the https listener:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_http_client_on_the_tls_port_is_told_and_spares_the_others() {
    let port = free_port();
    let stack = https_stack(port, true, &[]).await;
    let ca = stack.certs.cert.to_str().unwrap().to_owned();
    let proxy = format!("https://{HTTP_USER}:{HTTP_PASS}@127.0.0.1:{port}");
    let target = http_target().await;

    // A download through the TLS listener, under way while plain clients come and go.
    let slow = format!("http://{target}/slow/40/50");
    let download = {
        let (proxy, ca) = (proxy.clone(), ca.clone());
        tokio::spawn(async move { curl(&["-x", &proxy, "--proxy-cacert", &ca, &slow]).await })
    };
    wait_for_slow_requests(target, 1).await;

    let plain_proxy = format!("http://{HTTP_USER}:{HTTP_PASS}@127.0.0.1:{port}");
    let (status, body) =
        curl_status_body(&["-x", &plain_proxy, &format!("http://{target}/")]).await;
    assert_eq!(status, "400");
    assert!(
        body.contains("HTTPS proxy") && body.contains("TLS"),
        "{body}"
    );
    // CONNECT in clear: the same answer, as curl reports it.
    assert_eq!(
        curl_connect_status(&["-x", &plain_proxy, &format!("http://{target}/")]).await,
        "400"
    );
    // Junk, and a connection that sends nothing and leaves.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut junk = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        junk.write_all(&[0u8; 512]).await.unwrap();
        let mut answer = Vec::new();
        let read = tokio::time::timeout(
            std::time::Duration::from_secs(20),
            junk.read_to_end(&mut answer),
        )
        .await;
        assert!(read.is_ok(), "the junk connection was never closed");
        drop(tokio::net::TcpStream::connect(("127.0.0.1", port)).await);
    }

    let (code, body) = download.await.unwrap();
    assert_eq!(code, 0);
    assert_eq!(
        body.len(),
        40 * SLOW_CHUNK,
        "the TLS user's download was cut"
    );
    let url = format!("http://{target}/");
    let got = curl_status_body(&["-x", &proxy, "--proxy-cacert", &ca, &url]).await;
    assert_eq!(got, ("200".into(), "hello".into()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rotates_the_certificate_the_https_listener_shares_with_the_agent_listener() {
    let port = free_port();
    let stack = https_stack(port, true, &[]).await;
    let old = certs();
    std::fs::copy(&stack.certs.cert, &old.cert).unwrap();
    let proxy = format!("https://{HTTP_USER}:{HTTP_PASS}@127.0.0.1:{port}");
    let url = format!("http://{}/", http_target().await);

    let fresh =
        anyproxy::transport::tls::generate_self_signed(&["localhost", "127.0.0.1"]).unwrap();
    let new_ca = stack.certs.dir.path().join("new-ca.pem");
    std::fs::write(&new_ca, &fresh.cert_pem).unwrap();
    std::fs::write(&stack.certs.cert, &fresh.cert_pem).unwrap();
    std::fs::write(&stack.certs.key, &fresh.key_pem).unwrap();
    signal(stack.gateway.0.id().unwrap(), "HUP");
    stack
        .wait_for_log("gateway", "tls certificate replaced", 1)
        .await;

    let with = |ca: &Path| {
        let args = ["-x", &proxy, "--proxy-cacert", ca.to_str().unwrap(), &url].map(String::from);
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            curl_status(&args).await
        }
    };
    assert_eq!(with(&new_ca).await, "200");
    assert_eq!(
        with(&old.cert).await,
        "000",
        "the old certificate is still served"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_fetches_pages_through_an_https_proxy_with_its_own_certificate() {
    let browser = chromium();
    let own = certs();
    let port = free_port();
    let files = [
        format!("tls_cert: \"{}\"", own.cert.display()),
        format!("tls_key: \"{}\"", own.key.display()),
    ];
    // Open: Chromium has no way to answer a 407 when headless. On loopback only.
    let stack = https_stack(port, false, &files).await;
    let plain = http_target().await;
    let secure = https_target(&stack.certs).await;

    // The listener presents its own files, not the gateway's.
    let url = format!("http://{plain}/");
    let proxy = format!("https://127.0.0.1:{port}");
    let own_ca = own.cert.to_str().unwrap();
    let gateway_ca = stack.certs.cert.to_str().unwrap();
    assert_eq!(
        curl_status(&["-x", &proxy, "--proxy-cacert", own_ca, &url]).await,
        "200"
    );
    assert_eq!(
        curl_status(&["-x", &proxy, "--proxy-cacert", gateway_ca, &url]).await,
        "000"
    );

    // Chromium trusts the proxy's key (and the target's, for https://) by hash, and is
    // told to send loopback through the proxy too (it bypasses it by default).
    let trusted = format!(
        "--ignore-certificate-errors-spki-list={},{}",
        spki_hash(&own.cert),
        spki_hash(&stack.certs.cert)
    );
    for (i, page) in [url.clone(), format!("https://localhost:{}/", secure.port())]
        .into_iter()
        .enumerate()
    {
        let dom = run_chromium(
            &browser,
            &stack.certs.dir.path().join(format!("chromium-{i}")),
            &[
                "--disable-quic".into(),
                "--disable-background-networking".into(),
                "--disable-component-update".into(),
                "--disable-sync".into(),
                format!("--proxy-server=https://127.0.0.1:{port}"),
                "--proxy-bypass-list=<-loopback>".into(),
                trusted.clone(),
                "--dump-dom".into(),
                page.clone(),
            ],
        )
        .await;
        let dom = String::from_utf8_lossy(&dom);
        assert!(dom.contains("hello"), "{page}: chromium saw\n{dom}");
    }
    let log = stack.log("gateway");
    for (proto, target) in [
        ("http", plain.to_string()),
        ("connect", format!("localhost:{}", secure.port())),
    ] {
        assert!(
            log.lines().any(|l| l.contains(r#"listener="https proxy""#)
                && l.contains(&format!(r#"proto="{proto}""#))
                && l.contains(&format!("target={target}"))
                && l.contains(r#"result="ok""#)),
            "chromium's {proto} request to {target} did not go through the https listener:\n{log}"
        );
    }

    // Its own files rotate with a SIGHUP too.
    let fresh = anyproxy::transport::tls::generate_self_signed(&["127.0.0.1"]).unwrap();
    std::fs::write(&own.cert, &fresh.cert_pem).unwrap();
    std::fs::write(&own.key, &fresh.key_pem).unwrap();
    signal(stack.gateway.0.id().unwrap(), "HUP");
    stack
        .wait_for_log("gateway", "configuration reloaded", 1)
        .await;
    assert_eq!(
        curl_status(&["-x", &proxy, "--proxy-cacert", own_ca, &url]).await,
        "200"
    );
}

/// A TLS connection to the proxy that offers only `h2`, verified with `ca`, and the task
/// that drives it (it ends when the connection does).
async fn h2_connection(
    port: u16,
    ca: &Path,
) -> (
    hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    tokio::task::JoinHandle<hyper::Result<()>>,
) {
    let mut config = (*anyproxy::transport::tls::client_config(Some(ca)).unwrap()).clone();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let name = anyproxy::transport::tls::server_name("127.0.0.1").unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("TLS to the proxy");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (sender, connection) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .expect("HTTP/2 to the proxy");
    (sender, tokio::spawn(connection))
}

fn basic(user: &str, pass: &str) -> String {
    use base64::Engine;
    let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
    format!("Basic {token}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_connect_tunnels_share_one_http2_connection_to_the_proxy() {
    use http_body_util::{BodyExt, Empty};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const TUNNELS: usize = 24;
    let port = free_port();
    let stack = https_stack(port, true, &[]).await;
    let target = http_target().await;
    let (sender, connection) = h2_connection(port, &stack.certs.cert).await;
    let request = |method: hyper::Method, uri: String, auth: Option<String>| {
        let mut req = hyper::Request::builder().method(method).uri(uri);
        if let Some(auth) = auth {
            req = req.header("proxy-authorization", auth);
        }
        req.body(Empty::<bytes::Bytes>::new()).unwrap()
    };

    // Tunnels at once, each a stream of the one connection, each carrying its own
    // HTTP/1.1 exchange with the target; and one without credentials among them.
    let mut tunnels = Vec::new();
    for i in 0..TUNNELS {
        let mut sender = sender.clone();
        let req = request(
            hyper::Method::CONNECT,
            target.to_string(),
            Some(basic(HTTP_USER, HTTP_PASS)),
        );
        tunnels.push(tokio::spawn(async move {
            let resp = sender.send_request(req).await.expect("CONNECT stream");
            assert_eq!(resp.status(), 200, "tunnel {i}");
            let upgraded = hyper::upgrade::on(resp).await.expect("the tunnel");
            let mut io = hyper_util::rt::TokioIo::new(upgraded);
            let len = 1000 + i * 1000;
            io.write_all(
                format!("GET /bytes/{len} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .unwrap();
            let mut answer = Vec::new();
            io.read_to_end(&mut answer).await.unwrap();
            assert!(answer.starts_with(b"HTTP/1.1 200"), "tunnel {i}");
            assert!(answer.ends_with(&pattern(len, 7)), "tunnel {i}: body");
        }));
    }
    let mut anonymous = sender.clone();
    let resp = anonymous
        .send_request(request(hyper::Method::CONNECT, target.to_string(), None))
        .await
        .unwrap();
    assert_eq!(resp.status(), 407);
    for t in tunnels {
        t.await.unwrap();
    }
    // Absolute-form over the same connection.
    let mut get = sender.clone();
    let resp = get
        .send_request(request(
            hyper::Method::GET,
            format!("http://{target}/"),
            Some(basic(HTTP_USER, HTTP_PASS)),
        ))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"hello");

    // Every tunnel came from one client connection (one source port).
    let log = stack.log("gateway");
    let clients: std::collections::HashSet<&str> = log
        .lines()
        .filter(|l| l.contains(r#"proto="connect""#) && l.contains(r#"result="ok""#))
        .filter_map(|l| l.split("client=").nth(1)?.split(' ').next())
        .collect();
    let tunnels_logged = log
        .lines()
        .filter(|l| l.contains(r#"proto="connect""#) && l.contains(r#"result="ok""#))
        .count();
    assert_eq!((clients.len(), tunnels_logged), (1, TUNNELS), "{log}");

    // With nothing in progress any more, the proxy closes the connection after its idle
    // timeout (30 s), as it does an idle HTTP/1 keep-alive one, even though the client
    // still holds it and answers its pings.
    let ended = tokio::time::timeout(std::time::Duration::from_secs(120), connection).await;
    assert!(ended.is_ok(), "an idle HTTP/2 connection was kept open");
    drop(sender);
}
