//! `anyproxy init gateway|client`: the files it writes pass `anyproxy check`, keep
//! their secrets at mode 0600, and a gateway and agents started from them (with
//! loopback overrides) carry real curl requests.

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Output, Stdio};

use common::*;

fn anyproxy(args: &[&str], stdin: &str) -> Output {
    let mut child = std::process::Command::new(BIN)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("anyproxy runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// `anyproxy check` accepts `path` without a warning.
fn checks_clean(path: &Path) {
    let out = anyproxy(&["check", "--config", path.to_str().unwrap()], "");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "{}: {stdout}\n{stderr}",
        path.display()
    );
    assert!(stdout.contains("configuration ok"), "{stdout}");
    assert!(!stderr.contains("warning"), "{}: {stderr}", path.display());
}

struct Ports {
    gateway: u16,
    https: u16,
    socks: u16,
    http: u16,
    admin: u16,
}

fn init_gateway(dir: &Path, ports: &Ports, force: bool) -> Output {
    let p = |n: u16| n.to_string();
    let (g, h, s, t, a) = (
        p(ports.gateway),
        p(ports.https),
        p(ports.socks),
        p(ports.http),
        p(ports.admin),
    );
    let mut args = vec![
        "init",
        "gateway",
        "--host",
        "127.0.0.1",
        "--dir",
        dir.to_str().unwrap(),
        "--bind",
        "127.0.0.1",
        "--gateway-port",
        &g,
        "--https-port",
        &h,
        "--socks-port",
        &s,
        "--http-port",
        &t,
        "--admin-port",
        &a,
    ];
    if force {
        args.push("--force");
    }
    anyproxy(&args, "")
}

/// The listener's credentials as `user:password`.
fn credentials(config: &anyproxy::config::Config) -> String {
    let https = config.proxy.as_ref().unwrap().https.as_ref().unwrap();
    let c = https.credentials().unwrap();
    format!("{}:{}", c.username, c.password)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_gateway_writes_a_deployment_that_checks_and_carries_curl_through_its_agents() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("etc-anyproxy");
    let ports = Ports {
        gateway: free_port(),
        https: free_port(),
        socks: free_port(),
        http: free_port(),
        admin: free_port(),
    };
    let out = init_gateway(&dir, &ports, false);
    assert!(out.status.success(), "{out:?}");
    let printed = String::from_utf8(out.stdout).unwrap();
    let (gateway_yaml, client_yaml) = (dir.join("gateway.yaml"), dir.join("client.yaml"));
    // The agent configuration it printed is the one it wrote.
    assert_eq!(printed, std::fs::read_to_string(&client_yaml).unwrap());
    assert_eq!(mode(&dir), 0o700);
    for secret in ["gateway.yaml", "client.yaml", "key.pem"] {
        assert_eq!(mode(&dir.join(secret)), 0o600, "{secret}");
    }
    let gateway_text = std::fs::read_to_string(&gateway_yaml).unwrap();
    let comments = gateway_text.lines().filter(|l| l.contains('#')).count();
    assert!(comments > 10, "not commented:\n{gateway_text}");
    checks_clean(&gateway_yaml);
    checks_clean(&client_yaml);

    // Without the overrides, the listeners are public: every interface.
    let public = tmp.path().join("public");
    let out = anyproxy(
        &[
            "init",
            "gateway",
            "--host",
            "gw.example.com",
            "--dir",
            public.to_str().unwrap(),
        ],
        "",
    );
    assert!(out.status.success(), "{out:?}");
    let config = anyproxy::config::Config::load(&public.join("gateway.yaml")).unwrap();
    let proxy = config.proxy.as_ref().unwrap();
    assert!(config
        .gateway
        .as_ref()
        .unwrap()
        .listen_addr
        .0
        .ip()
        .is_unspecified());
    assert!(proxy
        .https
        .as_ref()
        .unwrap()
        .listen_addr
        .0
        .ip()
        .is_unspecified());
    let agent = anyproxy::config::Config::load(&public.join("client.yaml")).unwrap();
    assert_eq!(agent.client.unwrap().gateway_addr, "gw.example.com:8443");

    // A second run keeps every file; --force replaces them.
    let out = init_gateway(&dir, &ports, false);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("exists already"));
    assert_eq!(
        std::fs::read_to_string(&gateway_yaml).unwrap(),
        gateway_text
    );

    // The gateway and its agent, from these files; the agent may reach this host's
    // loopback, where the test's target lives.
    let log = tmp.path().join("gateway.log");
    let mut gateway = spawn(
        &["gateway", "--config", gateway_yaml.to_str().unwrap()],
        &log,
    );
    for port in [
        ports.gateway,
        ports.https,
        ports.socks,
        ports.http,
        ports.admin,
    ] {
        assert!(
            wait_for_listener(&mut gateway, port).await,
            "{}",
            std::fs::read_to_string(&log).unwrap()
        );
    }
    let local = std::fs::read_to_string(&client_yaml)
        .unwrap()
        .replace("  # allow_local: false", "  allow_local: true");
    let agent_yaml = tmp.path().join("agent-1.yaml");
    std::fs::write(&agent_yaml, local).unwrap();
    let _agent = spawn(
        &["client", "--config", agent_yaml.to_str().unwrap()],
        &tmp.path().join("agent.log"),
    );

    // A second agent from `init client`, given what the first one's file says.
    let first = anyproxy::config::Config::load(&client_yaml)
        .unwrap()
        .client
        .unwrap();
    let fingerprint = format!(
        "sha256:{}",
        hex(&first.gateway_tls_fingerprint.as_ref().unwrap().0)
    );
    let second_dir = tmp.path().join("agent-2");
    let out = anyproxy(
        &[
            "init",
            "client",
            "--gateway",
            &first.gateway_addr,
            "--fingerprint",
            &fingerprint,
            "--client-id",
            "agent-2",
            "--dir",
            second_dir.to_str().unwrap(),
        ],
        &format!("{}\n", first.auth_password.expose()),
    );
    assert!(out.status.success(), "{out:?}");
    let second_yaml = second_dir.join("client.yaml");
    assert_eq!(mode(&second_yaml), 0o600);
    checks_clean(&second_yaml);
    let local = std::fs::read_to_string(&second_yaml)
        .unwrap()
        .replace("  # allow_local: false", "  allow_local: true");
    std::fs::write(&second_yaml, local).unwrap();
    let _agent2 = spawn(
        &["client", "--config", second_yaml.to_str().unwrap()],
        &tmp.path().join("agent-2.log"),
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::fs::read_to_string(&log)
        .unwrap()
        .matches("agent connected")
        .count()
        < 2
    {
        assert!(
            std::time::Instant::now() < deadline,
            "two agents never connected:\n{}",
            std::fs::read_to_string(&log).unwrap()
        );
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }

    let config = anyproxy::config::Config::load(&gateway_yaml).unwrap();
    let user = credentials(&config);
    let cert = dir.join("cert.pem");
    let target = http_target().await;
    let url = format!("http://{target}/");
    let https = format!("https://{user}@127.0.0.1:{}", ports.https);
    for connect in [false, true] {
        let mut args = vec!["-x", &https, "--proxy-cacert", cert.to_str().unwrap()];
        if connect {
            args.push("-p");
        }
        args.push(&url);
        assert_eq!(
            curl_status_body(&args).await,
            ("200".into(), "hello".into())
        );
    }
    let socks = format!("socks5h://{user}@127.0.0.1:{}", ports.socks);
    assert_eq!(
        curl_status_body(&["-x", &socks, &url]).await,
        ("200".into(), "hello".into())
    );
    let http = format!("http://{user}@127.0.0.1:{}", ports.http);
    assert_eq!(
        curl_status_body(&["-x", &http, &url]).await,
        ("200".into(), "hello".into())
    );
    // The admin listener asks for its generated credentials.
    let admin = config.gateway.as_ref().unwrap().admin().unwrap();
    let (status, _) = admin_get(ports.admin, "/metrics", None).await;
    assert_eq!(status, "401");
    let auth = format!(
        "{}:{}",
        admin.username.as_deref().unwrap(),
        admin.password.as_deref().unwrap()
    );
    let (status, _) = admin_get(ports.admin, "/metrics", Some(&auth)).await;
    assert_eq!(status, "200");

    // --force replaces the files, with new credentials.
    drop(gateway);
    let out = init_gateway(&dir, &ports, true);
    assert!(out.status.success(), "{out:?}");
    let renewed = anyproxy::config::Config::load(&gateway_yaml).unwrap();
    assert_ne!(credentials(&renewed), user);
}
