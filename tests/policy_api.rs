//! The policy API over real HTTPS (curl with `--cacert`, loopback only), its static
//! files, a restart from the same config dir, and `anyproxy ctl` against it.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;

use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

use anyproxy::policy::{start_api, ApiHandle, Policy, PolicyDir};
use common::{curl, BIN};

const MANAGERS: &str = r#"
rules = "session ∧ quota"
admins = ["admin"]
jwtExpiration = "1h"
[mapDB]
name = "users"
userPass = { admin = "adminpw", alice = "alicepw" }
userGroups = { admin = ["staff"], alice = ["staff"] }
[[sessionIPM]]
name = "session"
auth = "users"
[[dwnConsR]]
name = "quota"
userDBN = "users"
resetCycle = "24h"
[dwnConsR.groupQuota]
staff = "1 GB"
"#;

struct Api {
    url: String,
    ca: String,
    stop: CancellationToken,
    handle: ApiHandle,
    policy: Arc<Policy>,
}

impl Api {
    async fn start(dir: &Path) -> (Api, PolicyDir) {
        let mut d = PolicyDir::open_or_init(dir).unwrap();
        d.server.api.server.addr = "127.0.0.1:0".into();
        d.server.api.excluded_routes = vec!["/about".into()];
        let policy = Arc::new(d.load_policy().unwrap());
        let stop = CancellationToken::new();
        let handle = start_api(&d, policy.clone(), stop.clone()).await.unwrap();
        let api = Api {
            url: format!("https://127.0.0.1:{}", handle.addr.port()),
            ca: d.cert_path().display().to_string(),
            stop,
            handle,
            policy,
        };
        (api, d)
    }

    /// Stops the server; the persist loop writes the state once more on the way out.
    async fn stop(self) {
        self.stop.cancel();
        self.handle.join().await;
        drop(self.policy);
    }

    /// Raw request with curl; returns (status, body).
    async fn raw(&self, from: &str, extra: &[&str], path: &str) -> (u16, Vec<u8>) {
        let url = format!("{}{path}", self.url);
        let mut args = vec![
            "--cacert",
            &self.ca,
            "--noproxy",
            "*",
            "--interface",
            from,
            "-w",
            "\n%{http_code}",
        ];
        args.extend_from_slice(extra);
        args.push(&url);
        let (code, out) = curl(&args).await;
        assert_eq!(code, 0, "curl {path} failed");
        let split = out.iter().rposition(|&b| b == b'\n').unwrap();
        let status = std::str::from_utf8(&out[split + 1..])
            .unwrap()
            .parse()
            .unwrap();
        (status, out[..split].to_vec())
    }

    /// POST /api/cmd from the loopback address `from`.
    async fn cmd(&self, from: &str, body: Value) -> (u16, Value) {
        self.post(from, &body.to_string()).await
    }

    async fn post(&self, from: &str, body: &str) -> (u16, Value) {
        let (status, out) = self
            .raw(
                from,
                &[
                    "-H",
                    "content-type: application/json",
                    "--data-binary",
                    body,
                ],
                "/api/cmd",
            )
            .await;
        let v = serde_json::from_slice(&out)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out)));
        (status, v)
    }

    async fn login(&self, from: &str, user: &str, pass: &str) -> String {
        let (s, v) = self
            .cmd(
                from,
                json!({"cmd": "open", "cred": {"user": user, "pass": pass}}),
            )
            .await;
        assert_eq!(s, 200, "{v}");
        let t = v.as_str().unwrap().to_string();
        assert!(t.starts_with("eyJ"), "a JWT: {t}");
        t
    }
}

