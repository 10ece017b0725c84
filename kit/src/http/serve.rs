//! The server: HTTP/1.1 on a listener, each connection held to [`ServeLimits`], and a
//! graceful shutdown. Two roles, as mini-redis names them: the `Listener` accepts
//! connections under the cap; a `Handler` serves one connection until it closes or the
//! grace period ends.

use std::sync::Arc;
use std::time::Duration;

use std::convert::Infallible;

use axum::http::Request;
use hyper::body::Incoming;
use tower::Service;

/// What one client may hold of a service, and for how long (from
/// [`ServeArgs::limits`](crate::config::ServeArgs::limits)).
#[derive(Debug, Clone, Copy)]
pub struct ServeLimits {
    /// Requests worked on at once (every route but the liveness probe); past it, 429.
    pub max_in_flight: usize,
    /// A request running longer is answered 503.
    pub request_timeout: Duration,
    /// A request's head must be in this long after the server starts waiting for it: on a
    /// new connection, and between the requests of a kept-alive one (hyper starts the
    /// clock as soon as it waits for a head), so it also closes idle connections.
    pub header_timeout: Duration,
    /// A request's body must be in this long after its head; else 408.
    pub body_timeout: Duration,
    /// A write to the client that makes no progress this long closes the connection.
    pub send_timeout: Duration,
    /// Open connections at once; past it a new connection is closed at once.
    pub max_connections: usize,
    /// After shutdown, how long requests in flight get to finish.
    pub grace: Duration,
}

/// Serves `router` over HTTP/1.1 on `listener` until `shutdown`, then stops accepting,
/// lets requests in flight finish for at most `limits.grace`, and drops what is left.
///
/// Each connection is held to `limits`: its request heads must arrive within
/// `header_timeout` (which also closes a kept-alive connection idle that long), its
/// writes must progress within `send_timeout`, and at most `max_connections` are open at
/// once: past the cap a new connection is accepted and closed at once, without reading
/// it (counted in `http_connections_refused_total`), so the listen queue never fills
/// with clients that would wait in vain.
///
/// HTTP/1.1 only: every client of these services speaks it, and hyper's HTTP/2 server
/// has no header timeout (nor has the version sniffing of its auto builder).
///
/// `router` is a [`Router`](axum::Router), or a service's routes behind their guards
/// ([`super::Guarded`], from [`super::with_guards`]).
pub async fn serve<S>(
    listener: tokio::net::TcpListener,
    router: S,
    shutdown: tokio_util::sync::CancellationToken,
    limits: &ServeLimits,
) -> std::io::Result<()>
where
    S: HttpService,
{
    let listener = Listener::new(listener, router, limits)?;
    let Listener {
        graceful, abandon, ..
    } = listener.run(&shutdown).await;
    tokio::select! {
        () = graceful.shutdown() => tracing::debug!("every connection closed"),
        () = tokio::time::sleep(limits.grace) => {
            tracing::warn!(grace_ms = limits.grace.as_millis() as u64, "grace period over; dropping unfinished requests");
            abandon.cancel();
        }
    }
    Ok(())
}

/// What [`serve()`] can serve: a service of HTTP requests as hyper hands them over.
pub trait HttpService:
    Service<
        Request<Incoming>,
        Response = axum::response::Response,
        Error = Infallible,
        Future: Send + 'static,
    > + Clone
    + Send
    + Sync
    + 'static
{
}

impl<S> HttpService for S where
    S: Service<
            Request<Incoming>,
            Response = axum::response::Response,
            Error = Infallible,
            Future: Send + 'static,
        > + Clone
        + Send
        + Sync
        + 'static
{
}

/// Accepts connections under the cap and hands each to a [`Handler`].
struct Listener<S> {
    listener: tokio::net::TcpListener,
    local: String,
    router: S,
    http: hyper::server::conn::http1::Builder,
    send_timeout: Duration,
    slots: Arc<tokio::sync::Semaphore>,
    /// Watches every connection, to wait for them after shutdown.
    graceful: hyper_util::server::graceful::GracefulShutdown,
    /// Cancelled when the grace period is over: connections still open are dropped.
    abandon: tokio_util::sync::CancellationToken,
}

