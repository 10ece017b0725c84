//! The events outbox (issue 24) on the real servers: `rate-limiter` processes on a real
//! `redis-server` and a real Kafka-protocol broker (tansu), and an analytics worker in this
//! process counting the topic into Redis counters. Every answered decision must be counted,
//! and none twice, whatever happens to a limiter, the broker or Redis.
//!
//! A request whose limiter died while it was in flight is "in doubt": Redis may have
//! decided it (and its event is then in the outbox) though nobody got the answer. So per
//! user the counters must hold at least what the clients were answered, and at most that
//! plus the requests in doubt. A decision the fail-open fallback answered after its Redis
//! call timed out is not in doubt: its event waits until Redis says whether it ran the
//! call (`rate_limiter::back::settle`), so it is counted once either way.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use counters::SpawnedWorker;
use domain::analytics::AnalyticsReader;
use kit::config::{KafkaArgs, RedisArgs, WorkerArgs};
use testkit::{KafkaBroker, RedisServer, Service, unique};
use tokio_util::sync::CancellationToken;

/// What the clients saw of one user: answered allowed, answered blocked, in doubt.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Seen {
    allowed: u64,
    blocked: u64,
    doubt: u64,
    /// Of the answered, those decided by the fail-open fallback (Redis away).
    degraded: u64,
}

#[derive(Default, Clone)]
struct Ledger(Arc<Mutex<BTreeMap<String, Seen>>>);

impl Ledger {
    fn record(&self, user: &str, f: impl FnOnce(&mut Seen)) {
        f(self.0.lock().unwrap().entry(user.to_owned()).or_default());
    }

    fn snapshot(&self) -> BTreeMap<String, Seen> {
        self.0.lock().unwrap().clone()
    }

    fn answered(&self) -> u64 {
        self.snapshot()
            .values()
            .map(|s| s.allowed + s.blocked)
            .sum()
    }
}

#[derive(Parser)]
struct WorkerConfig {
    #[command(flatten)]
    kafka: KafkaArgs,
    #[command(flatten)]
    redis: RedisArgs,
    #[command(flatten)]
    worker: WorkerArgs,
}

/// One test's servers and names: the limiters' Redis, the counters' Redis (apart, so that
/// the limiters' Redis can be restarted empty without losing the counts), the broker.
struct Rig {
    redis: RedisServer,
    counters: RedisServer,
    broker: KafkaBroker,
    prefix: String,
    topic: String,
    group: String,
    extra: Vec<(&'static str, String)>,
}

impl Rig {
    fn new(outbox: bool) -> Self {
        Self {
            redis: RedisServer::start(),
            counters: RedisServer::start(),
            broker: KafkaBroker::start(),
            prefix: unique("ob"),
            topic: unique("events"),
            group: unique("workers"),
            extra: vec![("EVENTS_OUTBOX", outbox.to_string())],
        }
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        let mut env = vec![
            ("REDIS_URL", self.redis.url()),
            ("REDIS_KEY_PREFIX", self.prefix.clone()),
            ("KAFKA_BROKERS", self.broker.brokers()),
            ("KAFKA_TOPIC", self.topic.clone()),
            ("KAFKA_PARTITIONS", "4".into()),
            ("RATE_LIMIT_CAPACITY", "5".into()),
            ("RATE_LIMIT_REFILL_PER_SEC", "2".into()),
            ("OUTBOX_LEASE_MS", "1000".into()),
            // Every decision made by Redis: the refusal cache's answers make no Redis call
            // and keep the producer path (measured apart, below).
            ("REFUSAL_CACHE_ENTRIES", "0".into()),
        ];
        env.extend(self.extra.iter().cloned());
        env
    }

    fn limiter(&self, name: &str) -> Service {
        Service::start("rate-limiter", name, "LIMITER_PORT", &self.env())
    }

    /// The worker, in this process, and the read side of its counters.
    fn worker(&self) -> (SpawnedWorker, Arc<dyn AnalyticsReader>) {
        let brokers = self.broker.brokers();
        let counters = self.counters.url();
        let config = WorkerConfig::try_parse_from([
            "worker",
            "--redis-url",
            &counters,
            "--redis-key-prefix",
            &self.prefix,
            "--kafka-brokers",
            &brokers,
            "--kafka-topic",
            &self.topic,
            "--kafka-group-id",
            &self.group,
            "--kafka-partitions",
            "4",
        ])
        .unwrap();
        let redis = config.redis.resolve().unwrap();
        let store = counters::counter_store(&redis, &config.worker).unwrap();
        let worker = SpawnedWorker::kafka(&config.kafka, &brokers, store, 5_000).unwrap();
        let reader = counters::redis_reader(redis.analytics.as_ref().unwrap(), &redis).unwrap();
        (worker, reader)
    }

