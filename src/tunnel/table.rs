//! A sharded map: many connections touch it concurrently, each shard is a short
//! `parking_lot` critical section, and no guard ever crosses an `.await`.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, RandomState};

use parking_lot::Mutex;

const SHARDS: usize = 16;

pub struct ShardedMap<K, V> {
    shards: [Mutex<HashMap<K, V>>; SHARDS],
    hasher: RandomState,
}

impl<K: Hash + Eq, V> Default for ShardedMap<K, V> {
    fn default() -> Self {
        ShardedMap {
            shards: std::array::from_fn(|_| Mutex::new(HashMap::new())),
            hasher: RandomState::new(),
        }
    }
}

impl<K: Hash + Eq, V> ShardedMap<K, V> {
    fn shard(&self, key: &K) -> &Mutex<HashMap<K, V>> {
        let h = self.hasher.hash_one(key) as usize;
        &self.shards[h % SHARDS]
    }

    /// Inserts and returns the previous value.
    pub fn insert(&self, key: K, value: V) -> Option<V> {
        self.shard(&key).lock().insert(key, value)
    }

    /// Inserts only if the key is free; gives the value back otherwise.
    pub fn try_insert(&self, key: K, value: V) -> Result<(), V> {
        let mut shard = self.shard(&key).lock();
        if shard.contains_key(&key) {
            return Err(value);
        }
        shard.insert(key, value);
        Ok(())
    }

    pub fn remove(&self, key: &K) -> Option<V> {
        self.shard(key).lock().remove(key)
    }

    /// Removes the entry only when `pred` holds for it.
    pub fn remove_if(&self, key: &K, pred: impl FnOnce(&V) -> bool) -> Option<V> {
        let mut shard = self.shard(key).lock();
        if shard.get(key).is_some_and(pred) {
            shard.remove(key)
        } else {
            None
        }
    }

    /// Runs `f` on the entry under its shard lock; `f` must not block.
    pub fn with<R>(&self, key: &K, f: impl FnOnce(&mut V) -> R) -> Option<R> {
        self.shard(key).lock().get_mut(key).map(f)
    }

    pub fn contains(&self, key: &K) -> bool {
        self.shard(key).lock().contains_key(key)
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes every entry out.
    pub fn drain(&self) -> Vec<(K, V)> {
        let mut all = Vec::new();
        for shard in &self.shards {
            all.extend(shard.lock().drain());
        }
        all
    }

    /// Clones out every value (for scans such as picking the least-loaded agent).
    pub fn values(&self) -> Vec<V>
    where
        V: Clone,
    {
        let mut all = Vec::new();
        for shard in &self.shards {
            all.extend(shard.lock().values().cloned());
        }
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_remove_and_conditional_remove() {
        let m: ShardedMap<u32, &str> = ShardedMap::default();
        assert!(m.try_insert(1, "a").is_ok());
        assert_eq!(m.try_insert(1, "b"), Err("b"));
        assert_eq!(m.remove_if(&1, |v| *v == "z"), None);
        assert_eq!(m.remove_if(&1, |v| *v == "a"), Some("a"));
        for i in 0..100 {
            m.insert(i, "x");
        }
        assert_eq!(m.len(), 100);
        assert_eq!(m.drain().len(), 100);
        assert!(m.is_empty());
    }
}
