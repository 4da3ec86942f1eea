//! The engine end to end: `managers.toml` text in, decisions and command answers out.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use super::managers::time_span::at;
use super::*;

/// The manual's example file as printed, except that its `start` values
/// (`2006-01-02-T08:00:00-04:00`) are not valid TOML, so they are quoted here.
const MANUAL_EXAMPLE: &str = r#"
rule = "sessions ∧ ((day ∧ down) ∨ night)"

[[sessionIPM]]
	name = "sessions"
	auth = "ad"

[[dwnConsR]]
	name = "down"
	userDBN = "ad"
	resetCycle = "24h"
	[dwnConsR.groupQuota]
		group0 = "1 GB"

[adDB]
	name = "ad"
	addr = "ldap.org:636"
	suff = "@account.org"
	bdn = "dc=ldap,dc=org"
	user = "ad-user"
	pass = "secret"

[[timeSpan]]
	name = "day"
	[timeSpan.Span]
		start = "2006-01-02-T08:00:00-04:00"
		active = 	"12h"
		total = "24h"
		infinite = true

[[timeSpan]]
	name = "night"
	[timeSpan.Span]
		start = "2006-01-02-T20:00:00-04:00"
		active = "12h"
		total = "24h"
		infinite = true
"#;

const MAP_DB: &str = r#"
[mapDB]
	name = "ad"
	[mapDB.userPass]
		alice = "alice-pw"
		root = "root-pw"
	[mapDB.userGroups]
		alice = ["group0"]
		root = ["group0"]
"#;

fn opts(clock: Arc<ManualClock>) -> PolicyOptions {
    PolicyOptions {
        clock,
        ..PolicyOptions::default()
    }
}

fn clock(t: &str) -> Arc<ManualClock> {
    Arc::new(ManualClock::new(at(t)))
}

/// The manual's example with its adDB swapped for a mapDB of the same name.
fn manual_text() -> String {
    let start = MANUAL_EXAMPLE.find("[adDB]").unwrap();
    let end = MANUAL_EXAMPLE.find("[[timeSpan]]").unwrap();
    format!(
        "admins = [\"root\"]\n{}{MAP_DB}{}",
        &MANUAL_EXAMPLE[..start],
        &MANUAL_EXAMPLE[end..]
    )
}

fn manual_with_map_db(clock: Arc<ManualClock>) -> Policy {
    Policy::from_toml(&manual_text(), opts(clock)).unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn req<'a>(client: &str, host: &'a str, now: &str) -> Request<'a> {
    Request {
        client_ip: ip(client),
        user: None,
        host,
        port: 443,
        now: at(now),
    }
}

fn names(d: &Decision) -> Vec<(String, bool)> {
    d.consulted
        .iter()
        .map(|(n, v)| (n.to_string(), *v))
        .collect()
}

fn cmd(v: serde_json::Value) -> Cmd {
    serde_json::from_value(v).unwrap()
}

#[test]
fn manual_example_parses_and_its_ldap_builds() {
    let conf = ManagersConf::from_toml("managers.toml", MANUAL_EXAMPLE).unwrap();
    assert_eq!(
        conf.rules.as_deref(),
        Some("sessions ∧ ((day ∧ down) ∨ night)")
    );
    assert_eq!(conf.time_span.len(), 2);
    assert_eq!(conf.dwn_cons_r[0].group_quota["group0"].0, 1 << 30);
    // The adDB is the ldap authentication backend (nothing is dialed until a login).
    assert!(Policy::from_toml(MANUAL_EXAMPLE, PolicyOptions::default()).is_ok());
    let broken = MANUAL_EXAMPLE.replace("\tbdn = \"dc=ldap,dc=org\"\n", "");
    let e = Policy::from_toml(&broken, PolicyOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("[adDB]") && e.contains("bdn"), "{e}");
}

