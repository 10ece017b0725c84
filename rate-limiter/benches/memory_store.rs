//! Micro-benchmarks of the embedded bucket store's `take`: one thread over a population of
//! users, and several threads contending, on one hot key and on distinct keys.
//!
//! `cargo bench -p rate-limiter --bench memory_store`; under `cargo test` each runs once.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use domain::{Policy, SystemClock};
use rate_limiter::back::store::MemoryStore;

/// Threads in the contended benchmarks (the benchmark machines have 2 cores; more threads
/// than cores measures the shard locks under preemption too).
const THREADS: usize = 4;

fn store() -> MemoryStore {
    MemoryStore::new(
        Policy::new(10, 1.0).expect("valid policy"),
        Arc::new(SystemClock),
    )
}

/// `users` ids `user-<n>`, built once so the benchmark measures the store, not `format!`.
fn user_ids(users: usize) -> Vec<String> {
    (0..users).map(|n| format!("user-{n}")).collect()
}

fn single_thread(c: &mut Criterion) {
    let mut group = c.benchmark_group("memory_store/take_now");
    for users in [1, 10_000, 1_000_000] {
        let store = store();
        let ids = user_ids(users);
        let mut next = 0usize;
        group.bench_function(format!("1_thread/{users}_users"), |b| {
            b.iter(|| {
                // A stride coprime with the population walks it in an unpredictable order.
                next = (next + 7_919) % ids.len();
                store.take_now(black_box(&ids[next]), 1)
            })
        });
    }
    group.finish();
}

/// `THREADS` threads each take `iters / THREADS` times; the time is the wall time of all.
fn contended_run(store: &MemoryStore, ids: &[String], iters: u64) -> Duration {
    let per_thread = iters.div_ceil(THREADS as u64);
    let start = Instant::now();
    std::thread::scope(|scope| {
        for t in 0..THREADS {
            scope.spawn(move || {
                let mut next = t * 104_729;
                for _ in 0..per_thread {
                    next = (next + 7_919) % ids.len();
                    black_box(store.take_now(&ids[next], 1));
                }
            });
        }
    });
    start.elapsed()
}

fn contended(c: &mut Criterion) {
    let mut group = c.benchmark_group("memory_store/take_now");
    for users in [1, 10_000] {
        let store = store();
        let ids = user_ids(users);
        group.bench_function(format!("{THREADS}_threads/{users}_users"), |b| {
            b.iter_custom(|iters| contended_run(&store, &ids, iters))
        });
    }
    group.finish();
}

criterion_group!(benches, single_thread, contended);
criterion_main!(benches);
