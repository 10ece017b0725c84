//! The Redis plumbing both Redis stores share (buckets in the limiter, counters in the
//! worker): where Redis is and how to reach it ([`Endpoint`]: the URL, with any user and
//! password in it, single or Cluster, and for `rediss://` the certificates), one lazily
//! connecting, self-reconnecting connection to it, and calls under a deadline.
//!
//! TLS (`rediss://`) is the `tls` cargo feature (rustls, with the `ring` crypto provider:
//! no system library). A build without it refuses a `rediss://` URL ([`NO_TLS`]). AUTH
//! needs nothing here: the redis client sends the URL's user and password (`AUTH`, or
//! `HELLO`) on every connection it opens.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

/// Why a build without the `tls` feature refuses a `rediss://` URL.
pub const NO_TLS: &str = "REDIS_URL is a rediss:// (TLS) URL, but this binary was built without TLS support: \
build it with `--features tls` (cargo build --release --workspace does), or use a redis:// URL";

/// Why a Redis call gave no answer; each store maps it into its own error type.
#[derive(Debug, thiserror::Error)]
pub enum RedisCallError {
    #[error("redis call timed out")]
    Timeout,
    #[error("redis unavailable: {0}")]
    Failed(String),
    /// The Redis settings are not usable (read at start-up, before any call).
    #[error("{0}")]
    Config(String),
}

/// Where Redis is and how to reach it: the URL (`redis://` or `rediss://`, with any user
/// and password in it), whether it is a Cluster, and the certificates of a `rediss://`
/// connection. Made from the configuration by [`crate::config::RedisArgs::resolve`].
#[derive(Clone)]
pub struct Endpoint {
    url: String,
    cluster: bool,
    tls: Option<TlsFiles>,
}

impl Endpoint {
    /// A single Redis (or a proxy in front of several) at `url`; over `rediss://`, the
    /// system's root certificates are trusted.
    pub fn single(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            cluster: false,
            tls: None,
        }
    }

    /// A Redis Cluster reached through `nodes`, one or more of its nodes' URLs,
    /// comma-separated (any reachable one will do: the client learns the others from it).
    pub fn cluster(nodes: impl Into<String>) -> Self {
        Self {
            cluster: true,
            ..Self::single(nodes)
        }
    }

    /// The same, with `tls` for its `rediss://` connections.
    #[cfg(feature = "tls")]
    pub(crate) fn with_tls(self, tls: TlsFiles) -> Self {
        Self {
            tls: Some(tls),
            ..self
        }
    }

    /// Whether the URL (every node's, for a Cluster) asks for TLS.
    pub fn is_tls(&self) -> bool {
        self.nodes().any(is_tls_url)
    }

    fn nodes(&self) -> impl Iterator<Item = &str> {
        self.url.split(',').map(str::trim).filter(|n| !n.is_empty())
    }
}

/// Whether `url` is a TLS URL (`rediss://`, or Valkey's `valkeys://`).
pub fn is_tls_url(url: &str) -> bool {
    let url = url.trim_start();
    ["rediss://", "valkeys://"].iter().any(|scheme| {
        url.get(..scheme.len())
            .is_some_and(|s| s.eq_ignore_ascii_case(scheme))
    })
}

/// The certificates of a `rediss://` connection, as PEM, read from their files at start-up.
#[derive(Clone, Default)]
// Without the `tls` feature nothing reads them: the configuration refuses TLS first.
#[cfg_attr(not(feature = "tls"), allow(dead_code))]
pub(crate) struct TlsFiles {
    /// CA certificates trusted instead of the system's roots.
    pub(crate) ca: Option<Vec<u8>>,
    /// A client certificate (chain) and its private key, presented to a server that asks.
    pub(crate) client: Option<(Vec<u8>, Vec<u8>)>,
}

