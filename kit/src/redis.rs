//! The Redis plumbing both Redis stores share (buckets in the limiter, counters in the
//! worker): one lazily connecting, self-reconnecting connection — to a single Redis, or to
//! a Redis Cluster — and calls under a deadline.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

/// Why a Redis call gave no answer; each store maps it into its own error type.
#[derive(Debug, thiserror::Error)]
pub enum RedisCallError {
    #[error("redis call timed out")]
    Timeout,
    #[error("redis unavailable: {0}")]
    Failed(String),
}

/// A connection the stores share, cheap to clone.
///
/// - `Single`: one multiplexed connection to one Redis (or a proxy in front of several);
///   a pipeline is one write and one round trip.
/// - `Cluster`: a Redis Cluster client that follows the slot map (`MOVED`/`ASK`), one
///   multiplexed connection per node. Redis refuses a pipeline whose keys live in different
///   slots, so a pipeline is sent as its commands, each to its key's node, all at once: the
///   same one round trip, but commands on different keys may run in any order. Every
///   script this system runs touches the keys of one hash tag only, so each command is
///   still atomic where it runs.
#[derive(Clone)]
pub enum Connection {
    Single(ConnectionManager),
    Cluster(Arc<LazyCluster>),
}

/// A cluster connection made on first use (and again after a failed attempt), so that a
/// service starts while the cluster is unreachable, as it does with a single Redis.
pub struct LazyCluster {
    client: ClusterClient,
    conn: tokio::sync::OnceCell<ClusterConnection>,
}

impl LazyCluster {
    async fn get(&self) -> redis::RedisResult<ClusterConnection> {
        self.conn
            .get_or_try_init(|| self.client.get_async_connection())
            .await
            .cloned()
    }
}

impl Connection {
    /// Whether this is a Redis Cluster connection.
    pub fn is_cluster(&self) -> bool {
        matches!(self, Connection::Cluster(_))
    }
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Single(conn) => conn.req_packed_command(cmd),
            Connection::Cluster(cluster) => {
                Box::pin(async move { cluster.get().await?.req_packed_command(cmd).await })
            }
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            Connection::Cluster(cluster) => Box::pin(async move {
                if pipeline.is_transaction() {
                    // MULTI/EXEC must stay on one node: the cluster client checks the slot.
                    return cluster
                        .get()
                        .await?
                        .req_packed_commands(pipeline, offset, count)
                        .await;
                }
                let mut conn = cluster.get().await?;
                // A pipeline within one slot (e.g. one user's keys) goes as it is, in order.
                match conn.req_packed_commands(pipeline, offset, count).await {
                    Err(err)
                        if err.kind()
                            == redis::ErrorKind::Server(redis::ServerErrorKind::CrossSlot) => {}
                    answered => return answered,
                }
                let answers = futures::future::join_all(pipeline.cmd_iter().map(|cmd| {
                    let mut conn = conn.clone();
                    async move { conn.req_packed_command(cmd).await }
                }))
                .await;
                answers
                    .into_iter()
                    .skip(offset)
                    .take(count)
                    .collect::<redis::RedisResult<Vec<Value>>>()
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(conn) => conn.get_db(),
            Connection::Cluster(_) => 0,
        }
    }
}

/// A connection to `url` whose responses time out after `timeout`. With `cluster`, `url`
/// lists one or more of the cluster's nodes, comma-separated (any reachable one will do:
/// the client learns the others from it). It connects lazily and reconnects by itself, so
/// it can be made while Redis is down.
pub fn connect(url: &str, cluster: bool, timeout: Duration) -> Result<Connection, RedisCallError> {
    let failed = |e: redis::RedisError| RedisCallError::Failed(e.to_string());
    if cluster {
        let nodes: Vec<&str> = url
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .collect();
        let client = ClusterClient::builder(nodes)
            .connection_timeout(timeout.max(Duration::from_millis(200)))
            .response_timeout(timeout * 5)
            .build()
            .map_err(failed)?;
        return Ok(Connection::Cluster(Arc::new(LazyCluster {
            client,
            conn: tokio::sync::OnceCell::new(),
        })));
    }
    let client = redis::Client::open(url).map_err(failed)?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout.max(Duration::from_millis(200))))
        // Each call has its own deadline (`with_deadline`); this only backs them up, and
        // must not cut short a batch, whose deadline grows with its size (up to 5 times).
        .set_response_timeout(Some(timeout * 5))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_millis(500));
    ConnectionManager::new_lazy_with_config(client, config)
        .map(Connection::Single)
        .map_err(failed)
}

