use std::time::{Duration, SystemTime};

use super::*;
use crate::policy::config::MapDbConf;

const GIB: u64 = 1 << 30;

fn db() -> Arc<UserDb> {
    let c: MapDbConf = toml::from_str(
        "name = \"db\"\n[userGroups]\nalice = [\"staff\", \"extra\"]\nbob = [\"staff\"]\ncarol = []",
    )
    .unwrap();
    Arc::new(UserDb::from_conf("managers.toml", &c).unwrap())
}

fn conf(cycle: &str) -> DwnConsRConf {
    toml::from_str(&format!(
        "name = \"down\"\nuserDBN = \"db\"\nresetCycle = \"{cycle}\"\n[groupQuota]\nstaff = \"1 GB\"\nextra = \"512 MiB\""
    ))
    .unwrap()
}

fn t0() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
}

fn mgr(dir: Option<&Path>, now: SystemTime) -> DwnConsR {
    DwnConsR::from_conf("managers.toml", &conf("24h"), db(), dir, now, None).unwrap()
}

#[test]
fn quota_is_the_sum_of_groups_in_binary_units() {
    let d = mgr(None, t0());
    assert_eq!(d.quota_of("alice"), GIB + GIB / 2);
    assert_eq!(d.quota_of("bob"), GIB);
    assert_eq!(d.quota_of("carol"), 0);
    assert_eq!(human_bytes(GIB + GIB / 2), "1.5 GiB");
}

#[test]
fn connections_share_one_counter_and_are_cut_exactly() {
    let d = mgr(None, t0());
    let a = d.handle("bob", t0());
    let b = d.handle("bob", t0());
    a.consume(GIB - 100).unwrap();
    assert_eq!(b.used(), GIB - 100);
    b.consume(60).unwrap();
    // 40 bytes are left: a 64 KiB read gets 40 of its bytes through, then the cut.
    let e = a.consume(65536).unwrap_err();
    assert_eq!(e.allowed, 40);
    assert_eq!(a.used(), GIB);
    assert!(
        e.to_string()
            .contains("download quota of \"bob\" in dwnConsR \"down\" reached (1.0 GiB)"),
        "{e}"
    );
    assert_eq!(b.consume(1).unwrap_err().allowed, 0);
    assert_eq!(d.handle("carol", t0()).consume(1).unwrap_err().allowed, 0);
}

#[test]
fn concurrent_consumers_never_overshoot() {
    let d = mgr(None, t0());
    let h = d.handle("bob", t0());
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let h = h.clone();
            std::thread::spawn(move || {
                let mut got = 0u64;
                loop {
                    match h.consume(1 << 20) {
                        Ok(()) => got += 1 << 20,
                        Err(e) => return got + e.allowed,
                    }
                }
            })
        })
        .collect();
    let total: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(total, GIB);
}

#[test]
fn persist_reload_and_reset_by_whole_cycles() {
    let dir = tempfile::tempdir().unwrap();
    let d = mgr(Some(dir.path()), t0());
    d.handle("alice", t0()).consume(1000).unwrap();
    d.persist().unwrap();
    let text = std::fs::read_to_string(dir.path().join("down.json")).unwrap();
    assert!(
        text.contains("\"lastReset\"") && text.contains("\"alice\": 1000"),
        "{text}"
    );

    // Reload inside the cycle: same consumption, same cycle start.
    let later = t0() + Duration::from_secs(3600);
    let d2 = mgr(Some(dir.path()), later);
    assert_eq!(d2.handle("alice", later).used(), 1000);
    assert_eq!(d2.last_reset(), t0());

    // 2.5 cycles later: zeroed, and lastReset moved by exactly two cycles.
    let much_later = t0() + Duration::from_secs(60 * 3600);
    let h = d2.handle("alice", later);
    d2.maybe_reset(much_later);
    assert_eq!(h.used(), 0, "live handles see the reset");
    assert_eq!(d2.last_reset(), t0() + Duration::from_secs(48 * 3600));
}

#[test]
fn first_start_without_state_file_keeps_everything_after() {
    let dir = tempfile::tempdir().unwrap();
    let d = mgr(Some(dir.path()), t0());
    d.handle("bob", t0()).consume(10).unwrap();
    d.persist().unwrap();
    d.handle("bob", t0()).consume(5).unwrap();
    d.persist().unwrap();
    let d2 = mgr(Some(dir.path()), t0() + Duration::from_secs(60));
    assert_eq!(d2.consumptions().get("bob"), Some(&15));
}

#[test]
fn reset_cycle_zero_and_corrupt_state_are_errors() {
    let e = DwnConsR::from_conf("managers.toml", &conf("0s"), db(), None, t0(), None)
        .err()
        .unwrap()
        .to_string();
    assert_eq!(
        e,
        "managers.toml: [[dwnConsR]] \"down\": resetCycle: must be longer than 0 (e.g. \"24h\")"
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("down.json"), "{not json").unwrap();
    let e = DwnConsR::from_conf(
        "managers.toml",
        &conf("24h"),
        db(),
        Some(dir.path()),
        t0(),
        None,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        e.contains("down.json") && e.contains("fix or remove the file"),
        "{e}"
    );
}
