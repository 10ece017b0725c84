//! Kafka plumbing shared by the producer (rate limiter) and the consumer (worker):
//! client settings with the operator's pass-through, and topic creation.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;
use tokio_util::sync::CancellationToken;

use crate::config::KafkaArgs;

/// The client settings shared by the producer, the consumer and the admin client.
pub fn client_config(args: &KafkaArgs, brokers: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", brokers);
    for (key, value) in args.passthrough() {
        config.set(key, value);
    }
    config
}

/// Creates the topic if it is missing, retrying in the background until the broker
/// answers (so a limiter started before its broker still serves meanwhile).
pub fn ensure_topic(args: &KafkaArgs, brokers: &str, shutdown: CancellationToken) {
    let config = client_config(args, brokers);
    let topic = args.topic.clone();
    let (partitions, replication) = (args.partitions, args.replication);
    tokio::spawn(async move {
        let admin: Arc<AdminClient<DefaultClientContext>> = match config.create() {
            Ok(admin) => Arc::new(admin),
            Err(err) => {
                tracing::error!(error = %err, "cannot create the Kafka admin client");
                return;
            }
        };
        let options = AdminOptions::new()
            .operation_timeout(Some(Duration::from_secs(5)))
            .request_timeout(Some(Duration::from_secs(10)));
        loop {
            if topic_exists(&admin, &topic).await {
                return;
            }

            let new = NewTopic::new(&topic, partitions, TopicReplication::Fixed(replication));
            match admin.create_topics([&new], &options).await {
                Ok(results) => match results.into_iter().next() {
                    Some(Ok(_)) => {
                        tracing::info!(topic, partitions, "created the event topic");
                        return;
                    }
                    Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists))) | None => return,
                    Some(Err((_, code))) => {
                        tracing::warn!(topic, error = %code, "cannot create the event topic yet")
                    }
                },
                Err(err) => {
                    tracing::warn!(topic, error = %err, "cannot reach Kafka to create the topic")
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            }
        }
    });
}

/// Whether the cluster's metadata lists `topic` with partitions.
async fn topic_exists(admin: &Arc<AdminClient<DefaultClientContext>>, topic: &str) -> bool {
    let (admin, topic) = (admin.clone(), topic.to_owned());
    // Metadata requests block their caller: keep them off the async runtime.
    tokio::task::spawn_blocking(move || {
        admin
            .inner()
            .fetch_metadata(Some(&topic), Duration::from_secs(5))
            .map(|m| {
                m.topics()
                    .iter()
                    .any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty())
            })
            .unwrap_or(false)
    })
    .await
    .unwrap_or(false)
}
