//! The gateway in front of a real service (`UPSTREAM_URL`): every request that is not one
//! of the gateway's own routes is turned into descriptors ([`crate::actions`]), checked at
//! the limiter (cost 1) and, when allowed, forwarded to the upstream; the upstream's answer
//! goes back with the rate-limit headers. A refused request gets the 429 of `POST /api` and
//! never reaches the upstream.
//!
//! - [`Upstream`]: the upstream, its pooled client and the descriptor actions.
//! - [`router`]: the gateway's own routes beside the proxy.
//! - [`run`]: serves that router, handing each request its client's address.
//!
//! Bodies stream through in both directions, frame by frame, never buffered whole; each
//! direction is cut when it makes no progress for a while (the request body:
//! `BODY_TIMEOUT_MS`, the response body: `UPSTREAM_TIMEOUT_MS`). Hop-by-hop headers are
//! removed both ways (RFC 9110 §7.6.1), `X-Forwarded-For`, `X-Forwarded-Proto` and
//! `Forwarded` are added; the client's `Host` is passed on unchanged (as Envoy, Caddy and
//! Traefik do by default), so the upstream sees the name the client asked for.
//!
//! Proxied requests bypass the body buffering of the gateway's own routes (a 4 KiB limit
//! is right for `POST /api`, not for a service's uploads) and have their own bound on
//! requests in flight (`MAX_IN_FLIGHT`, until the upstream's response headers).

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::error_handling::HandleErrorLayer;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::uri::{Authority, PathAndQuery, Scheme};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri, Version, header};
use axum::response::{IntoResponse, Response};
use domain::api::{CheckRequest, ErrorBody, analytics_identity};
use hyper::body::{Body as _, Frame, SizeHint};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use kit::http::{ApiError, ServeLimits};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tower::{ServiceBuilder, ServiceExt};

use crate::actions::{DescriptorActions, RequestFacts};
use crate::answer::{limited, rate_limit_headers};
use crate::config::UpstreamArgs;
use crate::http::Gateway;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Idle connections kept to the upstream, and for how long.
const POOL_MAX_IDLE: usize = 256;
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// The service behind the gateway.
pub struct Upstream {
    scheme: Scheme,
    authority: Authority,
    /// The URL's path without its trailing `/`, put before every forwarded path.
    prefix: String,
    // hyper-util's legacy client rather than reqwest: request and response bodies pass
    // through as hyper bodies, frame by frame, with no conversion; headers go out exactly as
    // given (reqwest adds `Accept` and would follow redirects, which a proxy must pass
    // back); and it pools connections per host all the same.
    client: Client<HttpConnector, IdleTimeoutBody<Body>>,
    timeout: Duration,
    actions: DescriptorActions,
    trust_forwarded_for: bool,
}

impl Upstream {
    /// The upstream of `args`, or None without `UPSTREAM_URL`. A bad URL or descriptors
    /// file is refused with a message naming the setting (and the file, line and field).
    pub fn from_args(args: &UpstreamArgs) -> anyhow::Result<Option<Self>> {
        let Some(url) = &args.upstream_url else {
            if args.upstream_descriptors_path.is_some() {
                anyhow::bail!("UPSTREAM_DESCRIPTORS_PATH is set without UPSTREAM_URL");
            }
            return Ok(None);
        };
        let invalid = |why: &str| anyhow::anyhow!("UPSTREAM_URL is invalid: {url:?}; {why}");
        let uri: Uri = url
            .parse()
            .map_err(|_| invalid("must be an http:// URL, e.g. http://127.0.0.1:9000"))?;
        if uri.scheme() != Some(&Scheme::HTTP) {
            return Err(invalid(
                "must be an http:// URL (https to the upstream is not supported)",
            ));
        }
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| invalid("must name a host"))?;
        if uri.query().is_some() {
            return Err(invalid("must not have a query"));
        }
        let actions = match &args.upstream_descriptors_path {
            Some(path) => DescriptorActions::load(path)
                .map_err(|e| anyhow::anyhow!("UPSTREAM_DESCRIPTORS_PATH: {e}"))?,
            None => DescriptorActions::default(),
        };
        let timeout = args.timeout();
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(POOL_MAX_IDLE)
            .build(connector);
        Ok(Some(Self {
            scheme: Scheme::HTTP,
            authority,
            prefix: uri.path().trim_end_matches('/').to_owned(),
            client,
            timeout,
            actions,
            trust_forwarded_for: args.trust_forwarded_for,
        }))
    }
}

/// What the proxy's handler shares.
struct Proxy {
    gateway: Gateway,
    upstream: Arc<Upstream>,
    /// Longest pause inside a request body.
    body_timeout: Duration,
}

