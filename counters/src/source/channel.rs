//! The in-process stream: events from a limiter in the same process.

use async_trait::async_trait;
use service_kit::stream::ChannelReceiver;

use super::{EventSource, Record};

pub struct ChannelSource {
    rx: ChannelReceiver,
    next_offset: i64,
}

impl ChannelSource {
    pub fn new(rx: ChannelReceiver) -> Self {
        Self { rx, next_offset: 0 }
    }

    fn record(&mut self, event: ratelimit_domain::RateLimitEvent) -> Record {
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
}
