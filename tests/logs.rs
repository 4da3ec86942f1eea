//! Logs as an operator ships them: `log: {format: json, level}` from the config file
//! gives one JSON object per line, the access line carries every field as a key, the
//! level is honoured, and no secret is written.

mod common;

use common::*;
use serde_json::Value;

fn json_lines(log: &str) -> Vec<Value> {
    log.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_access_line_as_fields_and_honour_the_level() {
    let stack = Stack::start(StackOptions {
        // Access lines and agent logins (the stack waits for them) at info, everything
        // else only from warn up.
        top_extra:
            "log:\n  format: json\n  level: \"warn,access=info,anyproxy::gateway::server=info\"\n"
                .into(),
        ..Default::default()
    })
    .await;
    let target = http_target().await;
    let (code, body) = curl(&[
        "--socks5",
        &stack.socks_auth(),
        &format!("http://{target}/"),
    ])
    .await;
    assert_eq!((code, body.as_slice()), (0, &b"hello"[..]));
    stack.wait_for_log("gateway", "\"access\"", 1).await;
    stack.wait_for_log("agent", "\"access\"", 1).await;

    let gateway = json_lines(&stack.log("gateway"));
    let access: Vec<&Value> = gateway.iter().filter(|v| v["target"] == "access").collect();
    assert_eq!(
        access.len(),
        1,
        "one access line per connection: {gateway:?}"
    );
    assert_eq!(access[0]["level"], "INFO");
    assert!(access[0]["timestamp"].is_string());
    let line = &access[0]["fields"];
    assert_eq!(line["proto"], "socks5");
    assert_eq!(line["user"], SOCKS_USER);
    assert_eq!(line["group"], "default");
    assert_eq!(line["result"], "ok");
    assert_eq!(line["target"], target.to_string());
    assert!(line["client"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(line["via"].as_str().unwrap().starts_with("test-agent"));
    assert!(line["received"].as_u64().unwrap() > 0, "{line}");
    assert!(line["sent"].as_u64().unwrap() > 0, "{line}");
    assert!(line["ms"].is_u64(), "{line}");
    // The level: no other info line ("gateway listening"...) was written.
    assert!(
        gateway.iter().all(|v| v["level"] != "INFO"
            || v["target"] == "access"
            || v["target"] == "anyproxy::gateway::server"),
        "{gateway:?}"
    );
    assert!(!stack.log("gateway").contains("gateway listening"));

    let agent = json_lines(&stack.log("agent"));
    assert!(agent
        .iter()
        .any(|v| v["target"] == "access" && v["fields"]["result"] == "ok"));

    for log in [stack.log("gateway"), stack.log("agent")] {
        for secret in [SOCKS_PASS, HTTP_PASS, AGENT_PASS] {
            assert!(!log.contains(secret), "a secret reached the log: {log}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_log_level_fails_at_start_with_the_reason() {
    let certs = certs();
    let path = certs.dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        format!(
            "log:\n  level: \"info,=[\"\ngateway:\n  listen_addr: \"127.0.0.1:{}\"\n  tls_cert: \"{}\"\n  tls_key: \"{}\"\n  auth_username: a\n  auth_password: b\n",
            free_port(),
            certs.cert.display(),
            certs.key.display()
        ),
    )
    .unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_anyproxy"))
        .args(["gateway", "--config", path.to_str().unwrap()])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("log.level"), "{err}");
}
