//! What each limiter and worker instance reports of itself, through Redis, so that a
//! standalone gateway's `/status` (and its dashboard) can show the whole deployment's
//! decisions, events and consumer lag, as the all-in-one process shows its own.
//!
//! Every instance writes its numbers once a second as one field (its instance id) of one
//! hash per role, `<prefix>status{limiters}` and `<prefix>status{workers}` (one key each,
//! so one slot on a Redis Cluster). A reader sums the fresh reports, and removes reports
//! that have not been renewed for [`STALE_AFTER`] (an instance that stopped), so the hashes
//! hold no more than the live instances.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::redis::{Connection, Endpoint, RedisCallError, connect, with_deadline};

/// How often an instance reports.
pub const REPORT_EVERY: Duration = Duration::from_secs(1);
/// A report older than this is from an instance that is gone.
pub const STALE_AFTER: Duration = Duration::from_secs(10);

/// Which kind of instance reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Limiter,
    Worker,
}

impl Role {
    fn key(self, prefix: &str) -> String {
        let role = match self {
            Role::Limiter => "limiters",
            Role::Worker => "workers",
        };
        format!("{prefix}status{{{role}}}")
    }
}

/// One instance's numbers since it started (counters), and its state now.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// When it was written, ms since the Unix epoch (the writer's clock).
    pub at_ms: u64,
    /// Limiters: decisions by outcome, and how many were made by the fallback bucket.
    #[serde(default)]
    pub allowed: u64,
    #[serde(default)]
    pub limited: u64,
    #[serde(default)]
    pub degraded: u64,
    /// Limiters: bucket-store calls that failed, and whether the breaker is closed.
    #[serde(default)]
    pub store_errors: u64,
    #[serde(default)]
    pub breaker_closed: bool,
    /// Limiters: events handed to the stream, dropped, and waiting in the producer.
    #[serde(default)]
    pub published: u64,
    #[serde(default)]
    pub dropped: u64,
    #[serde(default)]
    pub buffered: u64,
    /// Workers: events counted, and the consumer lag over the owned partitions.
    #[serde(default)]
    pub events: u64,
    #[serde(default)]
    pub consumer_lag: Option<i64>,
}