/// The gateway's own routes ([`crate::http::router`]) and, for every other path, the proxy
/// to `upstream`.
pub fn router(gateway: Gateway, upstream: Arc<Upstream>, limits: &ServeLimits) -> Router {
    metrics::describe_counter!(
        "gateway_proxy_requests_total",
        "Requests to the upstream's paths, by outcome: forwarded, limited, invalid, unavailable, bad_gateway, timeout, body_timeout"
    );
    let own = crate::http::router(gateway.clone(), limits);
    let proxy = Arc::new(Proxy {
        gateway,
        upstream,
        body_timeout: limits.body_timeout,
    });
    let proxied = ServiceBuilder::new()
        .layer(HandleErrorLayer::new(|_: tower::BoxError| async {
            ApiError::Overloaded
        }))
        .load_shed()
        .concurrency_limit(limits.max_in_flight.max(1))
        .service(Router::new().fallback(forward).with_state(proxy));
    let proxied = Router::new().fallback_service(proxied);
    let dispatch = tower::service_fn(move |mut request: Request| {
        // One resource, one path: for the rules, the routing and the upstream alike.
        crate::path::normalize_request(&mut request);
        let target = if crate::http::is_own_route(request.uri().path()) {
            tower::util::Either::Left(own.clone())
        } else {
            tower::util::Either::Right(proxied.clone())
        };
        target.oneshot(request)
    });
    Router::new().fallback_service(dispatch)
}

async fn forward(State(proxy): State<Arc<Proxy>>, request: Request) -> Response {
    let (outcome, response) = proxy.forward(request).await;
    metrics::counter!("gateway_proxy_requests_total", "outcome" => outcome).increment(1);
    response
}

impl Proxy {
    async fn forward(&self, request: Request) -> (&'static str, Response) {
        let upstream = &self.upstream;
        let peer = request
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map_or(IpAddr::from([0, 0, 0, 0]), |c| c.0.ip().to_canonical());
        let client = if upstream.trust_forwarded_for {
            last_forwarded_for(request.headers()).unwrap_or(peer)
        } else {
            peer
        };
        let facts = RequestFacts {
            method: request.method(),
            path: request.uri().path(),
            headers: request.headers(),
            client,
        };
        let descriptors = match upstream.actions.descriptors(&facts) {
            Ok(d) => d,
            Err(e) => return ("invalid", ApiError::from(e).into_response()),
        };
        let mut limit_headers = HeaderMap::new();
        if descriptors.is_empty() {
            tracing::debug!(
                path = facts.path,
                "no descriptor for this request; forwarded unlimited"
            );
        } else {
            let check = CheckRequest {
                user_id: analytics_identity(&descriptors),
                domain: upstream.actions.domain().to_owned(),
                descriptors,
                cost: 1,
            };
            let decision = match self.gateway.limiter.check(&check).await {
                Ok(d) => d,
                Err(e) => return ("unavailable", ApiError::from(e).into_response()),
            };
            limit_headers = rate_limit_headers(&decision);
            if !decision.allowed {
                let response = limited(&decision, &check.user_id, request.headers(), limit_headers);
                drain_in_background(request, self.body_timeout);
                return ("limited", response);
            }
        }
        self.send(request, peer, limit_headers).await
    }

    /// Forwards an allowed request and passes the answer back.
    async fn send(
        &self,
        request: Request,
        peer: IpAddr,
        limit_headers: HeaderMap,
    ) -> (&'static str, Response) {
        let upstream = &self.upstream;
        let (mut parts, body) = request.into_parts();
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let Ok(path) = PathAndQuery::try_from(format!("{}{path}", upstream.prefix)) else {
            return (
                "invalid",
                ApiError::from(domain::api::FieldError::new("path", "is not valid"))
                    .into_response(),
            );
        };
        parts.uri = Uri::from_parts({
            let mut uri = axum::http::uri::Parts::default();
            uri.scheme = Some(upstream.scheme.clone());
            uri.authority = Some(upstream.authority.clone());
            uri.path_and_query = Some(path);
            uri
        })
        .expect("scheme, authority and path make a URI");
        parts.version = Version::HTTP_11;
        strip_hop_by_hop(&mut parts.headers);
        // Answered at this hop: hyper sent `100 Continue` when the body was first read.
        parts.headers.remove(header::EXPECT);
        add_forwarding(&mut parts.headers, peer, upstream.trust_forwarded_for);

        // The upstream's deadline runs from when the request has been sent in full: an
        // upload takes as long as it takes, as long as it never pauses past the body timeout.
        let sent = Arc::new(Notify::new());
        let mut body_done = body.is_end_stream();
        let body =
            IdleTimeoutBody::new(body, self.body_timeout, (!body_done).then(|| sent.clone()));
        let response = upstream
            .client
            .request(axum::http::Request::from_parts(parts, body));
        let mut response = std::pin::pin!(response);
        let mut deadline = tokio::time::Instant::now() + upstream.timeout;
        let result = loop {
            tokio::select! {
                result = &mut response => break result,
                () = sent.notified(), if !body_done => {
                    body_done = true;
                    deadline = tokio::time::Instant::now() + upstream.timeout;
                }
                () = tokio::time::sleep_until(deadline) => {
                    if body_done {
                        tracing::warn!(timeout_ms = upstream.timeout.as_millis() as u64, "the upstream did not answer in time");
                        return ("timeout", gateway_timeout(upstream.timeout));
                    }
                    deadline = tokio::time::Instant::now() + upstream.timeout;
                }
            }
        };
        let response = match result {
            Ok(response) => response,
            Err(err) => {
                if caused_by::<BodyStalled>(&err) {
                    return (
                        "body_timeout",
                        ApiError::BodyTimeout(self.body_timeout).into_response(),
                    );
                }
                tracing::warn!(error = %err, source = ?std::error::Error::source(&err), "the upstream could not be reached");
                return ("bad_gateway", bad_gateway());
            }
        };
        let (mut parts, body) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        for (name, value) in &limit_headers {
            parts.headers.insert(name, value.clone());
        }
        let body = Body::new(IdleTimeoutBody::new(body, upstream.timeout, None));
        ("forwarded", Response::from_parts(parts, body))
    }
}