#[test]
fn manual_example_decides_by_session_time_and_quota() {
    let c = clock("2024-05-01T10:00:00-04:00");
    let p = manual_with_map_db(c.clone());
    // No session: denied, and nothing after `sessions` is consulted.
    let d = p.decide(&req("10.0.0.7", "example.com", "2024-05-01T10:00:00-04:00"));
    assert!(!d.allow);
    assert_eq!(names(&d), [("sessions".to_string(), false)]);

    let token = p
        .cmd(cmd(json!({"cmd": "open", "manager": "sessions", "remoteAddr": "10.0.0.7:5555", "cred": {"user": "alice", "pass": "alice-pw"}})))
        .unwrap();
    assert!(token.is_string());

    // Day: the quota is attached.
    let d = p.decide(&req("10.0.0.7", "example.com", "2024-05-01T10:00:00-04:00"));
    assert!(d.allow);
    assert_eq!(
        names(&d),
        [
            ("sessions".into(), true),
            ("day".into(), true),
            ("down".into(), true)
        ]
    );
    let q = d.quota.expect("day traffic counts against the quota");
    assert_eq!((q.user(), q.quota()), ("alice", 1 << 30));
    assert_eq!(d.user.as_deref(), Some("alice"));

    // Night: allowed without a quota (the timeSpan is evaluated inside the rule).
    let d = p.decide(&req("10.0.0.7", "example.com", "2024-05-01T22:00:00-04:00"));
    assert!(d.allow);
    assert_eq!(
        names(&d),
        [
            ("sessions".into(), true),
            ("day".into(), false),
            ("night".into(), true)
        ]
    );
    assert!(d.quota.is_none());

    // Quota used up: day traffic denied, night still fine.
    q.consume(1 << 30).unwrap();
    assert!(
        !p.decide(&req("10.0.0.7", "example.com", "2024-05-01T10:00:00-04:00"))
            .allow
    );
    assert!(
        p.decide(&req("10.0.0.7", "example.com", "2024-05-01T22:00:00-04:00"))
            .allow
    );
    // The next day the cycle has reset.
    assert!(
        p.decide(&req("10.0.0.7", "example.com", "2024-05-02T12:00:00-04:00"))
            .allow
    );
}

const SMALL: &str = r#"
rules = "lan ∧ ¬blocked ∧ (viaProxy ∨ wan)"
[[rangeIPM]]
name = "lan"
cidr = "192.168.0.0/16"
[[hostMatcher]]
name = "blocked"
pattern = '(^|\.)blocked\.test:\d+$'
[[parentProxy]]
name = "viaProxy"
proxyURL = "socks5://10.9.9.9:1080"
[[netIface]]
name = "wan"
iface = "eth1"
"#;

#[test]
fn host_range_and_egress() {
    let p = Policy::from_toml(SMALL, PolicyOptions::default()).unwrap();
    let d = p.decide(&req("192.168.1.2", "example.com", "2024-01-01T00:00:00Z"));
    assert!(d.allow);
    assert_eq!(
        names(&d),
        [
            ("lan".into(), true),
            ("blocked".into(), false),
            ("viaProxy".into(), true)
        ]
    );
    let proxy = d.egress.proxy.unwrap();
    assert_eq!(
        (proxy.scheme, proxy.host.as_str(), proxy.port),
        (ProxyScheme::Socks5, "10.9.9.9", 1080)
    );
    assert_eq!(d.egress.iface, None, "short-circuited: wan was not reached");
    let d = p.decide(&req(
        "192.168.1.2",
        "www.blocked.test",
        "2024-01-01T00:00:00Z",
    ));
    assert!(!d.allow);
    assert!(
        !p.decide(&req("10.0.0.1", "example.com", "2024-01-01T00:00:00Z"))
            .allow
    );
}