const ALICE: &str = "127.0.0.2";
const ADMIN: &str = "127.0.0.3";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_admin_rights_files_and_a_restart_over_https() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pm");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("managers.toml"), MANAGERS).unwrap();
    let (api, d) = Api::start(&dir).await;
    assert!(d.first_run.is_none(), "an existing managers.toml is kept");
    let static_dir = d.static_dir().unwrap();
    std::fs::write(static_dir.join("app.js"), "console.log(1)").unwrap();
    std::fs::write(static_dir.join("logo.svg"), "<svg/>").unwrap();

    // Before login the rules deny this address; discover says which manager did.
    let (s, v) = api
        .cmd(ALICE, json!({"cmd": "discover", "manager": "rules"}))
        .await;
    assert_eq!(s, 200);
    assert_eq!(v["result"], "false");
    assert_eq!(
        v["matchMng"]["session"],
        json!({"match": false, "type": "sessionIPM"})
    );

    let (s, v) = api
        .cmd(
            ALICE,
            json!({"cmd": "open", "cred": {"user": "alice", "pass": "nope"}}),
        )
        .await;
    assert_eq!((s, v["code"].as_str()), (400, Some("bad_credentials")));
    let alice = api.login(ALICE, "alice", "alicepw").await;
    let (s, v) = api
        .cmd(ALICE, json!({"cmd": "check", "secret": alice}))
        .await;
    assert_eq!((s, v), (200, Value::Null));
    let (_, v) = api.cmd(ALICE, json!({"cmd": "discover"})).await;
    assert_eq!(v["result"], "true");

    // remoteAddr comes from the connection, never from the body.
    let (s, v) = api
        .cmd(
            ADMIN,
            json!({"cmd": "open", "remoteAddr": "10.9.9.9", "isAdmin": true,
                   "cred": {"user": "admin", "pass": "adminpw"}}),
        )
        .await;
    assert_eq!(s, 200);
    let admin = v.as_str().unwrap().to_string();
    let (_, v) = api
        .cmd(
            ADMIN,
            json!({"cmd": "get", "manager": "session", "secret": admin}),
        )
        .await;
    assert_eq!(v, json!({ALICE: "alice", ADMIN: "admin"}));

    // Admin-only commands: refused to alice with a JSON reason, done for the admin.
    for body in [
        json!({"cmd": "getOther", "secret": alice, "string": "admin"}),
        json!({"cmd": "set", "secret": alice, "isAdmin": true, "string": "alice", "uint64": 1}),
    ] {
        let (s, v) = api.cmd(ALICE, body).await;
        assert_eq!(s, 400);
        assert_eq!(v["code"], "not_admin");
        assert!(
            v["error"].as_str().unwrap().contains("administrators"),
            "{v}"
        );
    }
    let (s, _) = api
        .cmd(
            ADMIN,
            json!({"cmd": "set", "secret": admin, "string": "alice", "uint64": 12345}),
        )
        .await;
    assert_eq!(s, 200);
    let (s, v) = api
        .cmd(
            ADMIN,
            json!({"cmd": "getOther", "secret": admin, "string": "alice"}),
        )
        .await;
    assert_eq!((s, &v["bytesCons"]), (200, &json!(12345)));
    let (_, v) = api
        .cmd(
            ALICE,
            json!({"cmd": "get", "manager": "quota", "secret": alice}),
        )
        .await;
    assert_eq!(v["userName"], "alice");
    assert_eq!(v["bytesQuota"], json!(1u64 << 30));

    // Renew: the old token stops working, the new one works.
    let (s, v) = api
        .cmd(ALICE, json!({"cmd": "renew", "secret": alice}))
        .await;
    assert_eq!(s, 200);
    let renewed = v.as_str().unwrap().to_string();
    let (s, v) = api
        .cmd(ALICE, json!({"cmd": "check", "secret": alice}))
        .await;
    assert_eq!((s, v["code"].as_str()), (400, Some("invalid_token")));
    let (s, _) = api
        .cmd(ALICE, json!({"cmd": "check", "secret": renewed}))
        .await;
    assert_eq!(s, 200);

    // A token with a changed signature says so. The signature's bytes are changed, not
    // its text: flipping the last base64url character can touch only padding bits (an
    // `A` becoming `B`), which makes a malformed token rather than a bad signature.
    let forged = {
        use base64::engine::general_purpose::URL_SAFE_NO_PAD;
        use base64::Engine;
        let (signed, signature) = renewed.rsplit_once('.').expect("a JWT has three parts");
        let mut sig = URL_SAFE_NO_PAD
            .decode(signature)
            .expect("base64url signature");
        sig[0] ^= 0x01;
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(sig))
    };
    assert_ne!(forged, renewed);
    let (s, v) = api
        .cmd(ALICE, json!({"cmd": "check", "secret": forged}))
        .await;
    assert_eq!(s, 400);
    assert!(v["error"].as_str().unwrap().contains("signature"), "{v}");

    // Malformed requests.
    let (s, v) = api.post(ALICE, "{\"cmd\": ").await;
    assert_eq!((s, v["code"].as_str()), (400, Some("bad_json")));
    assert!(v["error"].as_str().unwrap().contains("line 1"), "{v}");
    let (s, v) = api.post(ALICE, "{\"cmd\": 5}").await;
    assert_eq!(s, 400);
    assert!(v["error"].as_str().unwrap().contains("invalid type"), "{v}");
    let big = format!("{{\"cmd\": \"{}\"}}", "x".repeat(70 * 1024));
    let (s, v) = api.post(ALICE, &big).await;
    assert_eq!((s, v["code"].as_str()), (413, Some("body_too_large")));
    let (s, _) = api.raw(ALICE, &[], "/api/cmd").await;
    assert_eq!(s, 405);
    let (s, _) = api.raw(ALICE, &["-X", "DELETE"], "/index.html").await;
    assert_eq!(s, 405);
    let (s, _) = api
        .raw(ALICE, &["-X", "POST", "-d", "{}"], "/api/other")
        .await;
    assert_eq!(s, 404);

    // Static files, SPA routes, and no way out of the static dir.
    // Replaces `raw`'s own `-w`: the content type, then the status line it expects.
    let ct = ["-o", "/dev/null", "-w", "%{content_type}\n%{http_code}"];
    for (path, want) in [
        ("/", "text/html"),
        ("/app.js", "text/javascript"),
        ("/logo.svg", "image/svg+xml"),
        ("/about", "text/html"),
        ("/about/team", "text/html"),
    ] {
        let (s, out) = api.raw(ALICE, &ct, path).await;
        assert_eq!(s, 200, "{path}");
        assert!(String::from_utf8_lossy(&out).starts_with(want), "{path}");
    }
    let (_, page) = api.raw(ALICE, &[], "/about").await;
    assert!(String::from_utf8_lossy(&page).contains("anyproxy policy API"));
    let (s, _) = api.raw(ALICE, &[], "/missing.css").await;
    assert_eq!(s, 404);
    for path in ["/../jwt.key", "/%2e%2e/jwt.key", "/a/..%2f..%2fserver.toml"] {
        let (s, out) = api.raw(ALICE, &["--path-as-is"], path).await;
        assert!(s == 400 || s == 404, "{path}: {s}");
        assert!(
            !String::from_utf8_lossy(&out).contains("api.server"),
            "{path}"
        );
    }

    // Logout: the token is refused afterwards although its signature is fine.
    let (s, _) = api
        .cmd(ADMIN, json!({"cmd": "close", "secret": admin}))
        .await;
    assert_eq!(s, 200);
    let (s, v) = api
        .cmd(ADMIN, json!({"cmd": "check", "secret": admin}))
        .await;
    assert_eq!((s, v["code"].as_str()), (400, Some("invalid_token")));

    // Restart: stop (persists), drop everything, start from the same dir.
    api.stop().await;
    drop(d);
    let (api, _d) = Api::start(&dir).await;
    let (s, v) = api
        .cmd(ALICE, json!({"cmd": "check", "secret": renewed}))
        .await;
    assert_eq!(
        (s, &v),
        (200, &Value::Null),
        "alice's session and token survive"
    );
    let (_, v) = api.cmd(ALICE, json!({"cmd": "discover"})).await;
    assert_eq!(v["result"], "true");
    let (s, v) = api
        .cmd(
            ALICE,
            json!({"cmd": "get", "manager": "quota", "secret": renewed}),
        )
        .await;
    assert_eq!(
        (s, &v["bytesCons"]),
        (200, &json!(12345)),
        "consumption is kept"
    );
    let (s, _) = api
        .cmd(ADMIN, json!({"cmd": "check", "secret": admin}))
        .await;
    assert_eq!(s, 400, "a closed session stays closed");

    // Guessing passwords from one address is cut off after five failures; the right
    // password is refused too while locked, and other addresses are unaffected.
    const GUESSER: &str = "127.0.0.4";
    for _ in 0..5 {
        let (s, v) = api
            .cmd(
                GUESSER,
                json!({"cmd": "open", "cred": {"user": "alice", "pass": "guess"}}),
            )
            .await;
        assert_eq!((s, v["code"].as_str()), (400, Some("bad_credentials")));
    }
    let (s, v) = api
        .cmd(
            GUESSER,
            json!({"cmd": "open", "cred": {"user": "alice", "pass": "alicepw"}}),
        )
        .await;
    assert_eq!((s, v["code"].as_str()), (429, Some("rate_limited")));
    api.login(ALICE, "alice", "alicepw").await;
    api.stop().await;
}

