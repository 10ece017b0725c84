//! The rate-limiter service: decides each request against the limits its rules (or an
//! override) give it, in memory or in Redis, and publishes one event per decision.
//!
//! Three parts, as limitador-server groups its servers:
//! - [`front`]: the doors requests come in by: the HTTP API (`POST /check`,
//!   `/check/batch`, `/json`), the admin routes, Envoy's rate limit service and its quota
//!   service over gRPC.
//! - [`limiter`]: the decision itself, between the two: planning, the refusal cache, one
//!   store call per batch, counting and publishing.
//! - [`back`]: what the decision stands on: the bucket stores, the way to them (breaker,
//!   fail mode), the refusal cache, the rules and overrides in force, and the events'
//!   way out (Kafka, the outbox and its relay).
//!
//! This file wires them from the configuration ([`config`]): [`build`] makes the limiter,
//! [`run`] and [`run_grpc`] serve it, [`Standalone`] is the `rate-limiter` binary.

pub mod back;
pub mod config;
pub mod front;
pub mod limiter;

use std::sync::Arc;
use std::time::Duration;

use domain::{Clock, SystemClock};
use kit::config::{KafkaArgs, RedisSettings};
use kit::http::ServeLimits;
use kit::stream::{self, ChannelReceiver, EventPublisher};
use tokio_util::sync::CancellationToken;

use crate::back::breaker::Breaker;
use crate::back::store::{BucketStore, MemoryStore, RedisStore};
use crate::config::{LimiterArgs, ResponseHeaders};
use crate::limiter::{Limiter, Parts};

/// Why a build without the `kafka` feature refuses `KAFKA_BROKERS`.
pub const NO_KAFKA: &str = "KAFKA_BROKERS is set, but this binary was built without Kafka support: \
build it with `--features kafka` (cargo build --release --workspace does), or unset KAFKA_BROKERS";

/// How often the memory stores forget buckets that have refilled completely.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// How long a shutdown waits for the event publisher to deliver what it holds.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(10);

/// Builds the limiter the configuration asks for: buckets in Redis when `REDIS_URL` is set
/// (else memory); events to Kafka when `KAFKA_BROKERS` is set, else to an in-process
/// channel whose receiving end is returned for an in-process worker.
pub async fn build(
    args: &LimiterArgs,
    redis: &RedisSettings,
    kafka: &KafkaArgs,
    instance_id: String,
    shutdown: &CancellationToken,
) -> anyhow::Result<(Arc<Limiter>, Option<ChannelReceiver>)> {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let policy = args.policy.policy().map_err(anyhow::Error::msg)?;
    let overrides = match &redis.buckets {
        Some(endpoint) => {
            let timeout = redis.timeout;
            let conn = kit::redis::connect(endpoint, timeout.max(Duration::from_millis(500)))?;
            let overrides = Arc::new(back::overrides::Overrides::in_redis(
                conn,
                &redis.key_prefix,
                timeout,
            ));
            overrides.spawn_poller(shutdown.clone());
            overrides
        }
        None => Arc::new(back::overrides::Overrides::in_memory()),
    };
    let mut outbox = false;
    let store: Arc<dyn BucketStore> = match &redis.buckets {
        Some(endpoint) => {
            let store = RedisStore::new(endpoint, &redis.key_prefix, policy, redis.timeout)?
                .with_idempotent_retry(redis.idempotent_retry);
            let store = Arc::new(outboxed(store, args, redis, kafka, &instance_id, shutdown)?);
            outbox = store.outbox().is_some();
            // Connect and load the script before serving, so the first requests do not pay
            // for it; a Redis that is down now is not fatal (the fail mode applies). The
            // error says why: unreachable, or refusing the credentials or the certificates.
            if let Err(err) = store.preload().await {
                tracing::warn!(error = %err, "redis not usable at start-up; will keep trying per request");
            }
            store
        }
        None => {
            let store = Arc::new(MemoryStore::new(policy, clock.clone()));
            store.spawn_sweeper(SWEEP_INTERVAL, shutdown.clone());
            store
        }
    };
    let fallback = Arc::new(MemoryStore::new(policy, clock.clone()));
    // A fixed share when the operator gives one; else 1 until the live limiters' reports
    // say how many there are (see `Standalone::start`).
    fallback.set_parts(args.fail_open_instances.unwrap_or(1));
    fallback.spawn_sweeper(SWEEP_INTERVAL, shutdown.clone());
    let (publisher, events): (Arc<dyn EventPublisher>, _) = match kafka.brokers() {
        #[cfg(feature = "kafka")]
        Some(brokers) => {
            kit::kafka::ensure_topic(kafka, brokers, shutdown.clone());
            (
                Arc::new(back::kafka::KafkaPublisher::new(kafka, brokers)?),
                None,
            )
        }
        #[cfg(not(feature = "kafka"))]
        Some(_) => anyhow::bail!("{NO_KAFKA}"),
        None => {
            let (tx, rx) = stream::channel(args.event_buffer as usize);
            (Arc::new(tx), Some(rx))
        }
    };
    let rules = match &args.rules_path {
        Some(path) => {
            let rules = Arc::new(back::rules::Rules::load(
                path,
                policy,
                args.rules_allow_empty,
            )?);
            rules.spawn_watcher(path.clone(), shutdown.clone());
            tracing::info!(path = %path.display(), "rules loaded");
            rules
        }
        None => Arc::new(back::rules::Rules::builtin(policy)),
    };
    let refusal_cache = if store.is_remote() {
        args.refusal_cache_entries as usize
    } else {
        0
    };
    let limiter = Limiter::new(Parts {
        store,
        fallback,
        fail_mode: args.fail_mode,
        breaker: Breaker::new(args.breaker_failures, args.breaker_open(), clock.clone()),
        publisher,
        clock,
        instance_id,
    })
    .with_rules(rules)
    .with_overrides(overrides)
    .with_refusal_cache(refusal_cache)
    .with_outbox(outbox);
    Ok((Arc::new(limiter), events))
}

