//! The parts of `src/` import each other in one direction only: the order written in
//! `src/lib.rs` (and ARCHITECTURE.md). This test reads every `crate::<part>` path in
//! `src/` and fails on one that points at a part higher than its own, so the layering
//! stays true without anyone policing it.

use std::collections::BTreeSet;
use std::path::Path;

/// Lowest first; a part may use only parts before it.
const ORDER: &[&str] = &[
    "net",
    "auth",
    "config",
    "cluster",
    "transport",
    "tunnel",
    "connect",
    "dial",
    "limits",
    "policy",
    "metrics",
    "proxy",
    "agent",
    "gateway",
    "cli",
];

fn rank(part: &str) -> Option<usize> {
    ORDER.iter().position(|p| *p == part)
}

/// The part a file belongs to: its first folder under `src/`, or its file stem
/// (`main.rs` is the binary, with `cli`).
fn part_of(rel: &Path) -> String {
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    match first.strip_suffix(".rs") {
        Some("main") => "cli".to_owned(),
        Some(stem) => stem.to_owned(),
        None => first.into_owned(),
    }
}

/// Removes `//` comments (doc comments included) so that prose naming a part does
/// not count as an import.
fn code_only(text: &str) -> String {
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every part named as `crate::<part>` or `anyproxy::<part>`, and every part named
/// inside `use crate::{a::.., b, ..}`.
fn referenced_parts(code: &str) -> BTreeSet<String> {
    let mut parts = BTreeSet::new();
    for prefix in ["crate::", "anyproxy::"] {
        for (i, _) in code.match_indices(prefix) {
            let rest = &code[i + prefix.len()..];
            if let Some(group) = rest.strip_prefix('{') {
                let end = group.find('}').unwrap_or(group.len());
                for item in group[..end].split(',') {
                    let name: String = item
                        .trim()
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    if !name.is_empty() {
                        parts.insert(name);
                    }
                }
            } else {
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                parts.insert(name);
            }
        }
    }
    parts
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_part_imports_only_the_parts_below_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    assert!(files.len() > 50, "found only {} files in src/", files.len());
    let mut violations = Vec::new();
    let mut unknown = BTreeSet::new();
    for file in &files {
        let rel = file.strip_prefix(&src).unwrap();
        let part = part_of(rel);
        if part == "lib" {
            continue;
        }
        let Some(own) = rank(&part) else {
            unknown.insert(part);
            continue;
        };
        let code = code_only(&std::fs::read_to_string(file).unwrap());
        for used in referenced_parts(&code) {
            if used == part || used == "self" || used == "super" {
                continue;
            }
            match rank(&used) {
                Some(r) if r < own => {}
                // Not a part: a macro, an item at the crate root (none today).
                None if !src.join(&used).is_dir() && !src.join(format!("{used}.rs")).exists() => {}
                _ => violations.push(format!("{} ({part}) uses crate::{used}", rel.display())),
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "parts missing from ORDER (add them where they belong): {unknown:?}"
    );
    assert!(
        violations.is_empty(),
        "imports against the layer order {ORDER:?}:\n{}",
        violations.join("\n")
    );
}

#[test]
fn the_order_here_is_the_order_in_lib_rs() {
    let lib =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs")).unwrap();
    let declared: Vec<&str> = lib
        .lines()
        // The parts are files (`pub mod x;`); an inline module (`fuzzing`) is none.
        .filter_map(|l| l.strip_prefix("pub mod ")?.strip_suffix(';'))
        .collect();
    let expected: Vec<&str> = ORDER.iter().copied().filter(|p| *p != "cli").collect();
    assert_eq!(declared, expected);
}

#[test]
fn the_scanner_sees_grouped_and_nested_paths() {
    let parts = referenced_parts(
        "use crate::{net::HostPort, tunnel};\nlet x = crate::dial::dial(); // crate::gateway",
    );
    let code = code_only("let x = 1; // crate::gateway\n");
    assert!(referenced_parts(&code).is_empty());
    assert!(parts.contains("net") && parts.contains("tunnel") && parts.contains("dial"));
}
