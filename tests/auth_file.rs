//! The `file` authentication backend through the real binary and real curl: argon2
//! and bcrypt users (hashes made by `anyproxy passwd`) get through, a wrong password
//! gets 407, the users' group decides which agents carry them, an edit adds a user
//! without a restart, and a broken edit keeps the previous users and names the line.

mod common;

use std::path::Path;
use std::process::Stdio;

use common::*;
use tokio::io::AsyncWriteExt;

const OFFICE_SECRET: &str = "office-secret";

/// `anyproxy passwd [args]` with `password` on stdin: the hash it prints.
async fn passwd(password: &str, args: &[&str]) -> String {
    let mut child = tokio::process::Command::new(BIN)
        .arg("passwd")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(format!("{password}\n").as_bytes())
        .await
        .unwrap();
    drop(stdin);
    let out = child.wait_with_output().await.unwrap();
    assert!(out.status.success());
    let hash = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(hash.starts_with('$'), "{hash}");
    hash
}

fn users_yaml(users: &[(&str, &str)]) -> String {
    let mut text = String::from("# proxy users\nusers:\n");
    for (name, hash) in users {
        text.push_str(&format!(
            "  - username: {name}\n    password: \"{hash}\"\n    groups: [office]\n"
        ));
    }
    text
}

/// Writes `text` in place of the users file, as an editor would (a new file renamed
/// over the old one, so the gateway never reads half of it).
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A stack whose listeners ask the `users` file (reloaded every 200 ms) after their
/// static accounts, with the file users' `office` group served by its own agent. The
/// stack's own agent (default group) may not reach loopback: a file user who wrongly
/// lands there gets 403, not the target.
async fn office_stack(users: &Path) -> (Stack, Proc) {
    let stack = Stack::start(StackOptions {
        forbidden_hosts: vec!["127.0.0.0/8".into(), "localhost".into()],
        gateway_extra: vec![
            format!("groups:\n    - {{ id: office, agent_password: {OFFICE_SECRET} }}"),
            format!(
                "auth_backends:\n    users:\n      type: file\n      path: \"{}\"\n      reload_interval: 200ms",
                users.display()
            ),
        ],
        listener_extra: vec!["auth: [static, users]".into()],
        ..Default::default()
    })
    .await;
    let office = stack.spawn_group_agent("office-1", "office", OFFICE_SECRET, "");
    stack.wait_for_log("gateway", "group=office", 1).await;
    (stack, office)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hashed_users_from_a_file_that_reloads() {
    let alice = passwd("alice-pw", &[]).await;
    assert!(alice.starts_with("$argon2id$"), "{alice}");
    let bob = passwd("bob-pw", &["--bcrypt", "--cost", "4"]).await;
    assert!(bob.starts_with("$2"), "{bob}");

    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users.yaml");
    std::fs::write(&users, users_yaml(&[("alice", &alice), ("bob", &bob)])).unwrap();
    let (stack, _office) = office_stack(&users).await;
    let target = http_target().await;
    let url = format!("http://127.0.0.1:{}/", target.port());

    // argon2 and bcrypt users, carried by their group's agent.
    for (user, pass) in [("alice", "alice-pw"), ("bob", "bob-pw")] {
        let (code, body) = curl(&["-x", &stack.http_proxy_as(user, pass), &url]).await;
        assert_eq!((code, body.as_slice()), (0, &b"hello"[..]), "{user}");
    }
    // SOCKS5 goes through the same backend.
    stack
        .socks5_as("bob", "bob-pw", target)
        .await
        .expect("bob through SOCKS5");
    assert!(matches!(
        stack.socks5_as("bob", "alice-pw", target).await,
        Err(Socks5Refusal::Auth(1))
    ));
    // Wrong password, unknown user: asked again.
    assert_eq!(
        curl_status(&["-x", &stack.http_proxy_as("alice", "bob-pw"), &url]).await,
        "407"
    );
    assert_eq!(
        curl_status(&["-x", &stack.http_proxy_as("carol", "carol-pw"), &url]).await,
        "407"
    );
    // The static account still works, and leads to the default group (403 there).
    assert_eq!(curl_status(&["-x", &stack.http_proxy(), &url]).await, "403");

    // An edit adds carol, without a restart.
    let carol = passwd("carol-pw", &[]).await;
    replace(
        &users,
        &users_yaml(&[("alice", &alice), ("bob", &bob), ("carol", &carol)]),
    );
    stack
        .until_http_status("carol", "carol-pw", &url, "200")
        .await;
    stack
        .wait_for_log("gateway", "users file reloaded", 1)
        .await;

    // A broken edit (a plain-text password for dave, on line 9) keeps the previous
    // users: alice and carol still get in, dave does not, and the log names the line.
    replace(
        &users,
        &users_yaml(&[("alice", &alice), ("carol", &carol), ("dave", "dave-pw")]),
    );
    stack
        .wait_for_log("gateway", "users file not reloaded", 1)
        .await;
    let log = stack.log("gateway");
    assert!(log.contains("line=9"), "{log}");
    assert!(log.contains("plain-text password refused"), "{log}");
    assert!(
        !log.contains("dave-pw"),
        "a password reached the log:\n{log}"
    );
    assert_eq!(
        curl_status(&["-x", &stack.http_proxy_as("carol", "carol-pw"), &url]).await,
        "200"
    );
    assert_eq!(
        curl_status(&["-x", &stack.http_proxy_as("bob", "bob-pw"), &url]).await,
        "200"
    );
    assert_eq!(
        curl_status(&["-x", &stack.http_proxy_as("dave", "dave-pw"), &url]).await,
        "407"
    );
}

/// A user the file removes, or whose password it changes, loses their live
/// connections (HTTP CONNECT and SOCKS5, the reason in the access line); a user it
/// keeps does not, and the new password gets in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_the_file_removes_or_changes_loses_live_connections() {
    let hash = |pw: &'static str| passwd(pw, &["--bcrypt", "--cost", "4"]);
    let (alice, bob, carol) = (
        hash("alice-pw").await,
        hash("bob-pw").await,
        hash("carol-pw").await,
    );
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users.yaml");
    std::fs::write(
        &users,
        users_yaml(&[("alice", &alice), ("bob", &bob), ("carol", &carol)]),
    )
    .unwrap();
    let (stack, _office) = office_stack(&users).await;
    let echo = echo_target().await;

    let mut alice_tunnel = http_connect_as(&stack, "alice", "alice-pw", echo).await;
    let mut bob_tunnel = stack.socks5_as("bob", "bob-pw", echo).await.unwrap();
    let mut carol_tunnel = http_connect_as(&stack, "carol", "carol-pw", echo).await;
    for t in [&mut alice_tunnel, &mut bob_tunnel, &mut carol_tunnel] {
        round_trip(t, b"before the edit").await;
    }

    let bob_new = hash("bob-new").await;
    replace(&users, &users_yaml(&[("bob", &bob_new), ("carol", &carol)]));
    stack
        .wait_for_log("gateway", "users file reloaded", 1)
        .await;
    closed_by_proxy(&mut alice_tunnel).await;
    closed_by_proxy(&mut bob_tunnel).await;
    round_trip(&mut carol_tunnel, b"kept by the edit").await;
    stack
        .wait_for_log("gateway", "user removed or changed in the users file", 2)
        .await;
    let mut again = stack.socks5_as("bob", "bob-new", echo).await.unwrap();
    round_trip(&mut again, b"with the new password").await;
    assert!(matches!(
        stack.socks5_as("bob", "bob-pw", echo).await,
        Err(Socks5Refusal::Auth(1))
    ));
}
