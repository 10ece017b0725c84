//! Bucket stores: where token-bucket state lives. One trait
//! ([`domain::store::BucketStore`]), two implementations (memory for the
//! embedded default, Redis for shared state), one contract suite (`contract`, behind the
//! `testsuite` feature) that both must pass. On Redis, the decisions' events can ride in
//! the deciding script, to an outbox stream ([`outbox`]).

#[cfg(any(test, feature = "testsuite"))]
pub mod contract;
mod memo;
mod memory;
pub mod outbox;
mod redis;

pub use domain::store::{BucketStore, StoreError};

pub use self::memory::MemoryStore;
pub use self::redis::RedisStore;