#[cfg(feature = "tls")]
impl TlsFiles {
    /// PEM certificates from `path`; an error says why there are none.
    pub(crate) fn read_certificates(path: &std::path::Path) -> Result<Vec<u8>, String> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let pem = read(path)?;
        let certificates = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|err| format!("{}: not PEM certificates: {err}", path.display()))?;
        if certificates.is_empty() {
            return Err(format!("{}: holds no PEM certificate", path.display()));
        }
        Ok(pem)
    }

    /// A PEM private key from `path`.
    pub(crate) fn read_key(path: &std::path::Path) -> Result<Vec<u8>, String> {
        use rustls::pki_types::PrivateKeyDer;
        use rustls::pki_types::pem::PemObject;
        let pem = read(path)?;
        PrivateKeyDer::from_pem_slice(&pem)
            .map_err(|err| format!("{}: no PEM private key: {err}", path.display()))?;
        Ok(pem)
    }

    fn certificates(&self) -> redis::TlsCertificates {
        redis::TlsCertificates {
            client_tls: self
                .client
                .as_ref()
                .map(|(cert, key)| redis::ClientTlsConfig {
                    client_cert: cert.clone(),
                    client_key: key.clone(),
                }),
            root_cert: self.ca.clone(),
        }
    }
}

#[cfg(feature = "tls")]
fn read(path: &std::path::Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|err| format!("{}: {err}", path.display()))
}

/// rustls's cryptography: `ring`, chosen here rather than left to whichever providers
/// the dependency graph happens to enable (with two, rustls would not pick).
#[cfg(feature = "tls")]
fn install_crypto_provider() {
    // Err: a provider is installed already (this one, or one the process chose).
    let _ = rustls::crypto::ring::default_provider().install_default();
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

/// A connection to `endpoint` whose responses time out after `timeout`. It connects
/// lazily and reconnects by itself, so it can be made while Redis is down; a TLS
/// handshake or an authentication that fails is a failed call, like an unreachable Redis.
pub fn connect(endpoint: &Endpoint, timeout: Duration) -> Result<Connection, RedisCallError> {
    let failed = |e: redis::RedisError| RedisCallError::Failed(e.to_string());
    if endpoint.is_tls() {
        #[cfg(not(feature = "tls"))]
        return Err(RedisCallError::Config(NO_TLS.into()));
        #[cfg(feature = "tls")]
        install_crypto_provider();
    }
    if endpoint.cluster {
        let builder = ClusterClient::builder(endpoint.nodes())
            .connection_timeout(timeout.max(Duration::from_millis(200)))
            .response_timeout(timeout * 5);
        #[cfg(feature = "tls")]
        let builder = match &endpoint.tls {
            Some(tls) => builder.certs(tls.certificates()),
            None => builder,
        };
        let client = builder.build().map_err(failed)?;
        return Ok(Connection::Cluster(Arc::new(LazyCluster {
            client,
            conn: tokio::sync::OnceCell::new(),
        })));
    }
    let client = match &endpoint.tls {
        #[cfg(feature = "tls")]
        Some(tls) => redis::Client::build_with_tls(endpoint.url.as_str(), tls.certificates()),
        _ => redis::Client::open(endpoint.url.as_str()),
    }
    .map_err(failed)?;
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
        Ok(Err(e)) => Err(RedisCallError::Failed(describe(&e))),
        Ok(Ok(v)) => Ok(v),
    }
}

/// What a failed call says, with where to look when Redis refused these credentials
/// (told by the error's kind and code, never its text). TLS failures speak for themselves
/// (rustls: `invalid peer certificate: UnknownIssuer`, `received fatal alert:
/// CertificateRequired`).
pub fn describe(err: &redis::RedisError) -> String {
    if err.kind() == redis::ErrorKind::AuthenticationFailed {
        format!("redis refused the user or password in REDIS_URL: {err}")
    } else if err.code() == Some("NOAUTH") {
        format!(
            "redis requires a password, or an ACL user, in REDIS_URL (redis://:PASSWORD@host, redis://USER:PASSWORD@host): {err}"
        )
    } else if err.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoPerm) {
        format!("the ACL user in REDIS_URL may not do this: {err}")
    } else {
        err.to_string()
    }
}

impl From<RedisCallError> for domain::store::StoreError {
    fn from(err: RedisCallError) -> Self {
        match err {
            RedisCallError::Timeout => Self::Timeout,
            RedisCallError::Failed(msg) | RedisCallError::Config(msg) => Self::Unavailable(msg),
        }
    }
}

impl From<RedisCallError> for domain::analytics::CounterError {
    fn from(err: RedisCallError) -> Self {
        match err {
            RedisCallError::Timeout => Self::Timeout,
            RedisCallError::Failed(msg) | RedisCallError::Config(msg) => Self::Unavailable(msg),
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
