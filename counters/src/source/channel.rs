//! The in-process stream: events from a limiter in the same process.

use std::time::Duration;

use async_trait::async_trait;
use kit::stream::ChannelReceiver;

use super::{EventSource, Record};

/// How long a batch waits for more events after its first: the worker then wakes once per
/// gathering rather than once per event. A wake-up per decision costs the limiter a thread
/// switch whenever another task is ready on the deciding thread (every gRPC call, whose
/// answer goes back through the connection's task): more CPU than the counting itself.
/// The counts lag the decisions by this much more.
pub const GATHER: Duration = Duration::from_millis(5);

/// Events from the in-process channel, numbered from 0 under an epoch of this process's
/// own: the same offset discipline as a Kafka partition, so one counting path covers both.
pub struct ChannelSource {
    rx: ChannelReceiver,
    next_offset: i64,
    epoch: String,
    /// The first event of a batch still gathering: kept here, not in the batch's future,
    /// so that a batch dropped while it gathers (at shutdown) loses nothing ([`Self::drain`]
    /// takes it).
    first: Option<domain::RateLimitEvent>,
}

impl ChannelSource {
    pub fn new(rx: ChannelReceiver) -> Self {
        Self {
            rx,
            next_offset: 0,
            epoch: new_epoch(),
            first: None,
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
        if self.first.is_none() {
            self.first = Some(self.rx.recv().await?);
        }
        // Gather unless a batch is already waiting, or the channel is filling up (past half
        // its capacity, a pause could make it drop events).
        let waiting = self.rx.len() + 1;
        if waiting < max && waiting < self.rx.max_capacity() / 2 {
            tokio::time::sleep(GATHER).await;
        }
        Some(self.drain(max.max(1)))
    }

    fn drain(&mut self, max: usize) -> Vec<Record> {
        let mut records = Vec::with_capacity(max.min(self.rx.len() + 1));
        if max > 0
            && let Some(first) = self.first.take()
        {
            records.push(self.record(first));
        }
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
