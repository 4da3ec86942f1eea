//! Client profiles (`anyproxy export`, `/profiles/` on the admin listener), each fed
//! to its real consumer: the PAC file to the `pac-resolver` npm package under node,
//! the proxychains configuration to proxychains4 running curl, the shell lines and curl
//! lines to bash and curl, and the Clash file to a YAML parser checked for the fields
//! Clash requires. Every proxy run goes through a real gateway and agent to a loopback
//! target, and a tampered password is refused, so a direct connection cannot pass.

mod common;

use std::path::{Path, PathBuf};

use common::*;

const ADMIN: &str = "ops:ops-secret";

/// `anyproxy export ARGS`: (success, stdout, stderr).
fn export(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(BIN)
        .arg("export")
        .args(args)
        .output()
        .expect("run anyproxy export");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn export_ok(args: &[&str]) -> String {
    let (ok, out, err) = export(args);
    assert!(ok, "export {args:?} failed: {err}");
    out
}

fn config_of(stack: &Stack) -> String {
    stack
        .certs
        .dir
        .path()
        .join("config.yaml")
        .display()
        .to_string()
}

async fn stack_with_admin() -> (Stack, u16) {
    let admin = free_port();
    let (user, pass) = ADMIN.split_once(':').unwrap();
    let stack = Stack::start(StackOptions {
        gateway_extra: vec![
            format!("admin_addr: \"127.0.0.1:{admin}\""),
            format!("admin_username: \"{user}\""),
            format!("admin_password: \"{pass}\""),
        ],
        ..Default::default()
    })
    .await;
    wait_for_port(admin).await;
    (stack, admin)
}

/// Runs `script` with bash; (exit code, stdout).
async fn bash(script: &str) -> (i32, String) {
    let out = tokio::process::Command::new("bash")
        .args(["-c", script])
        .output()
        .await
        .expect("bash");
    if !out.status.success() {
        eprintln!("bash {script:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxychains4_runs_curl_through_the_exported_config() {
    assert!(
        std::process::Command::new("proxychains4")
            .arg("--help")
            .output()
            .is_ok(),
        "proxychains4 missing: scripts/test.sh installs it (Debian package proxychains4)"
    );
    let (stack, admin) = stack_with_admin().await;
    let target = http_target().await;
    let config = config_of(&stack);
    let dir = stack.certs.dir.path();
    // The SOCKS5 user gets a socks5 line, the HTTP user an http (CONNECT) one.
    for (user, pass, kind) in [
        (SOCKS_USER, SOCKS_PASS, "socks5"),
        (HTTP_USER, HTTP_PASS, "http"),
    ] {
        let text = export_ok(&["proxychains", "--config", &config, "--user", user]);
        let port = if kind == "socks5" {
            stack.socks_port
        } else {
            stack.http_port
        };
        let line = format!("{kind} 127.0.0.1 {port} {user} {pass}");
        assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        // The admin listener serves the same text.
        let (status, served) = admin_get(
            admin,
            &format!("/profiles/proxychains?user={user}"),
            Some(ADMIN),
        )
        .await;
        assert_eq!((status.as_str(), served.as_str()), ("200", text.as_str()));

        let good = write(dir, &format!("{user}.conf"), &text);
        let bad = write(
            dir,
            &format!("{user}-bad.conf"),
            &text.replace(&line, &format!("{kind} 127.0.0.1 {port} {user} wrong")),
        );
        let run = |conf: &Path| {
            format!(
                "proxychains4 -q -f {} curl -sS --max-time 20 http://127.0.0.1:{}/",
                conf.display(),
                target.port()
            )
        };
        assert_eq!(
            bash(&run(&good)).await,
            (0, "hello".into()),
            "{kind} profile"
        );
        let (code, body) = bash(&run(&bad)).await;
        assert!(
            code != 0 && body.is_empty(),
            "a wrong password still passed: {code} {body:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_profiles_need_the_admin_credentials_and_name_bad_requests() {
    let (stack, admin) = stack_with_admin().await;
    let (status, _) = admin_get(admin, &format!("/profiles/env?user={HTTP_USER}"), None).await;
    assert_eq!(status, "401");
    let (status, body) = admin_get(admin, "/profiles/env", Some(ADMIN)).await;
    assert_eq!(status, "400");
    assert!(
        body.contains(HTTP_USER) && body.contains(SOCKS_USER),
        "{body}"
    );
    assert!(
        !body.contains(HTTP_PASS) && !body.contains(SOCKS_PASS),
        "{body}"
    );
    for (path, needle) in [
        ("/profiles/nope?user=huser", "not a profile format"),
        ("/profiles/env?user=mallory", "not an account"),
        (
            "/profiles/env?user=huser&colour=red",
            "unknown query parameter",
        ),
        ("/profiles/env?user=huser&host=a%22b", "not a host name"),
    ] {
        let (status, body) = admin_get(admin, path, Some(ADMIN)).await;
        assert_eq!(status, "400", "{path}: {body}");
        assert!(body.contains(needle), "{path}: {body}");
    }
    let (status, pac) = admin_get(
        admin,
        &format!("/profiles/pac?user={HTTP_USER}&host=proxy.example.com&bypass=10.0.0.0/8"),
        Some(ADMIN),
    )
    .await;
    assert_eq!(status, "200", "{pac}");
    assert!(
        pac.contains(&format!("PROXY proxy.example.com:{}", stack.http_port)),
        "{pac}"
    );
    assert!(
        pac.contains("isInNet(host, \"10.0.0.0\", \"255.0.0.0\")"),
        "{pac}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn env_and_curl_lines_work_as_printed() {
    let (stack, _admin) = stack_with_admin().await;
    let target = http_target().await;
    let config = config_of(&stack);
    let url = format!("http://127.0.0.1:{}/", target.port());
    let dir = stack.certs.dir.path();

    // Shell lines: HTTP proxy for http_proxy, SOCKS5 (remote names) for ALL_PROXY. The
    // target is loopback, which no_proxy bypasses; `--noproxy ''` lifts that for the run.
    for (user, pass) in [(HTTP_USER, HTTP_PASS), (SOCKS_USER, SOCKS_PASS)] {
        let text = export_ok(&["env", "--config", &config, "--user", user]);
        for wrong in [false, true] {
            let text = if wrong {
                text.replace(&format!(":{pass}@"), ":wrong@")
            } else {
                text.clone()
            };
            let file = write(dir, &format!("{user}-{wrong}.env"), &text);
            let script = format!(
                ". {}; curl -sS --fail --max-time 20 --noproxy '' {url}",
                file.display()
            );
            let (code, body) = bash(&script).await;
            if wrong {
                assert!(
                    code != 0 && body.is_empty(),
                    "{user}: wrong password passed"
                );
            } else {
                assert_eq!((code, body.as_str()), (0, "hello"), "{text}");
            }
        }
        let bypass = text
            .lines()
            .find(|l| l.starts_with("export no_proxy="))
            .unwrap();
        assert!(
            bypass.contains("127.0.0.0/8") && bypass.contains("localhost"),
            "{bypass}"
        );
    }

    // Curl lines, each one run as printed.
    for user in [HTTP_USER, SOCKS_USER] {
        let text = export_ok(&["curl", "--config", &config, "--user", user, "--url", &url]);
        let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("curl ")).collect();
        assert!(!lines.is_empty(), "{text}");
        for line in lines {
            assert_eq!(
                bash(&format!("{line} -sS --max-time 20")).await,
                (0, "hello".into()),
                "{line}"
            );
        }
    }
}

/// `pac-resolver` and its QuickJS engine, installed by scripts/test.sh.
fn node_modules() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-deps/npm/node_modules");
    assert!(
        dir.join("pac-resolver").exists() && dir.join("quickjs-emscripten").exists(),
        "{} lacks pac-resolver: run scripts/test.sh, which installs it with npm",
        dir.display()
    );
    dir
}

/// A gateway config file (never started) with `proxy` as its `proxy:` section and
/// `groups` after the gateway's own keys.
fn gateway_config(dir: &Path, proxy: &str, groups: &str) -> PathBuf {
    let text = format!(
        "proxy:\n{proxy}gateway:\n  listen_addr: \":8443\"\n  tls_cert: cert.pem\n  tls_key: key.pem\n  auth_username: agent\n  auth_password: agent-secret\n{groups}"
    );
    write(dir, "gateway.yaml", &text)
}

#[test]
fn pac_file_routes_as_a_pac_engine_evaluates_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = gateway_config(
        dir.path(),
        r#"  http: {listen_addr: ":8080", auth_username: alice, auth_password: "a'l\"ice"}
  socks5: {listen_addr: ":1080", auth_username: alice, auth_password: "s0cks"}
"#,
        "",
    );
    let config = config.to_str().unwrap();
    let (ok, _, err) = export(&["pac", "--config", config]);
    assert!(!ok && err.contains("--host"), "{err}");
    let pac = export_ok(&[
        "pac",
        "--config",
        config,
        "--host",
        "gw.example.com",
        "--bypass",
        "192.168.0.0/16,corp.example",
    ]);
    assert!(
        !pac.contains("s0cks") && !pac.contains("l\\\"ice"),
        "a PAC file carries no password:\n{pac}"
    );
    let pac_path = write(dir.path(), "proxy.pac", &pac);
    let script = r#"
const { createPacResolver } = require('pac-resolver');
const { getQuickJS } = require('quickjs-emscripten');
(async () => {
  const find = createPacResolver(await getQuickJS(), require('fs').readFileSync(process.argv[2]));
  for (const url of process.argv.slice(3)) console.log(url + ' ' + await find(url));
})().catch(e => { console.error(e); process.exit(1); });
"#;
    let script_path = write(dir.path(), "eval.js", script);
    let proxy = "PROXY gw.example.com:8080";
    let cases = [
        ("http://example.com/", proxy),
        ("https://10.1.2.3/", proxy),
        ("http://172.16.0.9:8080/x", proxy),
        ("http://intranet/", "DIRECT"),
        ("http://localhost:3000/", "DIRECT"),
        ("http://127.0.0.1/", "DIRECT"),
        ("http://127.9.9.9/", "DIRECT"),
        ("http://169.254.169.254/", "DIRECT"),
        ("http://printer.local/", "DIRECT"),
        ("http://[::1]:8080/", "DIRECT"),
        ("http://[fe80::1]/", "DIRECT"),
        ("http://[2001:db8::1]/", proxy),
        ("http://192.168.1.1/", "DIRECT"),
        ("http://wiki.corp.example/", "DIRECT"),
        ("http://corp.example/", "DIRECT"),
        ("http://notcorp.example/", proxy),
    ];
    let out = std::process::Command::new("node")
        .arg(&script_path)
        .arg(&pac_path)
        .args(cases.iter().map(|c| c.0))
        .env("NODE_PATH", node_modules())
        .output()
        .expect("node must be installed");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}\n{pac}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Vec<&str> = stdout.lines().collect();
    assert_eq!(got.len(), cases.len(), "{stdout}");
    for ((url, want), line) in cases.iter().zip(got) {
        assert_eq!(line, format!("{url} {want}"), "\n{pac}");
    }
}

#[test]
fn clash_file_has_what_clash_requires() {
    let dir = tempfile::tempdir().unwrap();
    let config = gateway_config(
        dir.path(),
        r#"  http: {listen_addr: "127.0.0.1:8080"}
  socks5: {listen_addr: "127.0.0.1:1080"}
"#,
        r#"  groups:
    - id: lab
      agent_password: lab-secret
      users:
        - {username: "bob", password: "b: #'\"ob"}
        - {username: "carol", password: "carol-secret"}
"#,
    );
    let text = export_ok(&[
        "clash",
        "--config",
        config.to_str().unwrap(),
        "--user",
        "bob",
    ]);
    assert!(
        !text.contains("carol-secret") && !text.contains("lab-secret"),
        "{text}"
    );
    let doc: yaml_serde::Value = yaml_serde::from_str(&text).expect("the Clash file parses");
    let proxies = doc["proxies"].as_sequence().expect("proxies: a list");
    let mut names = Vec::new();
    for (p, kind, port) in [(&proxies[0], "socks5", 1080), (&proxies[1], "http", 8080)] {
        // Clash and Mihomo refuse a proxy without name, type, server and port.
        assert_eq!(p["type"].as_str(), Some(kind), "{text}");
        assert_eq!(p["server"].as_str(), Some("127.0.0.1"));
        assert_eq!(p["port"].as_u64(), Some(port));
        assert_eq!(p["username"].as_str(), Some("bob"));
        assert_eq!(p["password"].as_str(), Some("b: #'\"ob"));
        names.push(p["name"].as_str().expect("a name").to_owned());
    }
    assert_eq!(proxies.len(), 2);
    let group = &doc["proxy-groups"][0];
    assert_eq!(group["type"].as_str(), Some("select"));
    let members: Vec<&str> = group["proxies"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert_eq!(members, names);
    let rules: Vec<&str> = doc["rules"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert_eq!(
        rules.last(),
        Some(&format!("MATCH,{}", group["name"].as_str().unwrap()).as_str())
    );
    assert!(
        rules.contains(&"IP-CIDR,127.0.0.0/8,DIRECT,no-resolve"),
        "{rules:?}"
    );
    assert!(doc["mixed-port"].as_u64().is_some());
}