impl<S: HttpService> Listener<S> {
    fn new(
        listener: tokio::net::TcpListener,
        router: S,
        limits: &ServeLimits,
    ) -> std::io::Result<Self> {
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .keep_alive(true);
        Ok(Self {
            local: listener.local_addr()?.to_string(),
            listener,
            router,
            http,
            send_timeout: limits.send_timeout,
            slots: Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1))),
            graceful: hyper_util::server::graceful::GracefulShutdown::new(),
            abandon: tokio_util::sync::CancellationToken::new(),
        })
    }

    /// Accepts until `shutdown`, then stops listening; returns what waits for the
    /// connections still open.
    async fn run(self, shutdown: &tokio_util::sync::CancellationToken) -> Self {
        loop {
            let (stream, peer) = tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                accepted = self.listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        accept_failed(err, shutdown).await;
                        continue;
                    }
                },
            };
            let Some(slot) = ConnectionSlot::take(&self.slots, &self.local) else {
                tracing::debug!(%peer, "connection cap reached; closing a new connection");
                drop(stream);
                continue;
            };
            Handler {
                slot,
                peer,
                abandon: self.abandon.clone(),
            }
            .spawn(self.serve_connection(stream, peer));
        }
        self
    }

    /// The HTTP/1.1 connection over `stream`, its writes held to the send timeout, each
    /// request knowing its client's address (`ConnectInfo`, for the gateway's proxy's
    /// `remote_address` descriptors), watched for the graceful shutdown.
    fn serve_connection(
        &self,
        stream: tokio::net::TcpStream,
        peer: std::net::SocketAddr,
    ) -> impl std::future::Future<Output = Result<(), hyper::Error>> + Send + 'static {
        use hyper_util::rt::TokioIo;
        use hyper_util::service::TowerToHyperService;
        let mut io = tokio_io_timeout::TimeoutStream::new(stream);
        io.set_write_timeout(Some(self.send_timeout));
        let io = TokioIo::new(Box::pin(io));
        let service = tower::Layer::layer(
            &axum::Extension(axum::extract::ConnectInfo(peer)),
            self.router.clone(),
        );
        self.graceful.watch(
            self.http
                .serve_connection(io, TowerToHyperService::new(service)),
        )
    }
}

/// Serves one connection until it closes, or until the grace period after shutdown is
/// over; its slot under the cap is given back however that ends.
struct Handler {
    slot: ConnectionSlot,
    peer: std::net::SocketAddr,
    abandon: tokio_util::sync::CancellationToken,
}

impl Handler {
    fn spawn(
        self,
        connection: impl std::future::Future<Output = Result<(), hyper::Error>> + Send + 'static,
    ) {
        tokio::spawn(async move {
            // Given back however this task ends: done, failed, or dropped.
            let Handler {
                slot: _slot,
                peer,
                abandon,
            } = self;
            tokio::select! {
                result = connection => {
                    if let Err(err) = result {
                        tracing::debug!(%peer, error = %err, "connection closed on an error");
                    }
                }
                () = abandon.cancelled() => {}
            }
        });
    }
}

/// One open connection's place under the cap, and in the `http_connections_open` gauge;
/// both given back on drop.
struct ConnectionSlot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    gauge: metrics::Gauge,
}

impl ConnectionSlot {
    /// A slot, or `None` (counted) when every one is taken.
    fn take(slots: &Arc<tokio::sync::Semaphore>, local: &str) -> Option<Self> {
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            metrics::counter!("http_connections_refused_total", "addr" => local.to_owned())
                .increment(1);
            return None;
        };
        let gauge = metrics::gauge!("http_connections_open", "addr" => local.to_owned());
        gauge.increment(1);
        Some(Self {
            _permit: permit,
            gauge,
        })
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.gauge.decrement(1);
    }
}

/// An `accept` that failed: a connection reset before it was accepted is the client's
/// business; anything else (out of file descriptors, mostly) is logged, and accepting
/// pauses a little rather than spin.
async fn accept_failed(err: std::io::Error, shutdown: &tokio_util::sync::CancellationToken) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        err.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %err, "accept failed; pausing for 100 ms");
    tokio::select! {
        () = shutdown.cancelled() => {}
        () = tokio::time::sleep(Duration::from_millis(100)) => {}
    }
}