/// Runs a Redis call under a deadline.
pub async fn with_deadline<T>(
    timeout: Duration,
    call: impl Future<Output = redis::RedisResult<T>>,
) -> Result<T, RedisCallError> {
    match tokio::time::timeout(timeout, call).await {
        Err(_) => Err(RedisCallError::Timeout),
        Ok(Err(e)) if e.is_timeout() => Err(RedisCallError::Timeout),
        Ok(Err(e)) => Err(RedisCallError::Failed(e.to_string())),
        Ok(Ok(v)) => Ok(v),
    }
}

impl From<RedisCallError> for ratelimit_domain::store::StoreError {
    fn from(err: RedisCallError) -> Self {
        match err {
            RedisCallError::Timeout => Self::Timeout,
            RedisCallError::Failed(msg) => Self::Unavailable(msg),
        }
    }
}

impl From<RedisCallError> for ratelimit_domain::analytics::CounterError {
    fn from(err: RedisCallError) -> Self {
        match err {
            RedisCallError::Timeout => Self::Timeout,
            RedisCallError::Failed(msg) => Self::Unavailable(msg),
        }
    }
}

/// The Lua scripts one store runs: loaded once (`SCRIPT LOAD`, before serving and again
/// whenever Redis answers `NOSCRIPT` after a restart or a `SCRIPT FLUSH`), then called by
/// hash with `EVALSHA`. Every store goes through this one loader and this one check
/// ([`is_noscript`]), by the error's kind, never its text.
pub struct Scripts {
    scripts: Vec<redis::Script>,
}

impl Scripts {
    /// The scripts `sources`, addressed by their position in it.
    pub fn new(sources: &[&str]) -> Self {
        Self {
            scripts: sources.iter().map(|s| redis::Script::new(s)).collect(),
        }
    }

    /// The SHA1 of script `i`, what `EVALSHA` takes.
    pub fn hash(&self, i: usize) -> &str {
        self.scripts[i].get_hash()
    }

    /// Script `i`, to build invocations of (`.key(..).arg(..)`, `Pipeline::invoke_script`).
    pub fn get(&self, i: usize) -> &redis::Script {
        &self.scripts[i]
    }

    /// Loads every script (on a Cluster, on every primary), under `timeout`.
    pub async fn load(&self, conn: &Connection, timeout: Duration) -> Result<(), RedisCallError> {
        let mut conn = conn.clone();
        for script in &self.scripts {
            let invocation = script.prepare_invoke();
            with_deadline(timeout, invocation.load_async(&mut conn)).await?;
        }
        Ok(())
    }

    /// Sends `pipe`, whose commands may be `EVALSHA`s of these scripts, under `timeout`.
    /// When Redis answers `NOSCRIPT`, loads the scripts and sends it once more: for
    /// pipelines whose repetition is harmless (each script checks what it already did).
    pub async fn query_idempotent<T: redis::FromRedisValue>(
        &self,
        conn: &Connection,
        pipe: &Pipeline,
        timeout: Duration,
    ) -> Result<T, RedisCallError> {
        let mut c = conn.clone();
        match tokio::time::timeout(timeout, pipe.query_async::<T>(&mut c)).await {
            Err(_) => Err(RedisCallError::Timeout),
            Ok(Err(err)) if is_noscript(&err) => {
                self.load(conn, timeout).await?;
                with_deadline(timeout, pipe.query_async(&mut c)).await
            }
            Ok(answer) => with_deadline(timeout, std::future::ready(answer)).await,
        }
    }
}

/// Whether Redis refused a call because it does not have the script (`NOSCRIPT`).
pub fn is_noscript(err: &redis::RedisError) -> bool {
    err.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
}
