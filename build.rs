//! Build metadata for `anyproxy --version`: the git commit and the enabled cargo
//! features. A build without git or without a repository (`cargo install` from a
//! crates.io tarball) says `commit unknown` instead of failing.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    (out.status.success() && !text.trim().is_empty()).then(|| text.trim().to_owned())
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=ANYPROXY_COMMIT");
    // Rebuilt when HEAD moves (a checkout) or the branch it names gets a commit; in a
    // worktree, --git-path finds both files where git keeps them.
    for path in ["HEAD", "packed-refs"] {
        if let Some(p) = git(&["rev-parse", "--git-path", path]) {
            println!("cargo:rerun-if-changed={p}");
        }
    }
    if let Some(reference) = git(&["symbolic-ref", "-q", "HEAD"]) {
        if let Some(p) = git(&["rev-parse", "--git-path", &reference]) {
            println!("cargo:rerun-if-changed={p}");
        }
    }
    // ANYPROXY_COMMIT lets a packager without the repository name the commit.
    let commit = std::env::var("ANYPROXY_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| {
            let hash = git(&["rev-parse", "--short=12", "HEAD"])?;
            Some(match git(&["log", "-1", "--format=%cs", "HEAD"]) {
                Some(date) => format!("{hash}, {date}"),
                None => hash,
            })
        })
        .unwrap_or_else(|| "unknown".to_owned());
    let mut features: Vec<String> = std::env::vars()
        .filter_map(|(k, _)| {
            k.strip_prefix("CARGO_FEATURE_")
                .map(|f| f.to_lowercase().replace('_', "-"))
        })
        .collect();
    features.sort();
    let features = if features.is_empty() {
        "none".to_owned()
    } else {
        features.join(", ")
    };
    let target = std::env::var("TARGET").unwrap_or_default();
    println!(
        "cargo:rustc-env=ANYPROXY_LONG_VERSION={} (commit {commit}; features: {features}; {target})",
        env!("CARGO_PKG_VERSION")
    );
}
