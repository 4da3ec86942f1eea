//! Connection caps across the cluster. Each member counts, per cap key, the
//! connections it holds; Redis keeps those counts (a hash member → count per key) and
//! the admission script sums the live members' counts. A member's counts are
//! rewritten from its own table at every heartbeat, so a release lost while the store
//! was down is repaired within one heartbeat, and a dead member's counts stop counting
//! when its lease ends.

use std::collections::{HashMap, HashSet};

use parking_lot::Mutex;

/// One cap a new connection must pass.
#[derive(Debug, Clone, PartialEq)]
pub enum Check {
    /// At most `limit` connections open at once under `key`, cluster-wide.
    Concurrent { key: String, limit: u32 },
    /// New connections under `key` at `per_sec`, with `burst` at once, cluster-wide.
    Rate {
        key: String,
        per_sec: f64,
        burst: f64,
    },
}

impl Check {
    pub fn key(&self) -> &str {
        match self {
            Check::Concurrent { key, .. } | Check::Rate { key, .. } => key,
        }
    }
}

/// Why the store refused an admission: check `index` (of those asked) refused, with
/// `open` connections counted under it (a concurrent cap; 0 for a rate).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub index: usize,
    pub open: u64,
}

/// This member's own counts, the truth its Redis counts are repaired from.
#[derive(Default)]
pub struct LocalSlots {
    inner: Mutex<Counts>,
}

#[derive(Default)]
struct Counts {
    held: HashMap<String, u32>,
    /// Keys that went to zero since the last repair, whose field must go.
    emptied: HashSet<String>,
}

impl LocalSlots {
    pub fn hold(&self, key: &str) {
        let mut c = self.inner.lock();
        *c.held.entry(key.to_owned()).or_default() += 1;
        c.emptied.remove(key);
    }

    pub fn release(&self, key: &str) {
        let mut c = self.inner.lock();
        if let Some(n) = c.held.get_mut(key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.held.remove(key);
                c.emptied.insert(key.to_owned());
            }
        }
    }

    /// The counts to rewrite and the keys to clear, taking the cleared ones.
    pub fn snapshot(&self) -> (Vec<(String, u32)>, Vec<String>) {
        let mut c = self.inner.lock();
        let held = c.held.iter().map(|(k, n)| (k.clone(), *n)).collect();
        (held, c.emptied.drain().collect())
    }

    /// Puts back keys whose clearing failed, unless they are held again.
    pub fn retry_emptied(&self, keys: Vec<String>) {
        let mut c = self.inner.lock();
        for k in keys {
            if !c.held.contains_key(&k) {
                c.emptied.insert(k);
            }
        }
    }

    pub fn held(&self) -> usize {
        self.inner.lock().held.values().map(|n| *n as usize).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_that_empties_is_cleared_once_and_a_held_one_is_rewritten() {
        let slots = LocalSlots::default();
        slots.hold("a");
        slots.hold("a");
        slots.hold("b");
        slots.release("b");
        let (held, emptied) = slots.snapshot();
        assert_eq!(held, vec![("a".to_owned(), 2)]);
        assert_eq!(emptied, vec!["b".to_owned()]);
        assert!(slots.snapshot().1.is_empty(), "cleared only once");
        slots.retry_emptied(vec!["b".into()]);
        assert_eq!(slots.snapshot().1, vec!["b".to_owned()]);
        slots.hold("b");
        slots.retry_emptied(vec!["b".into()]);
        assert!(
            slots.snapshot().1.is_empty(),
            "held again: nothing to clear"
        );
        assert_eq!(slots.held(), 3);
    }
}
