//! `Policy::reload`: `managers.toml` read, checked and built whole before it replaces the
//! running rules in one swap. Same-named `sessionIPM` and `dwnConsR` managers carry their
//! sessions and counters over (live connections keep counting into them); a manager the
//! new file no longer names is dropped with its in-memory state.

use std::path::Path;
use std::sync::Arc;

use super::build::{build_rules, From};
use super::config::ManagersConf;
use super::{Policy, PolicyConfigError, Rules};

impl Policy {
    /// Reads `path` and swaps its rules and managers in; on any error nothing changes.
    /// Returns one line per change, for the log.
    pub fn reload(&self, path: &Path) -> Result<Vec<String>, PolicyConfigError> {
        let label = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| PolicyConfigError::State {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let conf = ManagersConf::from_toml(&label, &text)?;
        let old = self.rules.load_full();
        let from = From {
            file: &label,
            state_dir: self.state_dir.as_deref(),
            now: self.clock.now(),
            flush: self.shared.as_ref().map(|s| s.flush.clone()),
            previous: Some(&old),
        };
        let new = build_rules(conf, &from)?;
        let changes = changes(&old, &new);
        self.rules.store(Arc::new(new));
        Ok(changes)
    }
}

/// `rules`, `admins`, each user database and each manager added, removed or changed.
fn changes(old: &Rules, new: &Rules) -> Vec<String> {
    let mut out = Vec::new();
    let (was, is) = (old.rule.to_string(), new.rule.to_string());
    if was != is {
        out.push(format!("rules changed from {was:?} to {is:?}"));
    }
    if old.admins != new.admins {
        out.push(format!("admins changed to {:?}", new.admins));
    }
    for (label, fp) in &new.user_dbs {
        match old.user_dbs.iter().find(|(l, _)| l == label) {
            None => out.push(format!("{label} added")),
            Some((_, was)) if was != fp => out.push(format!("{label} changed")),
            Some(_) => {}
        }
    }
    for (label, _) in &old.user_dbs {
        if !new.user_dbs.iter().any(|(l, _)| l == label) {
            out.push(format!("{label} removed"));
        }
    }
    for (i, (name, m)) in new.names.iter().zip(&new.managers).enumerate() {
        match old.by_name.get(&**name) {
            None => out.push(format!("{} {name:?} added", m.kind())),
            Some(&j) if old.managers[j].kind() != m.kind() => out.push(format!(
                "{} {name:?} replaced by a {}",
                old.managers[j].kind(),
                m.kind()
            )),
            Some(&j) if old.settings[j] != new.settings[i] => {
                out.push(format!("{} {name:?} changed", m.kind()))
            }
            Some(_) => {}
        }
    }
    for (name, m) in old.names.iter().zip(&old.managers) {
        if new.manager(name).is_none() {
            out.push(format!(
                "{} {name:?} removed (its state is dropped)",
                m.kind()
            ));
        }
    }
    out
}
