//! Event sources: where the worker reads decisions from. The in-process channel (the
//! embedded default) and a Kafka consumer group.

mod channel;
#[cfg(feature = "kafka")]
pub mod kafka;

use async_trait::async_trait;
use domain::RateLimitEvent;
use domain::event::DecodeError;

pub use self::channel::ChannelSource;
#[cfg(feature = "kafka")]
pub use self::kafka::KafkaSource;

/// The partitions a group member owns, kept current by the rebalance callbacks.
pub type Assignment = std::sync::Arc<std::sync::Mutex<std::collections::BTreeSet<i32>>>;
/// Consumer lag per owned partition.
pub type Lag = std::sync::Arc<std::sync::Mutex<std::collections::BTreeMap<i32, i64>>>;

/// One record read from the stream.
#[derive(Debug)]
pub struct Record {
    /// The partition it came from; `None` for a stream that never replays.
    pub partition: Option<i32>,
    pub offset: i64,
    /// The decoded event, or why the bytes were not one (a poison message).
    pub event: Result<RateLimitEvent, DecodeError>,
}

#[async_trait]
pub trait EventSource: Send + 'static {
    /// Waits for records and returns those available, at most `max`. `None` when the
    /// stream has ended for good.
    async fn next_batch(&mut self, max: usize) -> Option<Vec<Record>>;

    /// Records that can be had without waiting (used to drain at shutdown).
    fn drain(&mut self, max: usize) -> Vec<Record>;

    /// Everything up to and including these `(partition, offset)` positions is counted
    /// durably: the source may forget it (commit).
    async fn commit(&mut self, done: &[(i32, i64)]);

    /// The identity of a stream without partitions (the in-process one), whose offsets are
    /// checked under it; `None` for a partitioned stream (Kafka).
    fn epoch(&self) -> Option<&str> {
        None
    }
}