#[test]
fn unknown_names_deny_with_the_reduced_rule() {
    let text = SMALL.replace(
        "lan ∧ ¬blocked ∧ (viaProxy ∨ wan)",
        "lan ∧ (typo ∨ blocked)",
    );
    let p = Policy::from_toml(&text, PolicyOptions::default()).unwrap();
    let d = p.decide(&req("192.168.1.2", "example.com", "2024-01-01T00:00:00Z"));
    assert!(!d.allow);
    assert_eq!(d.reduced.as_deref(), Some("typo"));
    assert_eq!(names(&d), [("lan".into(), true), ("blocked".into(), false)]);
    let r = p
        .cmd(cmd(
            json!({"cmd": "discover", "remoteAddr": "192.168.1.2", "string": "example.com:443"}),
        ))
        .unwrap();
    assert_eq!(r["result"], "typo");
    assert_eq!(
        r["matchMng"]["lan"],
        json!({"match": true, "type": "rangeIPM"})
    );
}

#[test]
fn group_matcher_uses_the_front_end_user_or_the_session() {
    let text = format!("rules = \"staff\"\n[[groupIPM]]\nname = \"staff\"\ngroup = \"group0\"\nuserDBN = \"ad\"\n[[sessionIPM]]\nname = \"s\"\nauth = \"ad\"\n{MAP_DB}");
    let p = Policy::from_toml(&text, PolicyOptions::default()).unwrap();
    let mut r = req("10.0.0.1", "x", "2024-01-01T00:00:00Z");
    assert!(!p.decide(&r).allow);
    r.user = Some("alice");
    assert!(p.decide(&r).allow);
    r.user = Some("mallory");
    assert!(!p.decide(&r).allow);
}

