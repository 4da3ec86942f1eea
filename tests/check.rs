//! `anyproxy check --config FILE`: validates as a start would, starts nothing, names
//! the key of an error, warns about risky settings.

mod common;

use std::path::Path;
use std::process::Output;

use anyproxy::transport::tls;

fn check(dir: &Path, file: &str) -> Output {
    std::process::Command::new(common::BIN)
        .args(["check", "--config", file])
        .current_dir(dir)
        .env_remove("RUST_LOG")
        .output()
        .expect("run anyproxy check")
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The README's configuration example, in `dir` with its certificate files, mode 0600.
fn readme_example(dir: &Path, cert: &tls::GeneratedCert) -> String {
    let readme = include_str!("../README.md");
    let start = readme
        .find("## Configuration")
        .and_then(|at| readme[at..].find("```yaml\n").map(|i| at + i + 8))
        .expect("the README's configuration example");
    let end = start + readme[start..].find("```").unwrap();
    let policy = dir.join("policy");
    let yaml = readme[start..end].replace("/etc/pmproxy", policy.to_str().unwrap());
    for (name, pem) in [
        ("cert.pem", &cert.cert_pem),
        ("key.pem", &cert.key_pem),
        ("gateway_cert.pem", &cert.cert_pem),
    ] {
        std::fs::write(dir.join(name), pem).unwrap();
    }
    write_private(&dir.join("config.yaml"), &yaml);
    yaml
}

fn write_private(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
}

#[test]
fn the_readme_example_passes_with_a_summary_and_no_warning() {
    let dir = tempfile::tempdir().unwrap();
    let cert = tls::generate_self_signed(&["gateway.example.com"]).unwrap();
    readme_example(dir.path(), &cert);
    let out = check(dir.path(), "config.yaml");
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    for want in [
        "gateway: agents at wss://0.0.0.0:8443/ws",
        "groups: 2 (default and office: 1 users)",
        "proxy.http: 0.0.0.0:8080",
        "proxy.socks5: 0.0.0.0:1080",
        "forwards: 2 declared",
        "forward udp 0.0.0.0:51820 -> wg.internal:51820 via group office",
        "limits: per user max 20 at once",
        "cluster: none",
        "policy:",
        "client office-1: 1 replica(s) to gateway.example.com:8443",
        "config.yaml: configuration ok",
    ] {
        assert!(stdout.contains(want), "{want:?} missing from\n{stdout}");
    }
    assert!(!stderr.contains("warning"), "{stderr}");
    // Nothing was created: a check starts nothing, the policy dir included.
    assert!(!dir.path().join("policy").exists());
}

#[test]
fn errors_name_the_key_and_exit_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let cert = tls::generate_self_signed(&["gateway.example.com"]).unwrap();
    let yaml = readme_example(dir.path(), &cert);
    let other = tls::generate_self_signed(&["other"]).unwrap();
    std::fs::write(dir.path().join("other.key"), &other.key_pem).unwrap();
    for (edit, says) in [
        (
            yaml.replace("max_concurrent: 20", "max_concurrent: 0"),
            "gateway.limits.per_user.max_concurrent",
        ),
        (
            yaml.replace("tls_key: key.pem", "tls_key: other.key"),
            "gateway.tls_key: the private key in other.key does not match",
        ),
        (
            yaml.replace("tls_cert: cert.pem", "tls_cert: missing.pem"),
            "gateway.tls_cert: cannot read certificates from missing.pem",
        ),
        (
            yaml.replace(
                "gateway_tls_cert: gateway_cert.pem",
                "gateway_tls_cert: other.key",
            ),
            "client.gateway_tls_cert",
        ),
        (
            yaml.replace("  tls_key: key.pem\n", "  tls_kye: key.pem\n"),
            "tls_kye",
        ),
    ] {
        write_private(&dir.path().join("broken.yaml"), &edit);
        let out = check(dir.path(), "broken.yaml");
        let (stdout, stderr) = text(&out);
        assert!(!out.status.success(), "{says}: {stdout}");
        assert!(stderr.contains(says), "{says:?} missing from\n{stderr}");
        assert!(!stdout.contains("configuration ok"), "{stdout}");
    }
}