/// `store` with the events outbox and its relay running, when the settings ask for it
/// (`EVENTS_OUTBOX`, with Kafka, on one Redis); else `store` as it is, saying why.
#[cfg_attr(not(feature = "kafka"), allow(unused_variables))]
fn outboxed(
    store: RedisStore,
    args: &LimiterArgs,
    redis: &RedisSettings,
    kafka: &KafkaArgs,
    instance_id: &str,
    shutdown: &CancellationToken,
) -> anyhow::Result<RedisStore> {
    if !args.events_outbox {
        return Ok(store);
    }
    #[cfg(feature = "kafka")]
    if let Some(brokers) = kafka.brokers() {
        if store.connection().is_cluster() {
            tracing::info!(
                "events outbox: not available on Redis Cluster; events go from this limiter's memory to Kafka"
            );
            return Ok(store);
        }
        let keys = back::store::outbox::OutboxKeys::new(&redis.key_prefix, args.outbox_max_bytes);
        let store = store.with_outbox(keys.clone())?;
        back::relay::describe_metrics();
        back::relay::Relay::new(
            store.connection().clone(),
            keys,
            back::kafka::relay_producer(kafka, brokers)?,
            &kafka.topic,
            instance_id,
            Duration::from_millis(args.outbox_lease_ms),
            redis.timeout,
        )
        .spawn(shutdown.clone());
        tracing::info!("events outbox on: decisions' events ride in Redis, relayed to Kafka");
        return Ok(store);
    }
    Ok(store)
}

/// Serves the limiter's API on `listener` until `shutdown`, then finishes in-flight
/// requests (at most the grace period). Call [`flush`] once nothing decides any more.
pub async fn run(
    listener: tokio::net::TcpListener,
    limiter: Arc<Limiter>,
    limits: &ServeLimits,
    admin_token: Option<kit::admin::AdminToken>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    run_with(
        listener,
        limiter,
        limits,
        admin_token,
        ResponseHeaders::default(),
        shutdown,
    )
    .await
}

/// [`run`], with `POST /json` answering with the given header fields.
pub async fn run_with(
    listener: tokio::net::TcpListener,
    limiter: Arc<Limiter>,
    limits: &ServeLimits,
    admin_token: Option<kit::admin::AdminToken>,
    headers: ResponseHeaders,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let limits = ServeLimits {
        grace: answer_grace(limits),
        ..*limits
    };
    let router = front::http::router_with(limiter.clone(), &limits, admin_token, headers);
    tracing::info!(addr = %listener.local_addr()?, "rate limiter listening");
    kit::http::serve(listener, router, shutdown, &limits).await
}

/// How long a stopping limiter lets in-flight requests finish: the configured grace, but
/// never less than a request can take (its body's deadline, then the request timeout, and
/// a little), because every request ends by then (decided, or answered 408 or 503). So a
/// request the limiter has read is always answered before the connection closes: a
/// gateway retries only a request that got no answer at all, and that one was never
/// decided here.
fn answer_grace(limits: &ServeLimits) -> Duration {
    limits
        .grace
        .max(limits.body_timeout + limits.request_timeout + Duration::from_millis(250))
}

/// Serves Envoy's rate limit service (gRPC) on `listener` until `shutdown`.
pub async fn run_grpc(
    listener: tokio::net::TcpListener,
    limiter: Arc<Limiter>,
    args: &LimiterArgs,
    grpc: &config::GrpcArgs,
    limits: &ServeLimits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let service = front::grpc::RateLimitService::new(limiter, grpc.response_headers);
    front::grpc::serve(
        listener,
        service,
        args.fail_mode,
        limits,
        grpc.grpc_threads,
        shutdown,
    )
    .await
    .map_err(std::io::Error::other)
}

