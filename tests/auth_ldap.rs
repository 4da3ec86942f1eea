//! The `ldap` authentication backend against a real OpenLDAP `slapd` (Debian's
//! package), started here with its own config and mdb database on a loopback port,
//! seeded by `slapadd` with users and groups: directory users through the HTTP proxy
//! and SOCKS5, a wrong password refused, the directory group mapped to `office`
//! carried by office's agent (through a group search, and through `memberOf` kept by
//! the `memberof` overlay), an agent joining with directory credentials, and slapd
//! stopped: 503 naming the backend and `up 0` on /metrics, then recovery when it
//! returns.

mod common;

use common::slapd::{Slapd, SlapdOptions, BASE};
use common::*;

/// A stack whose listeners and agents ask `static`, then the directory backend `corp`
/// (search-then-bind as the service account, uncached; `groups`: where its groups come
/// from), whose directory group `staff` maps to the tunnel group `office`. The stack's
/// own agent (default group) may not reach loopback: a directory user outside the
/// mapped group lands there and gets 403. Office's agent joins with directory
/// credentials (office-agent is in staff), and alice reaches a loopback target through
/// it.
struct Directory {
    stack: Stack,
    _office: Proc,
    target: std::net::SocketAddr,
    url: String,
}

async fn directory_stack(slapd: &Slapd, groups: &str, admin: u16) -> Directory {
    let backend = format!(
        "auth_backends:\n    corp:\n      type: ldap\n      url: \"{url}\"\n      base_dn: \"ou=people,{BASE}\"\n      bind_dn: \"cn=admin,{BASE}\"\n      bind_password: admin-pw\n      {groups}\n      group_map: {{ staff: office }}\n      timeout: 2s\n      cache_ttl: 0s",
        url = slapd.url()
    );
    let stack = Stack::start(StackOptions {
        forbidden_hosts: vec!["127.0.0.0/8".into(), "localhost".into()],
        gateway_extra: vec![
            "groups:\n    - { id: office, agent_password: office-secret }".into(),
            backend,
            "agent_auth: [static, corp]".into(),
            format!("admin_addr: \"127.0.0.1:{admin}\""),
        ],
        listener_extra: vec!["auth: [static, corp]".into()],
        ..Default::default()
    })
    .await;
    let office = stack.spawn_group_agent("office-1", "office-agent", "agent-dir-pw", "");
    stack.wait_for_log("gateway", "group=office", 1).await;
    let target = http_target().await;
    let url = format!("http://127.0.0.1:{}/", target.port());
    let (code, body) = curl(&["-x", &stack.http_proxy_as("alice", "alice-pw"), &url]).await;
    assert_eq!((code, body.as_slice()), (0, &b"hello"[..]));
    Directory {
        stack,
        _office: office,
        target,
        url,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directory_users_and_groups_through_a_real_slapd() {
    let mut slapd = Slapd::start().await;
    let admin = free_port();
    // staff → office: carried by office's agent, through HTTP (in directory_stack) and
    // SOCKS5.
    let Directory {
        stack,
        _office,
        target,
        url,
    } = directory_stack(
        &slapd,
        &format!("group_base_dn: \"ou=groups,{BASE}\""),
        admin,
    )
    .await;
    stack
        .socks5_as("bob", "bob-pw", target)
        .await
        .expect("bob through SOCKS5");
    // One check per connection: three requests on one keep-alive connection (curl
    // reuses it) ask the directory once, although nothing is cached.
    let corp = [("backend", "corp"), ("type", "ldap")];
    let checks = || async {
        let metrics = admin_get(admin, "/metrics", None).await.1;
        metric(&metrics, "anyproxy_auth_backend_checks_total", &corp)
    };
    let before = checks().await;
    let (code, body) = curl(&[
        "-x",
        &stack.http_proxy_as("alice", "alice-pw"),
        &url,
        &url,
        &url,
    ])
    .await;
    assert_eq!((code, body.as_slice()), (0, &b"hellohellohello"[..]));
    assert_eq!(checks().await, before + 1.0);
    // carol is in an unmapped group: the default group, whose agent refuses loopback.
    assert_eq!(
        curl_status(&["-x", &stack.http_proxy_as("carol", "carol-pw"), &url]).await,
        "403"
    );
    // Wrong password, unknown user, empty password (an anonymous bind): refused.
    for (user, pass) in [("alice", "bob-pw"), ("mallory", "x"), ("alice", "")] {
        let status = curl_status(&["-x", &stack.http_proxy_as(user, pass), &url]).await;
        assert_eq!(status, "407", "{user}:{pass}");
    }
    assert!(matches!(
        stack.socks5_as("bob", "wrong", target).await,
        Err(Socks5Refusal::Auth(1))
    ));

    // slapd down: 503 naming the backend, and the metric says so.
    slapd.stop().await;
    let (status, body) =
        curl_status_body(&["-x", &stack.http_proxy_as("alice", "alice-pw"), &url]).await;
    assert_eq!(status, "503", "{body}");
    assert!(body.contains("\"corp\" unavailable"), "{body}");
    let metrics = admin_get(admin, "/metrics", None).await.1;
    assert_eq!(metric(&metrics, "anyproxy_auth_backend_up", &corp), 0.0);
    assert!(metric(&metrics, "anyproxy_auth_backend_errors_total", &corp) >= 1.0);

    // ... and back.
    slapd.restart().await;
    stack
        .until_http_status("alice", "alice-pw", &url, "200")
        .await;
    let metrics = admin_get(admin, "/metrics", None).await.1;
    assert_eq!(metric(&metrics, "anyproxy_auth_backend_up", &corp), 1.0);
    let log = stack.log("gateway");
    assert!(
        !log.contains("alice-pw") && !log.contains("admin-pw"),
        "a password reached the log"
    );
}

/// `group_attribute: memberOf` without a group search, against a directory whose
/// `memberof` overlay keeps the people's `memberOf` (the groups are added to the
/// running slapd): `staff` maps to `office`, so office's agent, itself joining with
/// directory credentials, carries alice; carol's `contractors` is unmapped. A direct
/// bind reads `memberOf` as the user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_of_kept_by_the_overlay_decides_the_tunnel_group() {
    use anyproxy::auth::{Attempt, Authenticator, Kind, Verdict};

    let slapd = Slapd::start_with(SlapdOptions {
        memberof: true,
        ..Default::default()
    })
    .await;
    let Directory {
        stack,
        _office,
        url,
        ..
    } = directory_stack(&slapd, "group_attribute: memberOf", free_port()).await;
    assert_eq!(
        curl_status(&["-x", &stack.http_proxy_as("carol", "carol-pw"), &url]).await,
        "403"
    );

    let config: anyproxy::auth::config::LdapConfig = yaml_serde::from_str(&format!(
        "{{url: \"{url}\", user_dn: \"uid={{user}},ou=people,{BASE}\", group_attribute: memberOf, group_map: {{ staff: office }}}}",
        url = slapd.url()
    ))
    .unwrap();
    let direct = anyproxy::auth::ldap::LdapBackend::new("corp", config, None);
    let attempt = Attempt {
        kind: Kind::Proxy,
        username: "bob",
        password: "bob-pw",
        client_ip: None,
        client_id: None,
        listener: "http",
    };
    match direct.check(&attempt).await {
        Ok(Verdict::Allow { groups }) => assert_eq!(groups, [std::sync::Arc::from("office")]),
        other => panic!("bob by direct bind: {other:?}"),
    }
}

/// PMProxy's `[adDB]` is the same backend: `open` logs a directory user in (found by
/// `uid` under `bdn` by the service account, then bound as), and `groupIPM` sees the
/// user's directory group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pmproxy_open_with_an_ad_db_user_and_group_ipm_sees_the_directory_group() {
    use anyproxy::policy::{Cmd, Policy, PolicyOptions, Request};
    use std::sync::Arc;

    let slapd = Slapd::start().await;
    let text = format!(
        "rule = \"sessions ∧ staff\"\n\n[adDB]\n\tname = \"ad\"\n\taddr = \"127.0.0.1:{port}\"\n\tsuff = \"@example.org\"\n\tbdn = \"{BASE}\"\n\tuser = \"cn=admin,{BASE}\"\n\tpass = \"admin-pw\"\n\n[[sessionIPM]]\n\tname = \"sessions\"\n\tauth = \"ad\"\n\n[[groupIPM]]\n\tname = \"staff\"\n\tgroup = \"staff\"\n\tuserDBN = \"ad\"\n",
        port = slapd.port
    );
    let policy = Arc::new(Policy::from_toml(&text, PolicyOptions::default()).unwrap());
    let open = |user: &str, pass: &str, ip: &str| -> Cmd {
        serde_json::from_value(serde_json::json!({
            "cmd": "open", "manager": "sessions", "remoteAddr": format!("{ip}:5555"),
            "cred": {"user": user, "pass": pass}
        }))
        .unwrap()
    };
    let decide = |ip: &str| {
        policy
            .decide(&Request {
                client_ip: ip.parse().unwrap(),
                user: None,
                host: "example.com",
                port: 80,
                now: std::time::SystemTime::now(),
            })
            .allow
    };
    assert!(policy
        .cmd_async(open("alice", "wrong", "10.0.0.7"))
        .await
        .is_err());
    assert!(!decide("10.0.0.7"));
    let token = policy
        .cmd_async(open("alice", "alice-pw", "10.0.0.7"))
        .await
        .expect("alice logs in with her directory password");
    assert!(token.as_str().is_some_and(|t| !t.is_empty()));
    assert!(
        decide("10.0.0.7"),
        "alice is in the directory's staff group"
    );
    // carol logs in too, but her group is not staff.
    policy
        .cmd_async(open("carol", "carol-pw", "10.0.0.8"))
        .await
        .expect("carol logs in");
    assert!(!decide("10.0.0.8"));
}

