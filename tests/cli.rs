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