/// Waits for the publisher to deliver what it holds (bounded), and logs the totals.
pub async fn flush(limiter: &Limiter) {
    let publisher = limiter.publisher();
    let flushed = publisher.flush(FLUSH_TIMEOUT).await;
    let stats = publisher.stats();
    tracing::info!(
        flushed,
        published = stats.published,
        dropped = stats.dropped,
        undelivered = stats.buffered,
        "event publisher flushed"
    );
}

/// How often the live limiters are counted for the fail-open share.
const INSTANCE_COUNT_INTERVAL: Duration = Duration::from_secs(2);

/// Keeps the fail-open share of the policy at `1 / live limiters`, from the reports every
/// limiter writes each second. While Redis is away the reports cannot be read and the last
/// count stands: the outage is when it matters.
fn spawn_instance_count(
    reports: kit::report::Reports,
    limiter: Arc<Limiter>,
    shutdown: CancellationToken,
) {
    tokio::spawn(async move {
        let mut every = kit::every::Every::new(INSTANCE_COUNT_INTERVAL, shutdown);
        while every.tick().await {
            if let Ok(live) = reports.read(kit::report::Role::Limiter).await
                && !live.is_empty()
            {
                limiter.set_fallback_parts(live.len() as u64);
            }
        }
    });
}

/// The standalone `rate-limiter` service: the limiter and, without Kafka, the worker that
/// counts its decisions in-process into the configured counter store.
pub struct Standalone {
    pub limiter: Arc<Limiter>,
    worker: Option<counters::SpawnedWorker>,
    admin_token: Option<kit::admin::AdminToken>,
    args: LimiterArgs,
    /// The gRPC port's settings; its response headers are the HTTP API's too.
    grpc: config::GrpcArgs,
}

impl Standalone {
    /// Builds the service `config` describes (see [`build`]).
    pub async fn start(
        config: &config::LimiterConfig,
        instance_id: String,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Self> {
        let redis = config.redis.resolve().map_err(anyhow::Error::msg)?;
        let (limiter, events) = build(
            &config.limiter,
            &redis,
            &config.kafka,
            instance_id.clone(),
            shutdown,
        )
        .await?;
        // For a standalone gateway's /status: this instance's decisions and events.
        if let Some(reports) = kit::report::Reports::from_settings(&redis)? {
            if config.limiter.fail_open_instances.is_none() {
                spawn_instance_count(reports.clone(), limiter.clone(), shutdown.clone());
            }
            let limiter = limiter.clone();
            reports.spawn_writer(
                kit::report::Role::Limiter,
                instance_id,
                move || limiter.report(),
                shutdown.clone(),
            );
        }
        let worker = match events {
            Some(events) => {
                let store = counters::counter_store(&redis, &config.worker)?;
                Some(counters::SpawnedWorker::in_process(
                    events,
                    store,
                    config.worker.batch_max as usize,
                ))
            }
            None => None,
        };
        Ok(Self {
            limiter,
            worker,
            admin_token: kit::admin::AdminToken::from_setting(config.admin_token.as_deref()),
            args: config.limiter.clone(),
            grpc: config.grpc.clone(),
        })
    }

    /// Serves the HTTP API until `shutdown`, then flushes the publisher and lets the
    /// worker count what is left.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        limits: &ServeLimits,
        shutdown: CancellationToken,
    ) -> std::io::Result<()> {
        self.serve_all(listener, None, limits, shutdown).await
    }

    /// [`Standalone::serve`], with Envoy's rate limit service on `grpc` when given.
    pub async fn serve_all(
        self,
        listener: tokio::net::TcpListener,
        grpc: Option<tokio::net::TcpListener>,
        limits: &ServeLimits,
        shutdown: CancellationToken,
    ) -> std::io::Result<()> {
        let http = run_with(
            listener,
            self.limiter.clone(),
            limits,
            self.admin_token.clone(),
            self.grpc.response_headers,
            shutdown.clone(),
        );
        let grpc = async {
            match grpc {
                Some(grpc) => {
                    run_grpc(
                        grpc,
                        self.limiter.clone(),
                        &self.args,
                        &self.grpc,
                        limits,
                        shutdown,
                    )
                    .await
                }
                None => Ok(()),
            }
        };
        let (served, grpc_served) = tokio::join!(http, grpc);
        flush(&self.limiter).await;
        if let Some(worker) = self.worker {
            worker.stop().await;
        }
        served.and(grpc_served)
    }
}