#[test]
fn configuration_errors_name_the_place() {
    let cases = [
        ("rules = \"a ∧\"", "managers.toml: rules: at 4: expected an identifier, `true`, `false`, `¬` or `(`, found the end of the rule"),
        ("admins = []", "managers.toml: rules: missing (write rules = \"true\" to allow every request)"),
        ("rules = \"x\"\n[[rangeIPM]]\nname = \"x\"\ncidr = \"10.0.0.0/8\"\n[[netIface]]\nname = \"x\"\niface = \"eth0\"", "managers.toml: [[netIface]] \"x\": name: another manager has this name"),
        ("rules = \"x\"\n[[groupIPM]]\nname = \"x\"\ngroup = \"g\"\nuserDBN = \"nope\"", "managers.toml: [[groupIPM]] \"x\": userDBN: no [mapDB] or [adDB] named \"nope\""),
        ("rules = \"x\"\n[[rangeIPM]]\nname = \"x y\"\ncidr = \"10.0.0.0/8\"", "managers.toml: [[rangeIPM]] \"x y\": name: must be a rule identifier"),
        ("rules = \"x\"\njwtExpiration = \"0s\"", "managers.toml: jwtExpiration: must be longer than 0"),
    ];
    for (text, want) in cases {
        let e = Policy::from_toml(text, PolicyOptions::default())
            .err()
            .unwrap()
            .to_string();
        assert!(e.starts_with(want), "{text}\n got: {e}\nwant: {want}");
    }
    let e = Policy::from_toml(
        "rules = \"x\"\n[[rangeIPM]]\nname = \"x\"\ncidr = \"10.0.0.0/8\"\nmask = 1",
        PolicyOptions::default(),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        e.starts_with("managers.toml: TOML parse error") && e.contains("unknown field `mask`"),
        "{e}"
    );
    let text = format!("rules = \"d\"\n[[dwnConsR]]\nname = \"d\"\nuserDBN = \"ad\"\nresetCycle = \"0s\"\n{MAP_DB}");
    let e = Policy::from_toml(&text, PolicyOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert_eq!(
        e,
        "managers.toml: [[dwnConsR]] \"d\": resetCycle: must be longer than 0 (e.g. \"24h\")"
    );
}

#[test]
fn commands_sessions_and_admin_rights() {
    let c = clock("2024-05-01T10:00:00-04:00");
    let p = manual_with_map_db(c.clone());
    let open = |user: &str, pass: &str, addr: &str| {
        p.cmd(cmd(
            json!({"cmd": "open", "remoteAddr": addr, "cred": {"user": user, "pass": pass}}),
        ))
    };
    assert_eq!(
        open("alice", "nope", "10.0.0.7").unwrap_err(),
        CmdError::BadCredentials
    );
    let alice = open("alice", "alice-pw", "10.0.0.7").unwrap();
    let root = open("root", "root-pw", "10.0.0.8").unwrap();
    let alice_s = alice.as_str().unwrap();
    let root_s = root.as_str().unwrap();

    assert_eq!(
        p.cmd(cmd(json!({"cmd": "check", "secret": alice_s})))
            .unwrap(),
        serde_json::Value::Null
    );
    // `isAdmin` from the client is ignored.
    let e = p.cmd(cmd(json!({"cmd": "set", "secret": alice_s, "isAdmin": true, "string": "alice", "uint64": 0}))).unwrap_err();
    assert_eq!(e, CmdError::NotAdmin);
    assert_eq!(
        e.to_json(),
        json!({"error": "only administrators may do this", "code": "not_admin"})
    );
    p.cmd(cmd(
        json!({"cmd": "set", "secret": root_s, "string": "alice", "uint64": 512}),
    ))
    .unwrap();
    let info = p
        .cmd(cmd(
            json!({"cmd": "get", "manager": "down", "secret": alice_s}),
        ))
        .unwrap();
    assert_eq!(info["bytesCons"], 512);
    assert_eq!(info["bytesQuota"], 1u64 << 30);
    assert_eq!(info["quota"], "1.0 GiB");
    assert_eq!(info["groups"], json!(["group0"]));
    assert!(p
        .cmd(cmd(
            json!({"cmd": "getOther", "secret": alice_s, "string": "root"})
        ))
        .is_err());
    assert_eq!(
        p.cmd(cmd(
            json!({"cmd": "getOther", "secret": root_s, "string": "alice"})
        ))
        .unwrap()["bytesCons"],
        512
    );

    let show = p.cmd(cmd(json!({"cmd": "show"}))).unwrap();
    assert_eq!(show["groupQuota"]["group0"], "1.0 GiB");
    assert!(show.get("consumptions").is_none());
    let show = p
        .cmd(cmd(json!({"cmd": "show", "secret": root_s})))
        .unwrap();
    assert_eq!(show["consumptions"]["alice"], 512);

    // Sessions: a user sees their own, an admin sees all.
    let own = p
        .cmd(cmd(
            json!({"cmd": "get", "manager": "sessions", "secret": alice_s}),
        ))
        .unwrap();
    assert_eq!(own, json!({"10.0.0.7": "alice"}));
    let all = p
        .cmd(cmd(
            json!({"cmd": "get", "manager": "sessions", "secret": root_s}),
        ))
        .unwrap();
    assert_eq!(all.as_object().unwrap().len(), 2);

    // Renew replaces the token; close ends the session.
    let renewed = p
        .cmd(cmd(json!({"cmd": "renew", "secret": alice_s})))
        .unwrap();
    assert_eq!(
        p.cmd(cmd(json!({"cmd": "check", "secret": alice_s})))
            .unwrap_err(),
        CmdError::InvalidToken
    );
    c.advance(Duration::from_secs(25 * 3600));
    assert_eq!(
        p.cmd(cmd(json!({"cmd": "check", "secret": renewed})))
            .unwrap_err(),
        CmdError::TokenExpired
    );

    assert!(matches!(
        p.cmd(cmd(json!({"cmd": "get"}))).unwrap_err(),
        CmdError::ManagerNeeded { .. }
    ));
    assert!(matches!(
        p.cmd(cmd(json!({"cmd": "open", "manager": "day"})))
            .unwrap_err(),
        CmdError::WrongManager { .. }
    ));
    assert!(matches!(
        p.cmd(cmd(json!({"cmd": "fly"}))).unwrap_err(),
        CmdError::UnknownCommand(_)
    ));
    assert!(matches!(
        p.cmd(cmd(json!({"cmd": "discover", "remoteAddr": "nowhere"})))
            .unwrap_err(),
        CmdError::BadRemoteAddr(_)
    ));
}

#[test]
fn state_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let c = clock("2024-05-01T10:00:00-04:00");
    let text = manual_text();
    let mk = || {
        Policy::from_toml(
            &text,
            PolicyOptions {
                state_dir: Some(dir.path().to_path_buf()),
                clock: c.clone(),
                ..PolicyOptions::default()
            },
        )
        .unwrap()
    };
    let p = mk();
    let token = p.cmd(cmd(json!({"cmd": "open", "remoteAddr": "10.0.0.7", "cred": {"user": "alice", "pass": "alice-pw"}}))).unwrap();
    let d = p.decide(&req("10.0.0.7", "x", "2024-05-01T10:00:00-04:00"));
    d.quota.unwrap().consume(4096).unwrap();
    p.persist().unwrap();
    drop(p);

    let p = mk();
    let d = p.decide(&req("10.0.0.7", "x", "2024-05-01T10:00:00-04:00"));
    assert!(d.allow, "the session came back");
    assert_eq!(d.quota.unwrap().used(), 4096);
    assert_eq!(
        p.cmd(cmd(json!({"cmd": "check", "secret": token})))
            .unwrap(),
        serde_json::Value::Null
    );
}

