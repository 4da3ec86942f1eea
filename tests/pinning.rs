//! The agent trusts the gateway's certificate as users make it: a bare `openssl req
//! -x509` certificate (`CA:TRUE`) configured as `gateway_tls_cert`, or a
//! `gateway_tls_fingerprint`; anything else is refused with "pinned certificate
//! mismatch".

mod common;

use common::{openssl_self_signed, spawn, Proc, Stack, StackOptions, AGENT_PASS, AGENT_USER};

/// An agent of `stack`'s gateway trusting what `trust` (YAML `client:` lines) says.
fn agent(stack: &Stack, id: &str, trust: &str) -> Proc {
    let dir = stack.certs.dir.path();
    let config = format!(
        "client:\n  gateway_addr: \"127.0.0.1:{port}\"\n  client_id: \"{id}\"\n  auth_username: \"{AGENT_USER}\"\n  auth_password: \"{AGENT_PASS}\"\n  reconnect_min: 100ms\n  reconnect_max: 1s\n{trust}",
        port = stack.gateway_port,
    );
    let path = dir.join(format!("{id}.yaml"));
    std::fs::write(&path, config).unwrap();
    spawn(
        &["client", "--config", path.to_str().unwrap()],
        &dir.join(format!("{id}.log")),
    )
}

async fn openssl_stack() -> (Stack, tempfile::TempDir) {
    let made = tempfile::tempdir().unwrap();
    let pair = openssl_self_signed(made.path(), "gateway");
    assert!(
        pair.0.contains("BEGIN CERTIFICATE"),
        "openssl wrote no certificate"
    );
    // The stack's own agent trusts exactly this file: it must connect.
    let stack = Stack::start(StackOptions {
        tls: Some(pair),
        ..Default::default()
    })
    .await;
    (stack, made)
}

#[tokio::test]
async fn an_openssl_self_signed_certificate_is_accepted_when_configured() {
    let (stack, _made) = openssl_stack().await;
    // The stack's agent is connected (Stack::start waited for it); it moves traffic.
    let target = common::http_target().await;
    let status =
        common::curl_status(&["-x", &stack.http_proxy(), &format!("http://{target}/")]).await;
    assert_eq!(status, "200", "{}", stack.log("agent"));
    assert!(!stack.log("agent").contains("CaUsedAsEndEntity"));
}

#[tokio::test]
async fn a_different_certificate_is_refused_as_a_pinned_mismatch() {
    let (stack, made) = openssl_stack().await;
    let other = openssl_self_signed(made.path(), "other");
    let other_path = stack.certs.dir.path().join("other.pem");
    std::fs::write(&other_path, other.0).unwrap();
    let _wrong = agent(
        &stack,
        "wrong-cert",
        &format!("  gateway_tls_cert: \"{}\"\n", other_path.display()),
    );
    stack
        .wait_for_log("wrong-cert", "pinned certificate mismatch", 1)
        .await;
    let log = stack.log("wrong-cert");
    assert!(
        log.contains(&format!("not the certificate in {}", other_path.display())),
        "names the file: {log}"
    );
    assert!(!log.contains("CaUsedAsEndEntity"), "{log}");
    assert_eq!(stack.log("gateway").matches("agent connected").count(), 1);
}

#[tokio::test]
async fn a_fingerprint_pins_without_a_file() {
    let (stack, _made) = openssl_stack().await;
    let der = anyproxy::transport::tls::load_certs(&stack.certs.cert).unwrap();
    let fp = anyproxy::transport::tls::fingerprint_hex(der[0].as_ref());
    let _pinned = agent(
        &stack,
        "by-fingerprint",
        &format!("  gateway_tls_fingerprint: \"{fp}\"\n"),
    );
    stack.wait_for_log("gateway", "agent connected", 2).await;

    let wrong = format!("sha256:{}", "00".repeat(32));
    let _wrong = agent(
        &stack,
        "wrong-fingerprint",
        &format!("  gateway_tls_fingerprint: \"{wrong}\"\n"),
    );
    stack
        .wait_for_log("wrong-fingerprint", "pinned certificate mismatch", 1)
        .await;
    let log = stack.log("wrong-fingerprint");
    assert!(log.contains(&fp), "says what the gateway presented: {log}");
}
