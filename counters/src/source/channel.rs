//! The in-process stream: events from a limiter in the same process.

use async_trait::async_trait;
use kit::stream::ChannelReceiver;

use super::{EventSource, Record};

/// Events from the in-process channel, numbered from 0 under an epoch of this process's
/// own: the same offset discipline as a Kafka partition, so one counting path covers both.
pub struct ChannelSource {
    rx: ChannelReceiver,
    next_offset: i64,
    epoch: String,
}

impl ChannelSource {
    pub fn new(rx: ChannelReceiver) -> Self {
        Self {
            rx,
            next_offset: 0,
            epoch: new_epoch(),
        }
    }

    fn record(&mut self, event: domain::RateLimitEvent) -> Record {
        let offset = self.next_offset;
        self.next_offset += 1;
        Record {
            partition: None,
            offset,
            event: Ok(event),
        }
    }
}

#[async_trait]
impl EventSource for ChannelSource {
    async fn next_batch(&mut self, max: usize) -> Option<Vec<Record>> {
        let first = self.rx.recv().await?;
        let mut records = vec![self.record(first)];
        records.extend(self.drain(max.saturating_sub(1)));
        Some(records)
    }

    fn drain(&mut self, max: usize) -> Vec<Record> {
        let mut records = Vec::new();
        while records.len() < max {
            match self.rx.try_recv() {
                Ok(event) => records.push(self.record(event)),
                Err(_) => break,
            }
        }
        records
    }

    async fn commit(&mut self, _done: &[(i32, i64)]) {}

    fn epoch(&self) -> Option<&str> {
        Some(&self.epoch)
    }
}

/// An identity no other process has had, in the form of a publisher's epoch
/// ([`domain::event::Stamp::new_epoch`]) so the counters can tell when it began.
fn new_epoch() -> String {
    let now_secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    domain::event::Stamp::new_epoch(now_secs)
}
