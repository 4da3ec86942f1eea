//! The connection table under contention: every received `data` message looks its
//! connection up, while connections open and close beside it. `ShardedMap` (16
//! `parking_lot` shards) against one `Mutex<HashMap>` in the same run.
//!
//! Each of T threads does, per iteration, 8 lookups of a live connection and one
//! open + close (the ratio of a busy session). Ids are the thread's own, as each
//! session's relays are.
//!
//! `cargo bench --bench table -- --warm-up-time 1 --measurement-time 3`

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyproxy::tunnel::table::ShardedMap;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use parking_lot::Mutex;

const LIVE_PER_THREAD: u32 = 256;
const LOOKUPS_PER_OPEN: u32 = 8;

trait Table: Send + Sync + 'static {
    fn insert(&self, k: u32, v: u64);
    fn bump(&self, k: u32) -> bool;
    fn remove(&self, k: u32);
}

impl Table for ShardedMap<u32, u64> {
    fn insert(&self, k: u32, v: u64) {
        ShardedMap::insert(self, k, v);
    }
    fn bump(&self, k: u32) -> bool {
        self.with(&k, |v| *v += 1).is_some()
    }
    fn remove(&self, k: u32) {
        ShardedMap::remove(self, &k);
    }
}

impl Table for Mutex<HashMap<u32, u64>> {
    fn insert(&self, k: u32, v: u64) {
        self.lock().insert(k, v);
    }
    fn bump(&self, k: u32) -> bool {
        self.lock().get_mut(&k).map(|v| *v += 1).is_some()
    }
    fn remove(&self, k: u32) {
        self.lock().remove(&k);
    }
}

/// Runs `iters` iterations on each of `threads` threads at once; wall time.
fn run<T: Table>(table: Arc<T>, threads: u32, iters: u64) -> Duration {
    for t in 0..threads {
        for i in 0..LIVE_PER_THREAD {
            table.insert(t << 20 | i, 0);
        }
    }
    let start = Arc::new(std::sync::Barrier::new(threads as usize + 1));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (table, start) = (table.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                let mut next_id = LIVE_PER_THREAD;
                for i in 0..iters {
                    for j in 0..LOOKUPS_PER_OPEN {
                        let k = (i as u32).wrapping_mul(31).wrapping_add(j) % LIVE_PER_THREAD;
                        black_box(table.bump(t << 20 | k));
                    }
                    let id = t << 20 | (next_id & 0xf_ffff);
                    next_id = next_id.wrapping_add(1).max(LIVE_PER_THREAD);
                    table.insert(id, 0);
                    table.remove(id);
                }
            })
        })
        .collect();
    start.wait();
    let began = Instant::now();
    for h in handles {
        h.join().unwrap();
    }
    began.elapsed()
}

fn bench(c: &mut Criterion) {
    for threads in [1u32, 2, 4] {
        let mut group = c.benchmark_group(format!("table/{threads}-threads"));
        // Elements = table operations across all threads.
        group.throughput(Throughput::Elements(
            u64::from(threads) * u64::from(LOOKUPS_PER_OPEN + 2),
        ));
        group.bench_function("sharded", |b| {
            b.iter_custom(|iters| run(Arc::new(ShardedMap::<u32, u64>::default()), threads, iters))
        });
        group.bench_function("one-mutex", |b| {
            b.iter_custom(|iters| run(Arc::new(Mutex::new(HashMap::new())), threads, iters))
        });
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
