//! The distributed form as separate processes: `gateway`, `rate-limiter` and
//! `analytics-worker` binaries on a real Redis and a Kafka-protocol broker.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use testkit::{RedisServer, Service, unique};

/// Shared settings of one test's processes: its own key prefix, topic and group.
pub struct Cluster {
    pub redis: RedisServer,
    pub brokers: String,
    pub topic: String,
    pub group: String,
    pub prefix: String,
    pub extra: Vec<(&'static str, String)>,
}

impl Cluster {
    pub fn new(brokers: String) -> Self {
        Self {
            redis: RedisServer::start(),
            brokers,
            topic: unique("events"),
            group: unique("workers"),
            prefix: unique("rl"),
            extra: Vec::new(),
        }
    }

    pub fn env(&self) -> Vec<(&'static str, String)> {
        let mut env = vec![
            ("REDIS_URL", self.redis.url()),
            ("REDIS_KEY_PREFIX", self.prefix.clone()),
            ("KAFKA_BROKERS", self.brokers.clone()),
            ("KAFKA_TOPIC", self.topic.clone()),
            ("KAFKA_GROUP_ID", self.group.clone()),
            ("KAFKA_PARTITIONS", "6".into()),
            ("RATE_LIMIT_CAPACITY", "5".into()),
            ("RATE_LIMIT_REFILL_PER_SEC", "2".into()),
        ];
        env.extend(self.extra.iter().cloned());
        env
    }

    pub fn limiter(&self, name: &str) -> Service {
        Service::start("rate-limiter", name, "LIMITER_PORT", &self.env())
    }

    pub fn worker(&self, name: &str) -> Service {
        Service::start("analytics-worker", name, "WORKER_PORT", &self.env())
    }

    /// A gateway balancing over `limiters`.
    pub fn gateway(&self, name: &str, limiters: &[&Service]) -> Service {
        let urls: Vec<String> = limiters.iter().map(|l| l.url()).collect();
        let mut env = self.env();
        env.push(("LIMITER_URL", urls.join(",")));
        Service::start("gateway", name, "GATEWAY_PORT", &env)
    }
}

/// What the clients saw, per user: (allowed, blocked).
#[derive(Default, Clone)]
pub struct Seen(pub Arc<Mutex<BTreeMap<String, (u64, u64)>>>);

impl Seen {
    pub fn record(&self, user: &str, allowed: bool) {
        let mut map = self.0.lock().unwrap();
        let entry = map.entry(user.to_owned()).or_default();
        if allowed {
            entry.0 += 1;
        } else {
            entry.1 += 1;
        }
    }

    pub fn total(&self) -> u64 {
        self.0.lock().unwrap().values().map(|(a, b)| a + b).sum()
    }
}

/// Latencies of the requests sent, in send order, with their send time.
pub type Latencies = Arc<Mutex<Vec<(Instant, Duration)>>>;

/// Sends `/api` requests from `concurrency` tasks over `users` users until `stop` or
/// `count` requests, recording what the clients saw. Each task paces itself to at most
/// `per_task_rate` requests per second (0 = as fast as it can).
#[allow(clippy::too_many_arguments)]
pub async fn drive(
    gateway: SocketAddr,
    users: Vec<String>,
    count: usize,
    concurrency: usize,
    per_task_rate: f64,
    seen: Seen,
    latencies: Latencies,
    stop: tokio_util::sync::CancellationToken,
) {
    let client = super::http();
    let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let url = format!("http://{gateway}/api");
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (client, url, users, seen, latencies, stop, sent) = (
                client.clone(),
                url.clone(),
                users.clone(),
                seen.clone(),
                latencies.clone(),
                stop.clone(),
                sent.clone(),
            );
            tokio::spawn(async move {
                let pace =
                    (per_task_rate > 0.0).then(|| Duration::from_secs_f64(1.0 / per_task_rate));
                loop {
                    let n = sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if n >= count || stop.is_cancelled() {
                        return;
                    }
                    let user = &users[(n * 7919) % users.len()];
                    let started = Instant::now();
                    let r = super::post(&client, &url, user).await;
                    latencies.lock().unwrap().push((started, started.elapsed()));
                    match r.status().as_u16() {
                        200 => seen.record(user, true),
                        429 => seen.record(user, false),
                        other => panic!(
                            "unexpected status {other} for {user}: {}",
                            r.text().await.unwrap_or_default()
                        ),
                    }
                    if let Some(pace) = pace {
                        tokio::time::sleep(pace.saturating_sub(started.elapsed())).await;
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
}

/// A user whose counters differ from what the clients saw: (user, seen, counted), each
/// count as (allowed, blocked).
pub type Diff = (String, (u64, u64), (u64, u64));

/// Waits until every user's analytics equal what the clients saw, or `within` passes;
/// returns the users that still differ.
pub async fn converge(gateway: SocketAddr, seen: &Seen, within: Duration) -> Vec<Diff> {
    let client = super::http();
    let expected = seen.0.lock().unwrap().clone();
    let deadline = Instant::now() + within;
    let mut pending: Vec<String> = expected.keys().cloned().collect();
    loop {
        let mut still = Vec::new();
        let mut diffs = Vec::new();
        for user in &pending {
            let a = super::analytics(&client, gateway, user).await;
            let want = expected[user];
            if (a.allowed, a.blocked) != want || a.total != want.0 + want.1 {
                still.push(user.clone());
                diffs.push((user.clone(), want, (a.allowed, a.blocked)));
            }
        }
        if still.is_empty() || Instant::now() > deadline {
            return diffs;
        }
        pending = still;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A worker's `/stats`.
pub async fn worker_stats(worker: &Service) -> serde_json::Value {
    super::http()
        .get(format!("{}/stats", worker.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

pub fn users(n: usize) -> Vec<String> {
    let run = unique("user");
    (0..n).map(|i| format!("{run}-{i}")).collect()
}

/// The global per-minute analytics over the last 10 minutes add up to what the clients saw
/// (this test's Redis prefix holds only its own traffic), and so do a few users' series.
pub async fn assert_window_totals(gateway: SocketAddr, seen: &Seen) {
    let client = super::http();
    let expected = seen.0.lock().unwrap().clone();
    let (allowed, blocked) = expected
        .values()
        .fold((0, 0), |(a, b), (x, y)| (a + x, b + y));
    let g = super::get_json(&client, &format!("http://{gateway}/analytics?window=10m")).await;
    assert_eq!(
        (g["allowed"].as_u64(), g["blocked"].as_u64()),
        (Some(allowed), Some(blocked)),
        "global window: {g}"
    );
    for (user, (a, b)) in expected.iter().take(5) {
        let url = reqwest::Url::parse(&format!("http://{gateway}/analytics/"))
            .unwrap()
            .join(user)
            .unwrap();
        let mut url = url;
        url.set_query(Some("window=10m"));
        let w: serde_json::Value = client.get(url).send().await.unwrap().json().await.unwrap();
        assert_eq!(
            (w["allowed"].as_u64(), w["blocked"].as_u64()),
            (Some(*a), Some(*b)),
            "{user}: {w}"
        );
    }
}