#[test]
fn an_expiring_certificate_warns_and_an_expired_one_fails() {
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let write = |until: i64| {
        let c = tls::generate_self_signed_until(&["localhost"], until).unwrap();
        std::fs::write(dir.path().join("cert.pem"), c.cert_pem).unwrap();
        std::fs::write(dir.path().join("key.pem"), c.key_pem).unwrap();
        write_private(
            &dir.path().join("gw.yaml"),
            &format!(
                "gateway:\n  listen_addr: '127.0.0.1:{port}'\n  tls_cert: cert.pem\n  tls_key: key.pem\n  auth_username: u\n  auth_password: p\n"
            ),
        );
    };
    let day = 86_400;
    write(tls::unix_now() + 3 * day + 3600);
    let out = check(dir.path(), "gw.yaml");
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("warning: gateway.tls_cert: the certificate in cert.pem expires in 3 days"),
        "{stderr}"
    );
    // Nothing listens: the check bound no port.
    std::net::TcpListener::bind(("127.0.0.1", port)).expect("the check left the port free");

    write(tls::unix_now() + 60 * day);
    let (_, stderr) = text(&check(dir.path(), "gw.yaml"));
    assert!(!stderr.contains("warning"), "{stderr}");

    write(tls::unix_now() - 3600);
    let out = check(dir.path(), "gw.yaml");
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(
        stderr.contains("gateway.tls_cert: the certificate in cert.pem expired on"),
        "{stderr}"
    );
}

#[test]
fn risky_settings_are_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let c = tls::generate_self_signed(&["localhost"]).unwrap();
    std::fs::write(dir.path().join("cert.pem"), c.cert_pem).unwrap();
    std::fs::write(dir.path().join("key.pem"), c.key_pem).unwrap();
    let yaml = "proxy:\n  http: { listen_addr: ':18080' }\n  socks5: { listen_addr: '127.0.0.1:11080' }\ngateway:\n  listen_addr: ':18443'\n  tls_cert: cert.pem\n  tls_key: key.pem\n  auth_username: u\n  auth_password: p\n  deflate: { enabled: true }\n";
    let path = dir.path().join("risky.yaml");
    std::fs::write(&path, yaml).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let out = check(dir.path(), "risky.yaml");
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("proxy.http on 0.0.0.0:18080 has no credentials"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("proxy.socks5 on"),
        "loopback is fine: {stderr}"
    );
    assert!(stderr.contains("gateway.deflate is on"), "{stderr}");
    assert!(stderr.contains("plain-text passwords"), "{stderr}");
}

fn check_dir(dir: &Path) -> Output {
    std::process::Command::new(common::BIN)
        .args(["check", "--config-dir"])
        .arg(dir)
        .env_remove("RUST_LOG")
        .output()
        .expect("run anyproxy check --config-dir")
}

#[test]
fn a_pmproxy_config_dir_is_checked_read_only_and_errors_name_file_and_key() {
    let dir = common::policy_dir(9, "1 MB", 4443);
    let before: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    let out = check_dir(dir.path());
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("proxy on 127.0.0.1:"), "{stdout}");
    assert!(stdout.contains("policy API on 127.0.0.1:4443"), "{stdout}");
    assert!(
        stdout.contains("managers.toml: rules \"quota ∧ ¬blocked\""),
        "{stdout}"
    );
    assert!(stdout.contains("configuration ok"), "{stdout}");
    // What a start would create is named, and a check creates none of it.
    assert!(stderr.contains("api.httpsCert"), "{stderr}");
    assert!(stderr.contains("jwt.key is missing"), "{stderr}");
    let after: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(before.len(), after.len(), "a check created files");

    let managers = dir.path().join("managers.toml");
    let text_before = std::fs::read_to_string(&managers).unwrap();
    std::fs::write(
        &managers,
        text_before.replace("resetCycle = \"24h\"", "resetCycle = \"0s\""),
    )
    .unwrap();
    let out = check_dir(dir.path());
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success(), "{stdout}");
    assert!(stderr.contains("managers.toml"), "{stderr}");
    assert!(stderr.contains("resetCycle"), "{stderr}");
    std::fs::write(&managers, &text_before).unwrap();

    let server = dir.path().join("server.toml");
    let conf = std::fs::read_to_string(&server).unwrap();
    std::fs::write(&server, conf.replace("127.0.0.1:4443", "127.0.0.1:99999")).unwrap();
    let out = check_dir(dir.path());
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success(), "{stdout}");
    assert!(stderr.contains("api.server.addr"), "{stderr}");
}
