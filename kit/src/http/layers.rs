//! The layers every service's router is wrapped in: JSON 404/405, the in-flight bound, the
//! liveness probe outside it, and bodies read in full first ([`super::body`]).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Bytes, HttpBody};
use axum::extract::{DefaultBodyLimit, Request};
use axum::handler::Handler;
use axum::http::Method;
use axum::response::{IntoResponse, Response};
use axum::{BoxError, Router};
use domain::api::MAX_BODY_BYTES;
use tokio::sync::Semaphore;
use tower::Service;

use super::body::{BodyLimit, buffer_body, refused_body};
use super::{ApiError, ServeLimits};

/// Adds the body limit and JSON answers for unknown paths (404) and wrong methods (405).
pub fn with_common_layers(router: Router) -> Router {
    router
        .fallback(|| async { ApiError::NotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
}

/// Bounds in-flight work: past `max_in_flight` concurrent requests (all routes together) a
/// request is shed at once with 429 (never queued), and one running longer than `timeout`
/// answers 503. The load shedder of [`with_guards`] alone, for its tests.
#[cfg(test)]
pub(super) fn with_load_shedding(
    router: Router,
    max_in_flight: usize,
    timeout: Duration,
) -> Router {
    // Around the whole router (not `Router::layer`, which wraps each route apart), so the
    // limit counts every request the service has in flight.
    let shed = Shed::new(router, max_in_flight, timeout);
    Router::new().fallback_service(tower::service_fn(move |req: Request| {
        let shed = shed.clone();
        async move { Ok::<_, Infallible>(shed.call(req).await) }
    }))
}

/// A route answered before the router: one method and path (the service's hottest, the
/// limiter's `POST /check` and the gateway's `POST /api`), by the same handler, with the same
/// extractors and state, in the same in-flight slot and under the same timeout, and recorded
/// in the same HTTP metrics, as the router would; without the router's own work per request
/// (the path's match, the extensions it inserts, the boxed services it clones and the
/// futures it boxes around the handler's). The router keeps the route too: other methods
/// get its 405.
#[derive(Clone)]
pub struct Direct {
    method: Method,
    path: &'static str,
    /// The route's body limit in the router ([`with_common_layers`]'s): a larger JSON body
    /// is answered 413 as the handler's JSON extractor would.
    body_limit: usize,
    call: Arc<dyn Fn(Request) -> DirectFuture + Send + Sync>,
    metrics: Arc<crate::metrics::RouteHandles>,
}

/// What an `async fn` handler answers through axum's [`Handler`]: its future, boxed.
pub type DirectFuture = Pin<Box<dyn Future<Output = Response> + Send>>;

impl Direct {
    /// `POST path` answered by `handler` (an `async fn`, whose future axum boxes already:
    /// taken as it is) with `state`, its requests counted under `service`'s HTTP metrics as
    /// the router's route `path`.
    pub fn post<H, T, S>(path: &'static str, handler: H, state: S, service: &'static str) -> Self
    where
        H: Handler<T, S, Future = DirectFuture>,
        T: 'static,
        S: Clone + Send + Sync + 'static,
    {
        Self {
            method: Method::POST,
            path,
            body_limit: MAX_BODY_BYTES,
            call: Arc::new(move |req| handler.clone().call(req, state.clone())),
            metrics: crate::metrics::route_handles(service, path),
        }
    }

    fn serves(&self, req: &Request) -> bool {
        req.method() == self.method && req.uri().path() == self.path
    }

    async fn answer(&self, req: Request) -> Response {
        let started = std::time::Instant::now();
        // The body is in memory already (`buffer_body`): its size is known.
        let too_large = HttpBody::size_hint(req.body())
            .upper()
            .is_some_and(|len| len > self.body_limit as u64);
        let response = if too_large && super::json::is_json(req.headers()) {
            ApiError::PayloadTooLarge.into_response()
        } else {
            (self.call)(req).await
        };
        self.metrics.record(response.status().as_u16(), started);
        response
    }
}

/// The in-flight bound and the request timeout around a router: what tower's `load_shed`,
/// `concurrency_limit` and `timeout` layers did, in one step per request (a slot taken or
/// refused at once, the router's future raced against the deadline), without a boxed
/// service and a boxed future per layer.
#[derive(Clone)]
struct Shed {
    routes: Router,
    /// Answered before `routes` ([`Direct`]).
    direct: Vec<Direct>,
    slots: Arc<Semaphore>,
    timeout: Duration,
}

impl Shed {
    fn new(routes: Router, max_in_flight: usize, timeout: Duration) -> Self {
        Self {
            routes,
            direct: Vec::new(),
            slots: Arc::new(Semaphore::new(max_in_flight.max(1))),
            timeout,
        }
    }

    /// `req` through the routes in a slot (given back when the answer is made, or when the
    /// request is dropped), or 429 at once when every slot is taken; 503 past the timeout.
    async fn call(&self, req: Request) -> Response {
        let Ok(_slot) = self.slots.try_acquire() else {
            return ApiError::Overloaded.into_response();
        };
        if let Some(direct) = self.direct.iter().find(|d| d.serves(&req)) {
            return match tokio::time::timeout(self.timeout, direct.answer(req)).await {
                Ok(response) => response,
                Err(_) => ApiError::Timeout.into_response(),
            };
        }
        let mut routes = self.routes.clone();
        match tokio::time::timeout(self.timeout, routes.call(req)).await {
            Ok(Ok(response)) => response,
            Ok(Err(never)) => match never {},
            Err(_) => ApiError::Timeout.into_response(),
        }
    }
}

/// The liveness probe's path.
pub const HEALTHZ: &str = "/healthz";
/// The readiness probe's path (served by the services that have one).
pub const READYZ: &str = "/readyz";

/// The liveness probe: `GET /healthz`, `200 {"status":"ok"}` while the process serves.
pub fn liveness() -> Router {
    Router::new().route(
        HEALTHZ,
        axum::routing::get(|| async { axum::Json(serde_json::json!({"status": "ok"})) }),
    )
}

/// A service's whole HTTP stack, outermost first:
///
/// 1. every request's body is read in full, at most `max_body` bytes within
///    `limits.body_timeout` (else 413 or 408, and the connection is closed; see
///    [`super::body`]), so a slow sender never holds an in-flight slot;
/// 2. the liveness probe ([`HEALTHZ`], answered by `probes`) is answered there, outside the
///    load shedder: a service busy with its limit of requests is still alive;
/// 3. everything else goes through the load shedder (past `limits.max_in_flight` requests
///    in flight, 429 at once; one running past `limits.request_timeout`, 503) and
///    [`with_common_layers`] to `routes`.
///
/// `max_body` is the largest body any route accepts; each route's own limit
/// ([`DefaultBodyLimit`]) still applies to the buffered body.
///
/// One service does the three steps (one boxed future per request), served as it is by
/// [`super::serve()`]: the routers behind it are the only ones a request meets.
pub fn with_guards(
    routes: Router,
    probes: Router,
    max_body: impl Into<BodyLimit>,
    limits: &ServeLimits,
) -> Guarded {
    let guards = Guards {
        probes,
        shed: Shed::new(
            with_common_layers(routes),
            limits.max_in_flight,
            limits.request_timeout,
        ),
        max_body: max_body.into(),
        body_timeout: limits.body_timeout,
    };
    Guarded(Arc::new(guards))
}

/// What [`with_guards`] puts in front of the routes.
struct Guards {
    probes: Router,
    shed: Shed,
    max_body: BodyLimit,
    body_timeout: Duration,
}

/// A service's routes behind its guards ([`with_guards`]); what [`super::serve()`] serves.
#[derive(Clone)]
pub struct Guarded(Arc<Guards>);

impl Guarded {
    /// `direct` answered before the routes ([`Direct`]), behind the same guards.
    pub fn with_direct(mut self, direct: Direct) -> Self {
        Arc::get_mut(&mut self.0)
            .expect("a Guarded gets its direct routes before it is served")
            .shed
            .direct
            .push(direct);
        self
    }
}

impl<B> Service<axum::http::Request<B>> for Guarded
where
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: axum::http::Request<B>) -> Self::Future {
        let guards = self.0.clone();
        Box::pin(async move {
            let max_body = guards.max_body.for_path(req.uri().path());
            let req = match buffer_body(req, max_body, guards.body_timeout).await {
                Ok(req) => req,
                Err(err) => return Ok(refused_body(err)),
            };
            if req.uri().path() == HEALTHZ {
                let mut probes = guards.probes.clone();
                return probes.call(req).await;
            }
            Ok(guards.shed.call(req).await)
        })
    }
}
