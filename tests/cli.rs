//! The command line as users meet it: shell completions that the shell parses, a man
//! page that renders, `--version` naming the commit and features, an example in every
//! subcommand's `--help`, and `anyproxy demo` whose printed commands and admin URLs
//! work as printed.

mod common;

use std::process::Command;

use common::BIN;

fn run(args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).output().expect("run anyproxy");
    assert!(
        out.status.success(),
        "anyproxy {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

#[test]
fn bash_parses_the_completions_and_completes_subcommands() {
    let script = run(&["completions", "bash"]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("anyproxy.bash");
    std::fs::write(&path, &script).unwrap();
    let status = Command::new("bash").arg("-n").arg(&path).status().unwrap();
    assert!(status.success(), "bash -n refused the completion script");
    // Loaded for real: the completion function offers the subcommands.
    let probe = format!(
        ". {}; COMP_WORDS=(anyproxy ex); COMP_CWORD=1; _anyproxy anyproxy ex anyproxy; echo \"${{COMPREPLY[@]}}\"",
        path.display()
    );
    let out = Command::new("bash").args(["-c", &probe]).output().unwrap();
    let offered = String::from_utf8_lossy(&out.stdout);
    assert!(
        offered.split_whitespace().any(|w| w == "export"),
        "{offered:?}"
    );
    for shell in ["zsh", "fish"] {
        let text = run(&["completions", shell]);
        assert!(
            text.contains("anyproxy") && text.contains("export"),
            "{shell}: {text}"
        );
    }
}

#[test]
fn man_page_is_roff_that_renders() {
    let page = run(&["man"]);
    assert!(page.contains(".TH anyproxy 1"), "{page}");
    for section in [".SH NAME", ".SH SYNOPSIS", ".SH SUBCOMMANDS"] {
        assert!(page.contains(section), "no {section}");
    }
    let dir = tempfile::tempdir().unwrap();
    run(&["man", "--dir", dir.path().to_str().unwrap()]);
    for name in [
        "anyproxy.1",
        "anyproxy-gateway.1",
        "anyproxy-export.1",
        "anyproxy-ctl-login.1",
    ] {
        let text = std::fs::read_to_string(dir.path().join(name)).unwrap_or_default();
        assert!(
            text.starts_with(".ie") || text.contains(".TH"),
            "{name}: {text:?}"
        );
    }
    // groff renders it as man does, without warnings.
    if Command::new("groff").arg("--version").output().is_ok() {
        let out = Command::new("groff")
            .args(["-man", "-Tutf8", "-ww", "-z"])
            .arg(dir.path().join("anyproxy-export.1"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.stderr.is_empty(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn version_names_the_commit_and_the_features() {
    let version = run(&["--version"]);
    assert!(
        version.starts_with(&format!("anyproxy {}", env!("CARGO_PKG_VERSION"))),
        "{version}"
    );
    assert!(
        version.contains("(commit ") && version.contains("features: "),
        "{version}"
    );
    // In a git checkout the commit is the checked-out one.
    let head = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output();
    if let Some(head) = head.ok().filter(|o| o.status.success()) {
        let head = String::from_utf8_lossy(&head.stdout).trim().to_owned();
        assert!(
            version.contains(&format!("commit {head}")),
            "{version} vs HEAD {head}"
        );
    }
}

/// The subcommands listed in a `--help` text's "Commands:" section.
fn subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_subcommands_help_has_an_example() {
    let mut todo: Vec<Vec<String>> = vec![vec![]];
    let mut seen = 0;
    while let Some(path) = todo.pop() {
        let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
        args.push("--help");
        let help = run(&args);
        assert!(
            help.contains("Example"),
            "`anyproxy {}` has no example:\n{help}",
            args.join(" ")
        );
        for sub in subcommands(&help) {
            let mut next = path.clone();
            next.push(sub);
            todo.push(next);
        }
        seen += 1;
    }
    // anyproxy, its subcommands and ctl's.
    assert!(seen >= 17, "only {seen} help texts found");
}

/// `anyproxy demo` as a newcomer meets it: every command it prints works as printed,
/// the status page and /metrics included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_prints_commands_and_admin_urls_that_work_as_printed() {
    use std::time::{Duration, Instant};
    use tokio::io::{AsyncBufReadExt, BufReader};

    let dir = tempfile::tempdir().unwrap();
    let ports: Vec<String> = (0..4).map(|_| common::free_port().to_string()).collect();
    let mut demo = tokio::process::Command::new(BIN)
        .args(["demo", "--dir", dir.path().to_str().unwrap()])
        .args(["--gateway-port", &ports[0], "--http-port", &ports[1]])
        .args(["--socks-port", &ports[2], "--admin-port", &ports[3]])
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn anyproxy demo");
    let mut lines = BufReader::new(demo.stdout.take().unwrap()).lines();
    let mut printed = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !printed
        .iter()
        .any(|l: &String| l.contains("Ctrl-C stops everything"))
    {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, lines.next_line()).await {
            Ok(Ok(Some(line))) => printed.push(line),
            other => panic!(
                "the demo stopped printing ({other:?}):\n{}",
                printed.join("\n")
            ),
        }
    }
    let text = printed.join("\n");
    assert!(
        text.contains("The status page operators use: http://127.0.0.1:"),
        "{text}"
    );
    let commands: Vec<&str> = printed
        .iter()
        .map(|l| l.trim())
        .filter(|l| l.starts_with("curl "))
        .collect();
    assert_eq!(commands.len(), 6, "{text}");
    for cmd in commands {
        let out = tokio::process::Command::new("bash")
            .args(["-c", &format!("{cmd} -sS --fail --max-time 20")])
            .output()
            .await
            .unwrap();
        let body = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let want = if cmd.contains("/api/status") {
            "\"ready\":true"
        } else if cmd.contains("/metrics") {
            "anyproxy_gateway_agents"
        } else if cmd.contains("/profiles/env") {
            "export ALL_PROXY=socks5h://user:"
        } else {
            "hello from behind the anyproxy agent"
        };
        assert!(body.contains(want), "{cmd}: {body}");
    }
    let pid = demo.id().expect("demo running");
    common::signal(pid, "TERM");
    let status = tokio::time::timeout(Duration::from_secs(30), demo.wait())
        .await
        .expect("the demo stops on SIGTERM")
        .unwrap();
    assert!(status.success(), "{status:?}");
}
