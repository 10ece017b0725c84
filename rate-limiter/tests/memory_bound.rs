//! The memory store gives its memory back: a million distinct users, then idle, then the
//! heap is back near where it started. Measured with a counting global allocator, so this
//! test binary holds only this test.

use std::alloc::System;
use std::sync::Arc;

use domain::{ManualClock, Policy};
use rate_limiter::back::store::MemoryStore;
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Bytes allocated and not yet freed. stats_alloc already counts a realloc's growth in
/// `bytes_allocated` (and its shrinking in `bytes_deallocated`); `bytes_reallocated` is the
/// same growth again, so adding it counted every grown buffer twice (a `format!` that grew
/// its string, freed long ago, read as held).
fn live_bytes(region: &Region<'_, System>) -> i64 {
    let c = region.change();
    c.bytes_allocated as i64 - c.bytes_deallocated as i64
}

#[test]
fn a_million_idle_users_leave_no_memory_behind() {
    const USERS: usize = 1_000_000;
    let clock = Arc::new(ManualClock::new(1_000_000));
    let store = MemoryStore::new(Policy::new(10, 1.0).unwrap(), clock.clone());
    // Warm the store's shards so their fixed cost is not counted as growth.
    store.take_now("warm-up", 1);
    let region = Region::new(GLOBAL);
    let mut id = String::with_capacity(16);
    for i in 0..USERS {
        id.clear();
        std::fmt::Write::write_fmt(&mut id, format_args!("user-{i}")).unwrap();
        store.take_now(&id, 1);
    }
    let loaded = live_bytes(&region);
    assert_eq!(store.len(), USERS + 1);
    println!(
        "memory store: {} bytes per active bucket ({} users)",
        loaded / USERS as i64,
        USERS
    );

    // Idle for a full refill period: every bucket is full, so all are forgotten.
    clock.advance_us(1_000_000);
    assert_eq!(store.sweep(), USERS + 1);
    assert!(store.is_empty());
    let after = live_bytes(&region);
    println!("after sweep: {after} bytes above the start");
    assert!(
        after < 1 << 20,
        "{after} bytes still held after every bucket was dropped (peak {loaded})"
    );
}