/// Whether `err` or one of its sources is an `E`.
fn caused_by<E: std::error::Error + 'static>(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(err);
    while let Some(e) = current {
        if e.is::<E>() {
            return true;
        }
        current = e.source();
    }
    false
}

/// The last valid address of `X-Forwarded-For`: the one the proxy in front appended.
fn last_forwarded_for(headers: &HeaderMap) -> Option<IpAddr> {
    let last = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .rfind(|s| !s.is_empty())?;
    last.parse::<IpAddr>().ok().map(|ip| ip.to_canonical())
}

/// The headers of one connection only, which a proxy never forwards: those `Connection`
/// names, and the standard ones.
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes the hop-by-hop headers: those named by `Connection`, the standard ones, and
/// every `Proxy-*` header.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(&HOP_BY_HOP) {
        headers.remove(name);
    }
    let proxy: Vec<HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().starts_with("proxy-"))
        .cloned()
        .collect();
    for name in proxy {
        headers.remove(name);
    }
}

/// Appends this hop to `X-Forwarded-For` and `Forwarded`, and sets `X-Forwarded-Proto`
/// (an incoming one is kept only when the proxy in front is trusted).
fn add_forwarding(headers: &mut HeaderMap, peer: IpAddr, trust_forwarded_for: bool) {
    fn joined(headers: &HeaderMap, name: &HeaderName, this_hop: &str) -> Option<HeaderValue> {
        let mut all: Vec<&[u8]> = headers.get_all(name).iter().map(|v| v.as_bytes()).collect();
        all.push(this_hop.as_bytes());
        HeaderValue::from_bytes(&all.join(&b", "[..])).ok()
    }
    let xff = HeaderName::from_static("x-forwarded-for");
    if let Some(v) = joined(headers, &xff, &peer.to_string()) {
        headers.insert(&xff, v);
    }
    let node = match peer {
        IpAddr::V4(ip) => ip.to_string(),
        IpAddr::V6(ip) => format!("\"[{ip}]\""),
    };
    let mut element = format!("for={node};proto=http");
    if let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) {
        let escaped = host.replace('\\', "\\\\").replace('"', "\\\"");
        element.push_str(&format!(";host=\"{escaped}\""));
    }
    if let Some(v) = joined(headers, &header::FORWARDED, &element) {
        headers.insert(header::FORWARDED, v);
    }
    let xfp = HeaderName::from_static("x-forwarded-proto");
    if !(trust_forwarded_for && headers.contains_key(&xfp)) {
        headers.insert(xfp, HeaderValue::from_static("http"));
    }
}

fn error_response(status: StatusCode, error: &str, detail: String) -> Response {
    let body = ErrorBody {
        error: error.to_owned(),
        detail,
        field: None,
    };
    (status, axum::Json(body)).into_response()
}

/// 502: the upstream refused or dropped the connection (the log has the cause).
fn bad_gateway() -> Response {
    error_response(
        StatusCode::BAD_GATEWAY,
        "bad_gateway",
        "the upstream service could not be reached or closed the connection".to_owned(),
    )
}

/// 504: the upstream did not answer within `UPSTREAM_TIMEOUT_MS`.
fn gateway_timeout(timeout: Duration) -> Response {
    error_response(
        StatusCode::GATEWAY_TIMEOUT,
        "gateway_timeout",
        format!(
            "the upstream service did not answer within {} ms",
            timeout.as_millis()
        ),
    )
}

