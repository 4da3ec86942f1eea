//! The shipped monitoring cannot rot: every metric name in the Grafana dashboard's and
//! the Prometheus rules' expressions exists in a real `/metrics` scrape of a running
//! gateway (with an agent, a policy and a cluster store, so that every family is on),
//! and the rules have what Prometheus requires of an alerting rule.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::redis::Redis;
use common::*;

/// Every family and sample name of an OpenMetrics text: samples as written, and for
/// each `# TYPE`, the names its samples take (`_total`, `_bucket`, `_sum`, `_count`).
fn exported_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                _ => &[""],
            };
            names.extend(suffixes.iter().map(|s| format!("{name}{s}")));
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_owned());
        }
    }
    names
}

/// The metric names an expression uses (all of ours are `anyproxy_*` or `process_*`).
fn used_names(expr: &str, into: &mut BTreeSet<String>) {
    let re = regex::Regex::new(r"\b((?:anyproxy|process)_[a-z0-9_]+)\b").unwrap();
    into.extend(re.captures_iter(expr).map(|c| c[1].to_owned()));
}

/// Every string under a key named `expr` or `query` (panel targets, template variables).
fn dashboard_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr" | "query" | "definition", serde_json::Value::String(s)) => {
                        out.push(s.clone())
                    }
                    _ => dashboard_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| dashboard_exprs(v, out)),
        _ => {}
    }
}

fn contrib(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("contrib")
        .join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_alert_rules_use_only_exported_metrics() {
    let redis = Redis::start().await;
    let policy = tempfile::tempdir().unwrap();
    let server = anyproxy::policy::server_config::DEFAULT_SERVER_TOML
        .replace("127.0.0.1:4443", &format!("127.0.0.1:{}", free_port()))
        .replace("127.0.0.1:8080", &format!("127.0.0.1:{}", free_port()));
    std::fs::write(policy.path().join("server.toml"), server).unwrap();
    let (gw_admin, agent_admin) = (free_port(), free_port());
    let stack = Stack::start(StackOptions {
        gateway_extra: vec![
            format!("admin_addr: \"127.0.0.1:{gw_admin}\""),
            format!("policy: {{ dir: \"{}\" }}", policy.path().display()),
            format!(
                "cluster: {{ redis: \"{}\", node_id: \"mon\" }}",
                redis.url()
            ),
        ],
        client_extra: vec![format!("admin_addr: \"127.0.0.1:{agent_admin}\"")],
        ..Default::default()
    })
    .await;
    wait_for_port(gw_admin).await;
    wait_for_port(agent_admin).await;
    let mut exported = BTreeSet::new();
    for port in [gw_admin, agent_admin] {
        let (status, text) = admin_get(port, "/metrics", None).await;
        assert_eq!(status, "200", "{text}");
        exported.extend(exported_names(&text));
    }
    for must in [
        "anyproxy_cluster_store_up",
        "anyproxy_policy_quota_used_bytes",
    ] {
        assert!(
            exported.contains(must),
            "the scrape lacks {must}: {exported:?}"
        );
    }

    let dashboard: serde_json::Value =
        serde_json::from_str(&contrib("grafana/anyproxy.json")).expect("the dashboard is JSON");
    assert!(dashboard["panels"].as_array().is_some_and(|p| p.len() > 10));
    let mut exprs = Vec::new();
    dashboard_exprs(&dashboard, &mut exprs);

    let rules: yaml_serde::Value =
        yaml_serde::from_str(&contrib("prometheus/alerts.yml")).expect("the rules are YAML");
    let mut alerts = BTreeSet::new();
    for group in rules["groups"].as_sequence().expect("groups: a list") {
        assert!(group["name"].as_str().is_some());
        for rule in group["rules"].as_sequence().expect("rules: a list") {
            let name = rule["alert"].as_str().expect("every rule alerts");
            assert!(alerts.insert(name.to_owned()), "{name} twice");
            assert!(
                ["warning", "critical"]
                    .contains(&rule["labels"]["severity"].as_str().unwrap_or("")),
                "{name}: severity"
            );
            assert!(
                rule["annotations"]["summary"].as_str().is_some(),
                "{name}: summary"
            );
            exprs.push(rule["expr"].as_str().expect("an expr").to_owned());
        }
    }
    assert_eq!(alerts.len(), 6, "{alerts:?}");

    let mut used = BTreeSet::new();
    for e in &exprs {
        used_names(e, &mut used);
    }
    assert!(used.len() > 20, "{used:?}");
    let missing: Vec<_> = used.difference(&exported).collect();
    assert!(missing.is_empty(), "used but not exported: {missing:?}");
    drop(stack);
}