async fn ctl<S: AsRef<std::ffi::OsStr>>(args: &[S], stdin: &str) -> (bool, String, String) {
    let mut child = tokio::process::Command::new(BIN)
        .arg("ctl")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.as_bytes()).await.unwrap();
    drop(input);
    let out = tokio::time::timeout(std::time::Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("ctl took over a minute")
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_dir_works_and_ctl_logs_in_and_out() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("fresh");
    let (api, d) = Api::start(&dir).await;
    let first = d
        .first_run
        .clone()
        .expect("a fresh dir gets an administrator");
    let dir_s = dir.display().to_string();
    let base = [
        "--config-dir",
        &dir_s,
        "--api",
        &api.url,
        "--cacert",
        &api.ca,
    ];
    let with = |more: &[&'static str]| -> Vec<String> {
        base.iter().chain(more).map(|s| s.to_string()).collect()
    };

    let (ok, out, err) = ctl(&with(&["discover"]), "").await;
    assert!(ok, "{err}");
    assert!(out.contains("\"result\": \"false\""), "{out}");

    let (ok, _, err) = ctl(
        &with(&["login", "--user", "admin", "--password-stdin"]),
        "wrong\n",
    )
    .await;
    assert!(!ok);
    assert!(err.contains("wrong user or password"), "{err}");
    let password = format!("{}\n", first.admin_password);
    let (ok, out, err) = ctl(
        &with(&["login", "--user", "admin", "--password-stdin"]),
        &password,
    )
    .await;
    assert!(ok, "{err}");
    assert!(out.contains("logged in as \"admin\""), "{out}");
    let token_file = dir.join("ctl-token");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&token_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    let (ok, out, err) = ctl(&with(&["status"]), "").await;
    assert!(ok, "{err}");
    assert!(out.contains("session open"), "{out}");
    assert!(
        out.contains("user \"admin\": 0 B of 100.0 GiB used (groups: admins)"),
        "{out}"
    );

    let (ok, out, err) = ctl(&with(&["reset", "admin", "--bytes", "2048"]), "").await;
    assert!(ok, "{err}");
    assert!(out.contains("2048"), "{out}");
    let (ok, out, err) = ctl(&with(&["show"]), "").await;
    assert!(ok, "{err}");
    assert!(
        out.contains("\"admin\": 2048"),
        "consumptions for an admin: {out}"
    );
    let (_, out, _) = ctl(&with(&["discover"]), "").await;
    assert!(out.contains("\"result\": \"true\""), "{out}");

    let (ok, out, err) = ctl(&with(&["logout"]), "").await;
    assert!(ok, "{err}");
    assert!(out.contains("logged out"), "{out}");
    assert!(!token_file.exists());
    let (ok, _, err) = ctl(&with(&["status"]), "").await;
    assert!(!ok);
    assert!(err.contains("ctl login"), "{err}");

    // Without --cacert the self-signed certificate is not trusted.
    let (ok, _, err) = ctl(&["--config-dir", &dir_s, "--api", &api.url, "discover"], "").await;
    assert!(!ok);
    assert!(err.contains("TLS") || err.contains("certificate"), "{err}");
    api.stop().await;
}