    fn redis(&self) -> redis::Client {
        redis::Client::open(self.redis.url()).unwrap()
    }

    /// How many of the outbox's streams each relay holds the lease of.
    async fn lease_holders(&self) -> BTreeMap<String, usize> {
        let mut conn = self
            .redis()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let mut holders = BTreeMap::new();
        for n in 0..rate_limiter::back::store::outbox::STREAMS {
            let holder: Option<String> = redis::cmd("GET")
                .arg(format!("{}ob:{n}:lease", self.prefix))
                .query_async(&mut conn)
                .await
                .unwrap();
            if let Some(holder) = holder {
                *holders.entry(holder).or_default() += 1;
            }
        }
        holders
    }

    /// The outbox's entries and counted bytes, over all its streams.
    async fn outbox_size(&self) -> (u64, u64) {
        let mut conn = self
            .redis()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let (mut entries, mut bytes) = (0, 0);
        for n in 0..rate_limiter::back::store::outbox::STREAMS {
            let len: u64 = redis::cmd("XLEN")
                .arg(format!("{}ob:{n}", self.prefix))
                .query_async(&mut conn)
                .await
                .unwrap();
            let held: Option<u64> = redis::cmd("HGET")
                .arg(format!("{}ob:{n}:m", self.prefix))
                .arg("bytes")
                .query_async(&mut conn)
                .await
                .unwrap();
            entries += len;
            bytes += held.unwrap_or(0);
        }
        (entries, bytes)
    }
}

/// Sends `POST /check` from `tasks` tasks, each at most `rate` a second, over `users`,
/// spread over `limiters` (the ones in `live`), until `stop`.
fn load(
    limiters: Vec<String>,
    live: Arc<Mutex<Vec<bool>>>,
    users: Vec<String>,
    tasks: usize,
    rate: f64,
    ledger: Ledger,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let handles: Vec<_> = (0..tasks)
        .map(|t| {
            let (client, limiters, live, users, ledger, stop) = (
                client.clone(),
                limiters.clone(),
                live.clone(),
                users.clone(),
                ledger.clone(),
                stop.clone(),
            );
            tokio::spawn(async move {
                let pace = Duration::from_secs_f64(1.0 / rate);
                let mut n = t;
                while !stop.is_cancelled() {
                    let started = Instant::now();
                    n += tasks;
                    let user = &users[(n * 7919) % users.len()];
                    let which = n % limiters.len();
                    if !live.lock().unwrap()[which] {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        continue;
                    }
                    let sent = client
                        .post(format!("{}/check", limiters[which]))
                        .json(&serde_json::json!({"user_id": user, "cost": 1}))
                        .send()
                        .await;
                    let answer = match sent {
                        Ok(r) if r.status().is_success() => {
                            r.json::<serde_json::Value>().await.ok()
                        }
                        Ok(r) => panic!("{user}: status {}", r.status()),
                        // Never reached the limiter: nothing decided.
                        Err(e) if e.is_connect() => continue,
                        Err(_) => None,
                    };
                    if answer.as_ref().is_some_and(|b| b["degraded"] == true) {
                        ledger.record(user, |s| s.degraded += 1);
                    }
                    match answer {
                        Some(body) if body["allowed"] == true => {
                            ledger.record(user, |s| s.allowed += 1)
                        }
                        Some(_) => ledger.record(user, |s| s.blocked += 1),
                        // Sent, and no answer: the limiter died under it.
                        None => ledger.record(user, |s| s.doubt += 1),
                    }
                    tokio::time::sleep(pace.saturating_sub(started.elapsed())).await;
                }
            })
        })
        .collect();
    tokio::spawn(async move {
        for h in handles {
            h.await.unwrap();
        }
    })
}

/// Waits (at most `within`) until every user's counters hold what the clients were
/// answered, within what is in doubt; returns the users that never did, with what was
/// seen and what was counted.
async fn converge(
    reader: &Arc<dyn AnalyticsReader>,
    ledger: &Ledger,
    within: Duration,
) -> Vec<(String, Seen, (u64, u64))> {
    let seen = ledger.snapshot();
    let deadline = Instant::now() + within;
    loop {
        let mut off = Vec::new();
        for (user, s) in &seen {
            let got = reader.get(user).await.unwrap();
            let doubt = s.doubt;
            // A fail-open answer whose Redis call ran after all is counted as Redis
            // decided it (the README's "Fail-open answers in doubt"): allowed for blocked or
            // the reverse, at most once per such answer; the total stays exact.
            let shift = s.degraded;
            let fits = |answered: u64, counted: u64| {
                counted + shift >= answered && counted <= answered + doubt + shift
            };
            let total_fits =
                got.total >= s.allowed + s.blocked && got.total <= s.allowed + s.blocked + doubt;
            if !(fits(s.allowed, got.allowed) && fits(s.blocked, got.blocked) && total_fits) {
                off.push((user.clone(), *s, (got.allowed, got.blocked)));
            }
        }
        if off.is_empty() || Instant::now() > deadline {
            return off;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// How many answers are counted as the other outcome (allowed for blocked or the reverse),
/// over the users with nothing in doubt.
async fn shifted(reader: &Arc<dyn AnalyticsReader>, ledger: &Ledger) -> u64 {
    let mut shifted = 0;
    for (user, s) in ledger.snapshot() {
        if s.doubt == 0 {
            shifted += reader.get(&user).await.unwrap().allowed.abs_diff(s.allowed);
        }
    }
    shifted
}

/// What the limiters at `urls` counted as Redis decided rather than as the fallback
/// answered (`ratelimit_events_recorded_otherwise_total`, summed).
async fn recorded_otherwise(urls: &[String]) -> u64 {
    let mut total = 0;
    for url in urls {
        let text = reqwest::get(format!("{url}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        total += text
            .lines()
            .find_map(|l| l.strip_prefix("ratelimit_events_recorded_otherwise_total "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0) as u64;
    }
    total
}

/// One at a time: each runs two limiters, a broker and a worker under load, and a
/// machine busy with another's would make its timings the test's subject.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn users(n: usize) -> Vec<String> {
    let run = unique("u");
    (0..n).map(|i| format!("{run}-{i}")).collect()
}

/// Kills (SIGKILL) a limiter under load, `rounds` times, the two in turn (the other
/// restarted in between; each relays half of the outbox's streams); returns per round what was answered and what was
/// not counted.
/// Per round: its number, the decisions answered, and the users whose counts do not fit.
type Rounds = Vec<(usize, u64, Vec<(String, Seen, (u64, u64))>)>;

async fn kill_rounds(outbox: bool, rounds: usize) -> Rounds {
    kill_rounds_with(outbox, rounds, &[]).await
}

async fn kill_rounds_with(outbox: bool, rounds: usize, extra: &[(&'static str, &str)]) -> Rounds {
    let _serial = SERIAL.lock().await;
    let mut rig = Rig::new(outbox);
    rig.extra
        .extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
    let (worker, reader) = rig.worker();
    let mut limiters = [rig.limiter("limiter-a"), rig.limiter("limiter-b")];
    let urls: Vec<String> = limiters.iter().map(Service::url).collect();
    let mut results = Vec::new();
    let mut victim = 0;
    for round in 0..rounds {
        let live = Arc::new(Mutex::new(vec![true, true]));
        let ledger = Ledger::default();
        let stop = CancellationToken::new();
        let load = load(
            urls.clone(),
            live.clone(),
            users(40),
            8,
            60.0,
            ledger.clone(),
            stop.clone(),
        );
        tokio::time::sleep(Duration::from_millis(1_200)).await;
        // Requests sent to it from now on get no answer (or a refused connection).
        limiters[victim].kill();
        tokio::time::sleep(Duration::from_millis(50)).await;
        live.lock().unwrap()[victim] = false;
        tokio::time::sleep(Duration::from_millis(800)).await;
        stop.cancel();
        load.await.unwrap();
        let off = converge(&reader, &ledger, Duration::from_secs(15)).await;
        results.push((round, ledger.answered(), off));
        // The survivor relays every stream now; the victim comes back for the next round.
        limiters[victim].restart();
        victim = 1 - victim;
    }
    worker.stop().await;
    results
}

/// Issue 24: a limiter SIGKILLed under load, ten times in a row, each time the one that
/// was relaying the outbox: every answered decision is counted, none twice (but what is in
/// doubt, above).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_answered_decision_is_counted_when_a_limiter_is_killed_ten_times() {
    let results = kill_rounds(true, 10).await;
    let failed: Vec<_> = results
        .iter()
        .filter(|(_, _, off)| !off.is_empty())
        .collect();
    for (round, answered, off) in &results {
        eprintln!(
            "round {round}: {answered} answered, {} users off",
            off.len()
        );
    }
    assert!(
        failed.is_empty(),
        "rounds whose counts differ from the answers: {:?}",
        failed
            .iter()
            .map(|(r, a, off)| (r, a, &off[..off.len().min(5)]))
            .collect::<Vec<_>>()
    );
}

/// The defect of issue 24, on the path the outbox replaces (`EVENTS_OUTBOX=false`): the
/// events a killed limiter had not yet delivered are lost. Ignored (it shows a loss, not a
/// promise); run it with `--ignored` to see the loss.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore]
async fn without_the_outbox_a_killed_limiter_loses_answered_decisions() {
    let results = kill_rounds(false, 3).await;
    for (round, answered, off) in &results {
        eprintln!(
            "round {round}: {answered} answered, {} users off: {:?}",
            off.len(),
            &off[..off.len().min(3)]
        );
    }
    assert!(
        results.iter().all(|(_, _, off)| off.is_empty()),
        "answered decisions went uncounted"
    );
}

/// The loss window that remains with the outbox: refusals the limiter answers from its
/// refusal cache make no Redis call and keep the producer path, so a killed limiter loses
/// those it had not delivered (about `linger.ms` of them). Ignored: it measures (run with
/// `--ignored --nocapture`); what it asserts is that nothing is counted twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore]
async fn with_the_refusal_cache_a_killed_limiter_loses_only_cached_refusals() {
    let results = kill_rounds_with(true, 5, &[("REFUSAL_CACHE_ENTRIES", "65536")]).await;
    let (mut answered_all, mut lost) = (0, 0);
    for (round, answered, off) in &results {
        let missing: u64 = off
            .iter()
            .map(|(_, s, (a, b))| (s.allowed + s.blocked).saturating_sub(a + b))
            .sum();
        eprintln!("round {round}: {answered} answered, {missing} not counted");
        for (user, s, (a, b)) in off {
            let doubt = s.doubt;
            assert!(
                *a <= s.allowed + doubt && *b <= s.blocked + doubt,
                "{user}: counted ({a}, {b}), answered {s:?}: counted twice"
            );
        }
        answered_all += answered;
        lost += missing;
    }
    eprintln!("with the refusal cache: {lost} of {answered_all} answered decisions not counted");
}

/// The broker away (frozen) for 30 s under load, then back: the outbox holds the events
/// meanwhile, then is relayed, every count exact, and drained and trimmed to nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_the_broker_away_30s_the_outbox_holds_the_events_then_drains() {
    let _serial = SERIAL.lock().await;
    let mut rig = Rig::new(true);
    let (worker, _) = rig.worker();
    let limiters = [rig.limiter("limiter-a"), rig.limiter("limiter-b")];
    let urls: Vec<String> = limiters.iter().map(Service::url).collect();
    let ledger = Ledger::default();
    let stop = CancellationToken::new();
    let load = load(
        urls.clone(),
        Arc::new(Mutex::new(vec![true, true])),
        users(50),
        4,
        50.0,
        ledger.clone(),
        stop.clone(),
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    rig.broker.freeze(true);
    tokio::time::sleep(Duration::from_secs(30)).await;
    let (held, bytes) = rig.outbox_size().await;
    rig.broker.freeze(false);
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.cancel();
    load.await.unwrap();
    // tansu does not give a consumer that was frozen out its partitions back (a real
    // Kafka rebalances): a worker of a new group counts the topic from its start, the
    // events the first one counted recognised by their stamps.
    worker.stop().await;
    rig.group = unique("workers");
    let (worker, reader) = rig.worker();
    assert!(
        held > 1_000 && bytes > 0,
        "the outbox held the events while the broker was away: {held} entries, {bytes} bytes"
    );
    let off = converge(&reader, &ledger, Duration::from_secs(60)).await;
    assert!(
        off.is_empty(),
        "{} answered, counts differ: {:?}; the outbox holds {:?}; the worker counted {} events",
        ledger.answered(),
        &off[..off.len().min(5)],
        rig.outbox_size().await,
        worker
            .stats
            .events
            .load(std::sync::atomic::Ordering::Relaxed),
    );
    // Each answer counted as the other outcome is one the limiters say Redis decided
    // otherwise than their fallback answered.
    let shifted = shifted(&reader, &ledger).await;
    let otherwise = recorded_otherwise(&urls).await;
    eprintln!("{shifted} answers counted as Redis decided them; the limiters report {otherwise}");
    assert!(
        shifted <= otherwise,
        "{shifted} shifted, {otherwise} reported"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while rig.outbox_size().await != (0, 0) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        rig.outbox_size().await,
        (0, 0),
        "outbox drained and trimmed"
    );
    worker.stop().await;
}

/// Redis restarted empty (no persistence) while the relay runs. The README's promise: what
/// the outbox held and had not relayed is lost with the rest of Redis's data (buckets
/// included); the relays take the streams again by themselves, and every decision made
/// after the restart is counted exactly, and none twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_redis_restarts_empty_the_relay_resumes_and_counts_stay_exact() {
    let _serial = SERIAL.lock().await;
    let mut rig = Rig::new(true);
    let (worker, reader) = rig.worker();
    let limiters = [rig.limiter("limiter-a"), rig.limiter("limiter-b")];
    let urls: Vec<String> = limiters.iter().map(Service::url).collect();
    let live = Arc::new(Mutex::new(vec![true, true]));
    let before = Ledger::default();
    let stop = CancellationToken::new();
    let load_before = load(
        urls.clone(),
        live.clone(),
        users(30),
        4,
        100.0,
        before.clone(),
        stop.clone(),
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    rig.redis.restart();
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.cancel();
    load_before.await.unwrap();
    // Users first seen after the restart.
    let after = Ledger::default();
    let stop = CancellationToken::new();
    let load_after = load(
        urls.clone(),
        live,
        users(30),
        4,
        100.0,
        after.clone(),
        stop.clone(),
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    load_after.await.unwrap();
    let off = converge(&reader, &after, Duration::from_secs(20)).await;
    assert!(
        off.is_empty(),
        "after the restart, counts differ: {:?}",
        &off[..off.len().min(5)]
    );
    // Before it: what was lost is reported; nothing is counted twice. A fail-open answer
    // whose Redis call ran after all (on the restarted Redis) is counted as Redis decided
    // it, allowed for blocked or the reverse (the README's "Fail-open answers in doubt"):
    // a shift, with the user's total exact, that the limiters report.
    let seen = before.snapshot();
    let (mut lost, mut twice, mut shifted) = (0, 0, 0);
    let degraded: u64 = seen.values().map(|s| s.degraded).sum();
    for (user, s) in &seen {
        let got = reader.get(user).await.unwrap();
        let answered = s.allowed + s.blocked;
        lost += answered.saturating_sub(got.total);
        twice += got.total.saturating_sub(answered);
        if got.total == answered {
            shifted += got.allowed.abs_diff(s.allowed);
        }
        if (got.allowed, got.blocked) != (s.allowed, s.blocked) {
            eprintln!("{user}: answered {s:?}, counted {got:?}");
        }
    }
    let otherwise = recorded_otherwise(&urls).await;
    eprintln!(
        "before the restart: {} answered, {lost} not counted (the outbox's part Redis lost), \
         {twice} counted twice, {shifted} counted as Redis decided them (the limiters report \
         {otherwise}), {degraded} answered by the fail-open fallback",
        before.answered()
    );
    assert!(
        shifted <= otherwise.min(degraded),
        "{shifted} shifted, {otherwise} reported, {degraded} answered by the fallback"
    );
    // None counted twice. Before the relays checked their lease on every read, two relays
    // sent the same entries after the restart and the worker counted duplicates within a
    // batch (9 to 49 here); before fail-open events were held until settled, a decision
    // Redis ran after its limiter gave up waiting was counted twice.
    assert_eq!(
        twice, 0,
        "counted twice ({degraded} decisions were made while Redis was away)"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while rig.outbox_size().await != (0, 0) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        rig.outbox_size().await,
        (0, 0),
        "outbox drained and trimmed"
    );
    worker.stop().await;
}

/// Waits (at most `within`) until the relays hold the outbox's streams as `shares` (how
/// many each holds, in any order), and returns how long it took.
async fn await_shares(rig: &Rig, shares: &[usize], within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let mut held: Vec<usize> = rig.lease_holders().await.into_values().collect();
        held.sort_unstable();
        if held == shares {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "after {within:?} the relays hold {held:?} streams each, not {shares:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The relaying is shared: two limiters hold eight streams each (the first one up took
/// all sixteen), a third brings it to 6/6/4 (a share is rounded up), and when one is killed the survivors take
/// its streams after its lease (1 s here); one stopped gives its streams back at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_limiters_share_the_relaying() {
    let _serial = SERIAL.lock().await;
    let rig = Rig::new(true);
    let a = rig.limiter("limiter-a");
    await_shares(&rig, &[16], Duration::from_secs(10)).await;
    let mut b = rig.limiter("limiter-b");
    let took = await_shares(&rig, &[8, 8], Duration::from_secs(5)).await;
    eprintln!("two relays share the streams {took:?} after the second started");
    let mut c = rig.limiter("limiter-c");
    await_shares(&rig, &[4, 6, 6], Duration::from_secs(5)).await;
    c.kill();
    let took = await_shares(&rig, &[8, 8], Duration::from_secs(5)).await;
    eprintln!("a killed relay's streams taken {took:?} after the kill");
    assert!(b.terminate(Duration::from_secs(10)), "limiter b stopped");
    let took = await_shares(&rig, &[16], Duration::from_secs(3)).await;
    eprintln!("a stopped relay's streams taken {took:?} after it stopped");
    drop(a);
}

/// Defect: a gateway whose limiter died after deciding a batch but before answering asks
/// the next replica, which decided it again: one answer, two decisions (a token spent
/// twice) and two events. A batch carries an id (the gateway's), which is the same on
/// the retry, marked `again`: a replica that finds the batch's checks already decided
/// under it answers from that decision, spending nothing and recording nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_asked_again_of_another_replica_is_decided_once() {
    let _serial = SERIAL.lock().await;
    let mut rig = Rig::new(true);
    // No refill to speak of between the calls.
    rig.extra
        .push(("RATE_LIMIT_REFILL_PER_SEC", "0.001".into()));
    let limiters = [rig.limiter("limiter-a"), rig.limiter("limiter-b")];
    // Nothing relayed (and so trimmed) while the outbox is read below: the relay trims what
    // the broker acknowledged, and would take the batch's events away before the count.
    rig.broker.freeze(true);
    let user = unique("retried");
    let other = unique("other");
    let body = serde_json::json!({
        "id": unique("gw"),
        "checks": [{"user_id": user, "cost": 2}, {"user_id": other}],
    });
    let client = reqwest::Client::new();
    let post = async |url: String, body: serde_json::Value| -> serde_json::Value {
        let sent = client.post(url).json(&body).send().await.unwrap();
        sent.json().await.unwrap()
    };
    let mut answers = Vec::new();
    for (n, limiter) in limiters.iter().enumerate() {
        // Sent again to the second, as the gateway does.
        let mut body = body.clone();
        body["again"] = (n > 0).into();
        let answer = post(format!("{}/check/batch", limiter.url()), body).await;
        answers.push(answer["results"].clone());
    }
    assert_eq!(
        answers[0], answers[1],
        "the second replica answers as the first decided"
    );
    assert_eq!(answers[0][0]["ok"]["remaining"], 3, "{answers:?}");
    // Decided once: the next check finds what one decision left.
    let next = post(
        format!("{}/check", limiters[1].url()),
        serde_json::json!({"user_id": user}),
    )
    .await;
    assert_eq!(next["remaining"], 2, "{next}");
    // One event each for the batch's checks, and one for the last check.
    let mut conn = rig
        .redis()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let keys = rate_limiter::back::store::outbox::OutboxKeys::new(&rig.prefix, 1 << 20);
    let mut events: BTreeMap<String, usize> = BTreeMap::new();
    for held in rate_limiter::back::store::outbox::held_users(&mut conn, &keys).await {
        *events.entry(held).or_default() += 1;
    }
    assert_eq!(events.get(&user), Some(&2), "{events:?}");
    assert_eq!(events.get(&other), Some(&1), "{events:?}");
    // The same id with another question at a place: decided afresh, never given the
    // answer to the question first asked there.
    let third = unique("third");
    let answer = post(
        format!("{}/check/batch", limiters[0].url()),
        serde_json::json!({"id": body["id"], "again": true, "checks": [{"user_id": third}]}),
    )
    .await;
    assert_eq!(answer["results"][0]["ok"]["remaining"], 4, "{answer}");
    rig.broker.freeze(false);
}
