//! Micro-benchmarks of the pure hot-path pieces of the domain: the token-bucket decision
//! and the JSON encoding of the event every decision emits.
//!
//! `cargo bench -p domain --bench decide`; under `cargo test` each runs once.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use domain::bucket::decide;
use domain::{BucketState, Policy, RateLimitEvent};

const NOW_US: u64 = 1_700_000_000_000_000;

fn bench_decide(c: &mut Criterion) {
    let policy = Policy::new(10, 1.0).expect("valid policy");
    let mut group = c.benchmark_group("decide");
    group.bench_function("new_bucket", |b| {
        b.iter(|| decide(black_box(None), black_box(NOW_US), &policy, black_box(1)))
    });
    let half = BucketState {
        tokens: 5.0,
        updated_us: NOW_US - 250_000,
    };
    group.bench_function("allowed", |b| {
        b.iter(|| {
            decide(
                black_box(Some(half)),
                black_box(NOW_US),
                &policy,
                black_box(1),
            )
        })
    });
    let empty = BucketState {
        tokens: 0.25,
        updated_us: NOW_US - 100,
    };
    group.bench_function("limited", |b| {
        b.iter(|| {
            decide(
                black_box(Some(empty)),
                black_box(NOW_US),
                &policy,
                black_box(1),
            )
        })
    });
    group.finish();
}

fn bench_event(c: &mut Criterion) {
    let event = RateLimitEvent::new("user-123456", true, 1_700_000_000_000, "bench-host-4242");
    let bytes = event.encode();
    let mut group = c.benchmark_group("event");
    group.bench_function("encode", |b| b.iter(|| black_box(&event).encode()));
    group.bench_function("decode", |b| {
        b.iter(|| RateLimitEvent::decode(black_box(&bytes)).expect("valid event"))
    });
    group.finish();
}

criterion_group!(benches, bench_decide, bench_event);
criterion_main!(benches);