/// Reads and writes reports in Redis.
#[derive(Clone)]
pub struct Reports {
    conn: Connection,
    prefix: String,
    timeout: Duration,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Reports {
    pub fn new(
        endpoint: &Endpoint,
        prefix: &str,
        timeout: Duration,
    ) -> Result<Self, RedisCallError> {
        Ok(Self {
            conn: connect(endpoint, timeout)?,
            prefix: prefix.to_owned(),
            timeout,
        })
    }

    /// Reports in the analytics Redis of `redis`, if there is one.
    pub fn from_settings(
        redis: &crate::config::RedisSettings,
    ) -> Result<Option<Self>, RedisCallError> {
        match &redis.analytics {
            Some(endpoint) => Self::at(endpoint, redis).map(Some),
            None => Ok(None),
        }
    }

    /// Reports in the Redis at `endpoint`, with the prefix and deadline of `redis`.
    pub fn at(
        endpoint: &Endpoint,
        redis: &crate::config::RedisSettings,
    ) -> Result<Self, RedisCallError> {
        // A report is not a decision: it can wait longer than a bucket call.
        let timeout = redis.slow_timeout(Duration::from_millis(500));
        Self::new(endpoint, &redis.key_prefix, timeout)
    }

    /// Writes `report` as `instance`'s, stamped now.
    pub async fn write(
        &self,
        role: Role,
        instance: &str,
        mut report: Report,
    ) -> Result<(), RedisCallError> {
        report.at_ms = now_ms();
        let json = serde_json::to_string(&report).expect("a report serializes");
        let key = role.key(&self.prefix);
        let mut pipe = redis::pipe();
        pipe.hset(&key, instance, json)
            .ignore()
            // Once every instance is gone, the whole hash goes too.
            .pexpire(&key, (STALE_AFTER * 6).as_millis() as i64)
            .ignore();
        let mut conn = self.conn.clone();
        with_deadline(self.timeout, pipe.query_async::<()>(&mut conn)).await
    }

    /// The fresh reports of `role`, by instance; stale ones are removed.
    pub async fn read(&self, role: Role) -> Result<Vec<(String, Report)>, RedisCallError> {
        let key = role.key(&self.prefix);
        let mut conn = self.conn.clone();
        let all: Vec<(String, String)> = with_deadline(
            self.timeout,
            redis::cmd("HGETALL").arg(&key).query_async(&mut conn),
        )
        .await?;
        let oldest = now_ms().saturating_sub(STALE_AFTER.as_millis() as u64);
        let mut fresh = Vec::new();
        let mut stale = Vec::new();
        for (instance, json) in all {
            match serde_json::from_str::<Report>(&json) {
                Ok(report) if report.at_ms >= oldest => fresh.push((instance, report)),
                _ => stale.push(instance),
            }
        }
        if !stale.is_empty() {
            let _: Result<i64, _> = with_deadline(
                self.timeout,
                redis::cmd("HDEL")
                    .arg(&key)
                    .arg(&stale)
                    .query_async(&mut conn),
            )
            .await;
        }
        Ok(fresh)
    }

    /// Writes `report()` as `instance`'s every [`REPORT_EVERY`] until `shutdown`, then
    /// removes it. A failed write is logged at debug level and tried again next time.
    pub fn spawn_writer(
        self,
        role: Role,
        instance: String,
        report: impl Fn() -> Report + Send + 'static,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut every = crate::every::Every::new(REPORT_EVERY, shutdown);
            while every.tick().await {
                if let Err(err) = self.write(role, &instance, report()).await {
                    tracing::debug!(error = %err, "status report not written");
                }
            }
            let mut conn = self.conn.clone();
            let _: Result<i64, _> = with_deadline(
                self.timeout,
                redis::cmd("HDEL")
                    .arg(role.key(&self.prefix))
                    .arg(&instance)
                    .query_async(&mut conn),
            )
            .await;
        })
    }
}

/// The sum of several instances' reports; `consumer_lag` is summed over the workers that
/// know theirs.
pub fn total(reports: &[(String, Report)]) -> Report {
    let mut sum = Report {
        breaker_closed: true,
        ..Report::default()
    };
    for (_, r) in reports {
        sum.at_ms = sum.at_ms.max(r.at_ms);
        sum.allowed += r.allowed;
        sum.limited += r.limited;
        sum.degraded += r.degraded;
        sum.store_errors += r.store_errors;
        sum.breaker_closed &= r.breaker_closed;
        sum.published += r.published;
        sum.dropped += r.dropped;
        sum.buffered += r.buffered;
        sum.events += r.events;
        if let Some(lag) = r.consumer_lag {
            sum.consumer_lag = Some(sum.consumer_lag.unwrap_or(0) + lag.max(0));
        }
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_sum_counters_and_lag_and_and_the_breakers() {
        let a = Report {
            allowed: 3,
            limited: 1,
            breaker_closed: true,
            published: 4,
            consumer_lag: Some(5),
            ..Report::default()
        };
        let b = Report {
            allowed: 2,
            degraded: 2,
            breaker_closed: false,
            dropped: 1,
            consumer_lag: None,
            ..Report::default()
        };
        let t = total(&[("a".into(), a), ("b".into(), b)]);
        assert_eq!((t.allowed, t.limited, t.degraded), (5, 1, 2));
        assert_eq!((t.published, t.dropped), (4, 1));
        assert_eq!(t.consumer_lag, Some(5));
        assert!(!t.breaker_closed);
        assert_eq!(total(&[]).consumer_lag, None);
    }

    #[test]
    fn keys_are_one_slot_per_role() {
        assert_eq!(Role::Limiter.key("rl:"), "rl:status{limiters}");
        assert_eq!(Role::Worker.key("rl:"), "rl:status{workers}");
    }
}
