//! The worker's rate into Redis, and what it costs Redis: a benchmark, ignored by default.
//!
//! ```text
//! CARGO_TARGET_DIR=... cargo test -p counters --release --test worker_throughput \
//!     -- --ignored --nocapture
//! ```
//!
//! It starts its own redis-server, feeds `BENCH_EVENTS` (500,000) synthetic decisions of
//! 10,000 users (two thirds refused, no rule hits: the built-in rule, like `bench/run.sh`)
//! spread over 6 partitions (Kafka's default here), through the worker loop
//! ([`worker::run`]) into [`RedisCounters`] in batches of the worker's default size
//! (`BENCH_BATCH` to try another), and
//! prints events per second, Redis CPU seconds per 1,000 events (`/proc/<pid>/stat`), this
//! process's CPU per 1,000 events, and the commands Redis ran per event (`INFO
//! commandstats`, calls inside scripts included).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use counters::RedisCounters;
use counters::source::{EventSource, Record};
use counters::worker::{self, WorkerStats};
use domain::RateLimitEvent;
use domain::analytics::CounterStore;
use kit::redis::Endpoint;
use testkit::{RedisServer, unique};
use tokio_util::sync::CancellationToken;

const USERS: u64 = 10_000;
const PARTITIONS: u64 = 6;
/// The worker's default `ANALYTICS_BATCH_MAX`.
const BATCH: usize = 5_000;

/// Pre-decoded records handed out `max` at a time, then the end of the stream.
struct Backlog(std::vec::IntoIter<Record>);

#[async_trait]
impl EventSource for Backlog {
    async fn next_batch(&mut self, max: usize) -> Option<Vec<Record>> {
        let batch: Vec<Record> = self.0.by_ref().take(max).collect();
        (!batch.is_empty()).then_some(batch)
    }
    fn drain(&mut self, _max: usize) -> Vec<Record> {
        Vec::new()
    }
    async fn commit(&mut self, _done: &[(i32, i64)]) {}
}

/// `n` decisions: users drawn uniformly (a fixed LCG), one in three allowed, each user on
/// partition `user % 6` with that partition's next offset, 150 decisions per millisecond
/// from `start_ms`.
fn backlog(n: u64, start_ms: u64) -> Vec<Record> {
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    let mut offsets = [0i64; PARTITIONS as usize];
    (0..n)
        .map(|i| {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let user = (seed >> 33) % USERS;
            let partition = (user % PARTITIONS) as usize;
            let offset = offsets[partition];
            offsets[partition] += 1;
            Record {
                partition: Some(partition as i32),
                offset,
                event: Ok(RateLimitEvent::new(
                    format!("user-{user}"),
                    i % 3 == 0,
                    start_ms + i / 150,
                    "bench",
                )),
            }
        })
        .collect()
}

/// utime + stime of `pid`, in clock ticks (1/100 s).
fn cpu_ticks(pid: &str) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("proc stat");
    // Fields after the command name (which is in parentheses): state is field 3, utime 14.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

async fn info(conn: &mut redis::aio::MultiplexedConnection, section: &str) -> String {
    redis::cmd("INFO")
        .arg(section)
        .query_async(conn)
        .await
        .unwrap()
}

/// Calls and microseconds per command from `INFO commandstats` (without the benchmark's
/// own INFO/CONFIG); a script's microseconds include those of the commands it calls.
fn command_calls(stats: &str) -> BTreeMap<String, (u64, u64)> {
    stats
        .lines()
        .filter_map(|line| {
            let (name, rest) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let mut fields = rest.split(',');
            let calls = fields.next()?.strip_prefix("calls=")?.parse().ok()?;
            let usec = fields.next()?.strip_prefix("usec=")?.parse().ok()?;
            Some((name.to_owned(), (calls, usec)))
        })
        .filter(|(name, _)| {
            !["info", "config", "hello", "client"]
                .contains(&name.split('|').next().unwrap_or_default())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: run it with --release -- --ignored --nocapture"]
async fn worker_throughput() {
    let n: u64 = std::env::var("BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500_000);
    // The worker's batch size (`ANALYTICS_BATCH_MAX`), 5,000 unless `BENCH_BATCH` says.
    let batch: usize = std::env::var("BENCH_BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(BATCH);
    let redis = RedisServer::start();
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let server = info(&mut conn, "server").await;
    let redis_pid = server
        .lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .unwrap()
        .trim()
        .to_owned();
    let store: Arc<dyn CounterStore> = Arc::new(
        RedisCounters::new(
            &Endpoint::single(redis.url()),
            &unique("bench"),
            Duration::from_secs(10),
            Duration::from_secs(86_400),
            Duration::from_secs(7 * 86_400),
        )
        .unwrap(),
    );
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let records = backlog(n, now_ms);
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut conn)
        .await
        .unwrap();
    let redis_before = cpu_ticks(&redis_pid);
    let self_before = cpu_ticks("self");
    let stats = Arc::new(WorkerStats::default());
    let started = Instant::now();
    worker::run(
        Box::new(Backlog(records.into_iter())),
        Arc::clone(&store),
        Arc::clone(&stats),
        batch,
        CancellationToken::new(),
    )
    .await;
    let elapsed = started.elapsed();
    let redis_ticks = cpu_ticks(&redis_pid) - redis_before;
    let self_ticks = cpu_ticks("self") - self_before;
    let calls = command_calls(&info(&mut conn, "commandstats").await);

    let per_k = |ticks: u64| ticks as f64 / 100.0 / (n as f64 / 1_000.0);
    println!(
        "worker_throughput: batches of {batch}: {n} events in {:.2} s = {:.0} events/s; redis CPU {:.5} s per 1,000 events ({:.2} s); worker process CPU {:.5} s per 1,000 events",
        elapsed.as_secs_f64(),
        n as f64 / elapsed.as_secs_f64(),
        per_k(redis_ticks),
        redis_ticks as f64 / 100.0,
        per_k(self_ticks),
    );
    let all: u64 = calls.values().map(|(c, _)| c).sum();
    println!(
        "worker_throughput: redis commands per event {:.3} (calls {all})",
        all as f64 / n as f64
    );
    for (name, (c, usec)) in &calls {
        println!(
            "worker_throughput:   {name:<20} {c:>9} = {:.3} per event, {:.3} us per event",
            *c as f64 / n as f64,
            *usec as f64 / n as f64
        );
    }
    // Checked after the numbers are printed, so an experiment that breaks counting still
    // shows its cost.
    assert_eq!(
        stats.events.load(std::sync::atomic::Ordering::Relaxed),
        n,
        "every event applied"
    );
    let mut total = 0;
    for u in 0..USERS {
        total += store.get(&format!("user-{u}")).await.unwrap().total;
    }
    assert_eq!(total, n, "every event counted once");
}