#[tokio::test]
async fn persist_loop_writes_on_stop() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!("rules = \"down\"\n[[dwnConsR]]\nname = \"down\"\nuserDBN = \"ad\"\nresetCycle = \"1h\"\n[dwnConsR.groupQuota]\ngroup0 = \"1 MiB\"\n{MAP_DB}");
    let p = Arc::new(
        Policy::from_toml(
            &text,
            PolicyOptions {
                state_dir: Some(dir.path().to_path_buf()),
                ..PolicyOptions::default()
            },
        )
        .unwrap(),
    );
    let mut r = req("10.0.0.1", "x", "2024-01-01T00:00:00Z");
    r.now = std::time::SystemTime::now();
    r.user = Some("alice");
    p.decide(&r).quota.unwrap().consume(7).unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(
        p.clone()
            .run_persist_loop(Duration::from_secs(3600), stop.clone()),
    );
    stop.cancel();
    task.await.unwrap();
    let text = std::fs::read_to_string(dir.path().join("down.json")).unwrap();
    assert!(text.contains("\"alice\": 7"), "{text}");
}

/// A reload keeps a same-named quota's counters, so a connection decided before it
/// keeps counting into what the new rules read; a changed group quota applies to them.
#[test]
fn a_reload_keeps_live_quota_handles_and_applies_new_quotas() {
    let text = |quota: &str| {
        format!(
            r#"rules = "quota"
[mapDB]
name = "users"
userPass = {{ alice = "pw" }}
userGroups = {{ alice = ["staff"] }}
[[dwnConsR]]
name = "quota"
userDBN = "users"
resetCycle = "24h"
[dwnConsR.groupQuota]
staff = "{quota}"
"#
        )
    };
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("managers.toml");
    std::fs::write(&file, text("100 B")).unwrap();
    let p = Policy::load(&file, PolicyOptions::default()).unwrap();
    let alice = Request {
        client_ip: ip("10.0.0.1"),
        user: Some("alice"),
        host: "example.org",
        port: 443,
        now: p.now(),
    };
    let live = p.decide(&alice).quota.expect("allowed under the quota");
    live.consume(60).unwrap();

    std::fs::write(&file, text("200 B")).unwrap();
    assert_eq!(p.reload(&file).unwrap(), ["dwnConsR \"quota\" changed"]);
    // The handle from before the reload counts into the counter the new rules read.
    live.consume(60).unwrap();
    let after = p.decide(&alice);
    assert!(after.allow);
    let h = after.quota.unwrap();
    assert_eq!((h.used(), h.quota()), (120, 200));

    // A broken file changes nothing.
    std::fs::write(&file, text("200 B").replace("24h", "0s")).unwrap();
    let err = p.reload(&file).unwrap_err().to_string();
    assert!(err.contains("resetCycle"), "{err}");
    assert_eq!(p.decide(&alice).quota.unwrap().used(), 120);
    // The same file again: nothing to report.
    std::fs::write(&file, text("200 B")).unwrap();
    assert_eq!(p.reload(&file).unwrap(), Vec::<String>::new());
}
