//! The whole system in one process: the gateway (`:3000`), the rate limiter (`:8080`, and
//! Envoy's rate limit service over gRPC on `:8081`) and the analytics worker, with the same
//! APIs as the distributed form.
//!
//! This is the one crate that knows all three services: it composes them ([`System`]),
//! with an in-process limiter client and a status read from memory ([`local`]).
//!
//! By default everything is embedded (buckets and counters in memory, events through an
//! in-process channel); `REDIS_URL` moves buckets and counters to Redis and
//! `KAFKA_BROKERS` moves the event stream to Kafka, with no other change.

use std::net::SocketAddr;
use std::sync::Arc;

pub mod local;

use clap::Parser;
use counters::SpawnedWorker;
use counters::worker::WorkerStats;
use gateway::config::GatewayArgs;
use kit::config::{KafkaArgs, RedisArgs, ServeArgs, WorkerArgs};
use rate_limiter::config::{GrpcArgs, LimiterArgs};
use rate_limiter::limiter::Limiter;

use crate::local::{InProcessClient, LocalStatus};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The all-in-one binary's configuration: every service's settings in one place.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "distributed-rate-limiter",
    about = "Gateway, rate limiter and analytics worker in one process (embedded by default)",
    version
)]
pub struct Config {
    #[command(flatten)]
    pub gateway: GatewayArgs,
    #[arg(
        long = "limiter-port",
        env = "LIMITER_PORT",
        value_name = "LIMITER_PORT",
        default_value_t = 8080
    )]
    pub limiter_port: u16,
    /// Address the limiter's own HTTP API binds in this process. The gateway calls the
    /// limiter in-process, so the limiter's port (`POST /check/batch`, its `/metrics`) is
    /// internal: loopback unless told otherwise.
    #[arg(
        long = "limiter-bind-addr",
        env = "LIMITER_BIND_ADDR",
        value_name = "LIMITER_BIND_ADDR",
        default_value = "127.0.0.1"
    )]
    pub limiter_bind_addr: std::net::IpAddr,
    /// Envoy's rate limit service, on `LIMITER_BIND_ADDR` too.
    #[command(flatten)]
    pub grpc: GrpcArgs,
    #[command(flatten)]
    pub serve: ServeArgs,
    #[command(flatten)]
    pub limiter: LimiterArgs,
    #[command(flatten)]
    pub worker: WorkerArgs,
    #[command(flatten)]
    pub redis: RedisArgs,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// The gateway in front of a real service (`UPSTREAM_URL`).
    #[command(flatten)]
    pub upstream: gateway::config::UpstreamArgs,
}

/// The running system.
pub struct System {
    pub gateway_addr: SocketAddr,
    pub limiter_addr: SocketAddr,
    /// Envoy's rate limit service, when started with a listener for it.
    pub grpc_addr: Option<SocketAddr>,
    pub limiter: Arc<Limiter>,
    pub worker_stats: Arc<WorkerStats>,
    shutdown: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl System {
    /// Starts every part, serving on the given listeners, until `shutdown` (without
    /// Envoy's rate limit service: see [`System::start_with_grpc`]).
    pub async fn start(
        config: Config,
        gateway_listener: TcpListener,
        limiter_listener: TcpListener,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Self> {
        Self::start_with_grpc(config, gateway_listener, limiter_listener, None, shutdown).await
    }

    /// [`System::start`], with Envoy's rate limit service on `grpc_listener` when given.
    pub async fn start_with_grpc(
        config: Config,
        gateway_listener: TcpListener,
        limiter_listener: TcpListener,
        grpc_listener: Option<TcpListener>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Self> {
        let gateway_addr = gateway_listener.local_addr()?;
        let grpc_addr = grpc_listener
            .as_ref()
            .map(TcpListener::local_addr)
            .transpose()?;
        let limiter_addr = limiter_listener.local_addr()?;
        // First: a bad descriptors file stops the start before anything runs.
        let upstream = gateway::proxy::Upstream::from_args(&config.upstream)?.map(Arc::new);
        let redis = config.redis.resolve().map_err(anyhow::Error::msg)?;
        let (limiter, events) = rate_limiter::build(
            &config.limiter,
            &redis,
            &config.kafka,
            kit::runtime::instance_id(),
            &shutdown,
        )
        .await?;
        let counters = counters::counter_store(&redis, &config.worker)?;
        // What was built, as the status page names it.
        let stream_kind = if events.is_some() {
            "in-process"
        } else {
            "kafka"
        };
        let batch_max = config.worker.batch_max as usize;
        let worker = match (events, config.kafka.brokers()) {
            (Some(events), _) => SpawnedWorker::in_process(events, counters.clone(), batch_max),
            #[cfg(feature = "kafka")]
            (None, Some(brokers)) => {
                SpawnedWorker::kafka(&config.kafka, brokers, counters.clone(), batch_max)?
            }
            // Without the feature, `build` refused KAFKA_BROKERS already.
            (None, _) => unreachable!("without Kafka the limiter publishes in-process"),
        };
        let worker_stats = worker.stats.clone();
        let status = LocalStatus {
            limiter: limiter.clone(),
            worker: worker_stats.clone(),
            counters: counters.clone(),
            store_kind: if limiter.store_is_remote() {
                "redis"
            } else {
                "memory"
            },
            stream_kind,
        };
        let admin_token =
            gateway::admin::AdminToken::from_setting(config.gateway.admin_token.as_deref());
        let gateway = gateway::Gateway {
            limiter: Arc::new(InProcessClient::new(limiter.clone(), admin_token.clone())),
            analytics: counters,
            admin_token: admin_token.clone(),
            status: Arc::new(status),
            retention: config.worker.retention.retention,
        };
        let task = {
            let limiter = limiter.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let limits = config.serve.limits();
                let grpc = async {
                    match grpc_listener {
                        Some(listener) => {
                            rate_limiter::run_grpc(
                                listener,
                                limiter.clone(),
                                &config.limiter,
                                &config.grpc,
                                &limits,
                                shutdown.clone(),
                            )
                            .await
                        }
                        None => Ok(()),
                    }
                };
                let (g, l, e) = tokio::join!(
                    gateway::proxy::run(
                        gateway_listener,
                        gateway,
                        upstream,
                        &limits,
                        shutdown.clone()
                    ),
                    rate_limiter::run_with(
                        limiter_listener,
                        limiter.clone(),
                        &limits,
                        admin_token,
                        config.grpc.response_headers,
                        shutdown.clone()
                    ),
                    grpc,
                );
                // Nothing decides any more: deliver the last events, count them, stop.
                rate_limiter::flush(&limiter).await;
                worker.stop().await;
                g?;
                l?;
                e?;
                Ok(())
            })
        };
        Ok(Self {
            gateway_addr,
            limiter_addr,
            grpc_addr,
            limiter,
            worker_stats,
            shutdown,
            task,
        })
    }

    /// Waits until the system has stopped (after the shutdown signal).
    pub async fn wait(self) -> anyhow::Result<()> {
        self.task.await?
    }

    /// Stops the system gracefully and waits for it.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.wait().await
    }
}
