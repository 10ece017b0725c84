//! A Kafka consumer in the worker group: partitions are shared among the workers and
//! taken over when one leaves. Offsets are committed by hand, only after the worker has
//! made the counters durable ([`EventSource::commit`]).

use std::time::Duration;

use async_trait::async_trait;
use domain::RateLimitEvent;
use futures::FutureExt;
use kit::config::KafkaArgs;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

use super::{Assignment, EventSource, Lag, Record};

/// Records assignments and revocations as the group rebalances, and the lag.
struct GroupContext {
    assigned: Assignment,
    lag: Lag,
    topic: String,
}

impl rdkafka::ClientContext for GroupContext {
    fn stats(&self, statistics: rdkafka::Statistics) {
        let Some(topic) = statistics.topics.get(&self.topic) else {
            return;
        };
        let assigned = self.assigned.lock().expect("assignment lock").clone();
        let mut lag = self.lag.lock().expect("lag lock");
        lag.clear();
        for (partition, p) in &topic.partitions {
            if assigned.contains(partition) && p.consumer_lag >= 0 {
                lag.insert(*partition, p.consumer_lag);
            }
        }
    }
}

impl ConsumerContext for GroupContext {
    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let mut assigned = self.assigned.lock().expect("assignment lock");
        match rebalance {
            Rebalance::Assign(tpl) => {
                // Eager protocol: an assignment is the whole new set.
                assigned.clear();
                assigned.extend(tpl.elements().iter().map(|e| e.partition()));
                tracing::info!(partitions = ?*assigned, "partitions assigned");
            }
            Rebalance::Revoke(tpl) => {
                for e in tpl.elements() {
                    assigned.remove(&e.partition());
                }
                tracing::info!(partitions = ?*assigned, "partitions revoked");
            }
            Rebalance::Error(err) => tracing::warn!(error = %err, "rebalance error"),
        }
    }
}

pub struct KafkaSource {
    consumer: StreamConsumer<GroupContext>,
    topic: String,
    assigned: Assignment,
    lag: Lag,
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
            // Longer than a broker's typical hiccup (a member whose session times out has
            // to rejoin, which stalls its partitions), shorter than Kafka's 45 s default so
            // a crashed worker's partitions move on sooner. RDKAFKA_SESSION_TIMEOUT_MS overrides.
            .set("session.timeout.ms", "30000")
            .set("heartbeat.interval.ms", "3000")
            // Notice a topic created after we subscribed within seconds, not minutes.
            .set("topic.metadata.refresh.interval.ms", "5000")
            .set("statistics.interval.ms", "5000")
            // Answer a fetch as soon as there is data, or after 50 ms: librdkafka's default
            // (500 ms) was most of the decision-to-counter lag (BENCHMARKS.md).
            .set("fetch.wait.max.ms", "50");
        for (key, value) in args.passthrough() {
            config.set(key, value);
        }
        let assigned = Assignment::default();
        let lag = Lag::default();
        let consumer: StreamConsumer<GroupContext> = config.create_with_context(GroupContext {
            assigned: assigned.clone(),
            lag: lag.clone(),
            topic: args.topic.clone(),
        })?;
        consumer.subscribe(&[&args.topic])?;
        Ok(Self {
            consumer,
            topic: args.topic.clone(),
            assigned,
            lag,
        })
    }

    /// The partitions this member owns, updated as the group rebalances.
    pub fn assignment(&self) -> Assignment {
        self.assigned.clone()
    }

    /// The consumer lag per owned partition, updated every few seconds.
    pub fn lag(&self) -> Lag {
        self.lag.clone()
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