/// `ldaps://` and StartTLS, verified against the CA given (the test's self-signed
/// certificate) or pinned by its fingerprint; without either (the public web roots), or
/// with another fingerprint, the directory is unavailable, not trusted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ldaps_and_starttls_verify_the_directory_certificate() {
    use anyproxy::auth::{Attempt, Authenticator, Kind, Verdict};

    let certs = certs();
    let slapd = Slapd::start_with(SlapdOptions {
        tls: Some((&certs.cert, &certs.key)),
        ..Default::default()
    })
    .await;
    let tls_port = slapd.tls_port.unwrap();
    let der = anyproxy::transport::tls::load_certs(&certs.cert).unwrap();
    let pin = anyproxy::transport::tls::fingerprint_hex(der[0].as_ref());
    let wrong_pin = format!("sha256:{}", "00".repeat(32));
    // `trust`: the YAML that says how the directory's certificate is trusted.
    let backend = |url: String, starttls: bool, trust: String| {
        let config: anyproxy::auth::config::LdapConfig = yaml_serde::from_str(&format!(
            "{{url: \"{url}\", starttls: {starttls}, user_dn: \"uid={{user}},ou=people,{BASE}\", group_base_dn: \"ou=groups,{BASE}\", timeout: 3s{trust}}}"
        ))
        .unwrap();
        let tls = anyproxy::transport::tls::client_config_without_alpn(
            config.ca.as_deref(),
            config.fingerprint.map(|f| f.0),
        )
        .unwrap();
        anyproxy::auth::ldap::LdapBackend::new("corp", config, Some(tls))
    };
    let by_ca = format!(", ca: \"{}\"", certs.cert.display());
    let by_pin = format!(", fingerprint: \"{pin}\"");
    let attempt = |password: &'static str| Attempt {
        kind: Kind::Proxy,
        username: "alice",
        password,
        client_ip: None,
        client_id: None,
        listener: "http",
    };
    let ldaps = format!("ldaps://127.0.0.1:{tls_port}");
    let plain = format!("ldap://127.0.0.1:{}", slapd.port);
    for (url, starttls) in [(ldaps.clone(), false), (plain.clone(), true)] {
        for trust in [&by_ca, &by_pin] {
            let b = backend(url.clone(), starttls, trust.clone());
            match b.check(&attempt("alice-pw")).await {
                Ok(Verdict::Allow { groups }) => {
                    assert!(groups.iter().any(|g| &**g == "staff"), "{url}: {groups:?}")
                }
                other => panic!("{url} starttls={starttls} {trust}: {other:?}"),
            }
            assert!(matches!(
                b.check(&attempt("wrong")).await,
                Ok(Verdict::Deny { .. })
            ));
        }
        for trust in [String::new(), format!(", fingerprint: \"{wrong_pin}\"")] {
            let untrusted = backend(url.clone(), starttls, trust.clone());
            let e = untrusted.check(&attempt("alice-pw")).await.unwrap_err();
            assert_eq!(&*e.backend, "corp", "{url} {trust}: {e}");
        }
    }
}