/// Reads and drops a refused request's body after the answer, as the kit does before a
/// 413 ([`kit::http::body::drain`]: at most its `DRAIN_LIMIT`, for at most
/// `timeout`): closing a socket with unread data makes the kernel send a reset, which can
/// destroy the 429 in flight. Not when the client waits for `100 Continue`: it sends
/// nothing until told to.
fn drain_in_background(request: Request, timeout: Duration) {
    if request.headers().contains_key(header::EXPECT) || request.body().is_end_stream() {
        return;
    }
    let mut body = request.into_body();
    let deadline = tokio::time::Instant::now() + timeout;
    tokio::spawn(async move { kit::http::body::drain(&mut body, deadline).await });
}

/// A body that did not progress within its idle timeout.
#[derive(Debug, thiserror::Error)]
#[error("the body made no progress for {} ms", .0.as_millis())]
struct BodyStalled(Duration);

/// A body passed through, failing with [`BodyStalled`] when it makes no progress for
/// `idle`, and telling `ended` once it has been read to its end.
struct IdleTimeoutBody<B> {
    inner: B,
    idle: Duration,
    sleep: Pin<Box<tokio::time::Sleep>>,
    armed: bool,
    ended: Option<Arc<Notify>>,
}

impl<B> IdleTimeoutBody<B> {
    fn new(inner: B, idle: Duration, ended: Option<Arc<Notify>>) -> Self {
        Self {
            inner,
            idle,
            sleep: Box::pin(tokio::time::sleep(idle)),
            armed: false,
            ended,
        }
    }
}

impl<B> hyper::body::Body for IdleTimeoutBody<B>
where
    B: hyper::body::Body + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.armed = false;
                if (frame.is_none() || this.inner.is_end_stream())
                    && let Some(ended) = this.ended.take()
                {
                    ended.notify_one();
                }
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                if !this.armed {
                    this.armed = true;
                    let deadline = tokio::time::Instant::now() + this.idle;
                    this.sleep.as_mut().reset(deadline);
                }
                match this.sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyStalled(this.idle))))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Serves the gateway on `listener` until `shutdown`: with `upstream`, its own routes
/// beside the proxy ([`router`]), each request knowing its client's address; without,
/// exactly [`crate::run`].
pub async fn run(
    listener: tokio::net::TcpListener,
    gateway: Gateway,
    upstream: Option<Arc<Upstream>>,
    limits: &ServeLimits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let Some(upstream) = upstream else {
        return crate::run(listener, gateway, limits, shutdown).await;
    };
    tracing::info!(
        addr = %listener.local_addr()?,
        upstream = %format!("{}://{}{}", upstream.scheme, upstream.authority, upstream.prefix),
        "gateway listening in front of the upstream"
    );
    kit::http::serve(
        listener,
        router(gateway, upstream, limits),
        shutdown,
        limits,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn hop_by_hop_headers_go_and_the_rest_stay() {
        let mut h = headers(&[
            ("connection", "keep-alive, X-Secret-Hop"),
            ("connection", "close"),
            ("x-secret-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-authorization", "Basic x"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("trailer", "x-sum"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("x-api-key", "k1"),
            ("authorization", "Bearer t"),
        ]);
        strip_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["authorization", "x-api-key"]);
    }

    #[test]
    fn forwarding_headers_are_appended() {
        let mut h = headers(&[
            ("x-forwarded-for", "198.51.100.1"),
            ("x-forwarded-for", "198.51.100.2"),
            ("x-forwarded-proto", "https"),
            ("host", "shop.example:3000"),
        ]);
        add_forwarding(&mut h, "2001:db8::1".parse().unwrap(), false);
        assert_eq!(
            h["x-forwarded-for"],
            "198.51.100.1, 198.51.100.2, 2001:db8::1"
        );
        // Not trusted: the client's own claim of https is replaced.
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(
            h["forwarded"],
            "for=\"[2001:db8::1]\";proto=http;host=\"shop.example:3000\""
        );
        assert_eq!(last_forwarded_for(&h), Some("2001:db8::1".parse().unwrap()));

        let mut h = headers(&[("x-forwarded-proto", "https")]);
        add_forwarding(&mut h, "10.0.0.1".parse().unwrap(), true);
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["forwarded"], "for=10.0.0.1;proto=http");
    }

    #[test]
    fn own_routes_are_never_forwarded() {
        for own in [
            "/api",
            "/analytics",
            "/analytics/u1",
            "/status",
            "/metrics",
            "/dashboard",
            "/healthz",
            "/readyz",
            "/admin",
            "/admin/rules",
        ] {
            assert!(crate::http::is_own_route(own), "{own}");
        }
        for theirs in [
            "/",
            "/api/v1",
            "/apis",
            "/analyticsx",
            "/administrator",
            "/v1/orders",
        ] {
            assert!(!crate::http::is_own_route(theirs), "{theirs}");
        }
    }
}
