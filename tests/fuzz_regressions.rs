//! The fuzz targets' properties on stable: every committed input under `fuzz/seeds/`
//! and `fuzz/regressions/` (the crashes the fuzzers found, once fixed) goes through the
//! same `check` as in `fuzz/fuzz_targets/`, so a fixed crash cannot come back unseen.
//! The fuzzers themselves need nightly and cargo-fuzz (see fuzz/README.md); this does
//! not.

#[path = "../fuzz/checks/mod.rs"]
#[allow(dead_code)]
mod checks;

use std::path::{Path, PathBuf};

fn inputs(kind: &str, target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join(kind)
        .join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// Runs every input of `kind` through its target's check; fails naming every input
/// that does not hold (each one's panic message is printed above).
fn replay(kind: &str) -> usize {
    let mut count = 0;
    let mut failed = Vec::new();
    for (target, check) in checks::TARGETS {
        for file in inputs(kind, target) {
            let data = std::fs::read(&file).expect("readable input");
            if std::panic::catch_unwind(|| check(&data)).is_err() {
                failed.push(format!("{target}: {}", file.display()));
            }
            count += 1;
        }
    }
    assert!(failed.is_empty(), "failing inputs:\n{}", failed.join("\n"));
    count
}

#[test]
fn every_seed_holds_its_targets_properties() {
    let n = replay("seeds");
    // Each target has seeds; an empty replay would be a broken path, not a pass.
    assert!(n >= checks::TARGETS.len(), "only {n} seeds found");
    for (target, _) in checks::TARGETS {
        assert!(!inputs("seeds", target).is_empty(), "no seeds for {target}");
    }
}

#[test]
fn every_fixed_crash_stays_fixed() {
    replay("regressions");
}
