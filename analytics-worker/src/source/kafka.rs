//! A Kafka consumer in the worker group: partitions are shared among the workers and
//! taken over when one leaves. Offsets are committed by hand, only after the worker has
//! made the counters durable ([`EventSource::commit`]).

use std::time::Duration;

use async_trait::async_trait;
use futures::FutureExt;
use ratelimit_core::RateLimitEvent;
use ratelimit_core::config::KafkaArgs;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

use super::{EventSource, Record};

pub struct KafkaSource {
    consumer: StreamConsumer,
    topic: String,
}

impl KafkaSource {
    /// Joins `args.group_id` and subscribes to `args.topic`.
    pub fn new(args: &KafkaArgs, brokers: &str) -> Result<Self, KafkaError> {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", brokers)
            .set("group.id", &args.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", "10000")
            .set("heartbeat.interval.ms", "1000");
        for (key, value) in args.passthrough() {
            config.set(key, value);
        }
        let consumer: StreamConsumer = config.create()?;
        consumer.subscribe(&[&args.topic])?;
        Ok(Self {
            consumer,
            topic: args.topic.clone(),
        })
    }

    /// The partitions this member owns now.
    pub fn assignment(&self) -> Vec<i32> {
        self.consumer
            .assignment()
            .map(|tpl| tpl.elements().iter().map(|e| e.partition()).collect())
            .unwrap_or_default()
    }

    fn record(message: &impl Message) -> Record {
        Record {
            partition: Some(message.partition()),
            offset: message.offset(),
            event: RateLimitEvent::decode(message.payload().unwrap_or_default()),
        }
    }
}

#[async_trait]
impl EventSource for KafkaSource {
    async fn next_batch(&mut self, max: usize) -> Option<Vec<Record>> {
        let first = match self.consumer.recv().await {
            Ok(message) => Self::record(&message),
            Err(err) => {
                tracing::warn!(error = %err, "kafka consumer error");
                tokio::time::sleep(Duration::from_millis(100)).await;
                return Some(Vec::new());
            }
        };
        let mut records = vec![first];
        records.extend(self.drain(max.saturating_sub(1)));
        Some(records)
    }

    fn drain(&mut self, max: usize) -> Vec<Record> {
        let mut records = Vec::new();
        while records.len() < max {
            match self.consumer.recv().now_or_never() {
                Some(Ok(message)) => records.push(Self::record(&message)),
                Some(Err(err)) => {
                    tracing::warn!(error = %err, "kafka consumer error");
                    break;
                }
                None => break,
            }
        }
        records
    }

    async fn commit(&mut self, done: &[(i32, i64)]) {
        if done.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for (partition, offset) in done {
            // Kafka's committed offset is the next one to read.
            if let Err(err) =
                tpl.add_partition_offset(&self.topic, *partition, Offset::Offset(offset + 1))
            {
                tracing::warn!(error = %err, partition, "cannot build commit");
            }
        }
        if let Err(err) = self.consumer.commit(&tpl, CommitMode::Async) {
            // Harmless: the next commit covers it, and replays are not counted twice.
            tracing::debug!(error = %err, "offset commit failed");
        }
    }
}
