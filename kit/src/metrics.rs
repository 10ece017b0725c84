//! Prometheus metrics: one recorder per process, `GET /metrics` on every service, and HTTP
//! request metrics by route (the route template, never the raw path or a user id, so label
//! cardinality stays bounded).
//!
//! Every metric is described (help text and unit) by the crate that records it, once the
//! recorder is installed: [`handle`] describes the HTTP metrics recorded here, and each
//! service's `describe_metrics` its own. `promtool check metrics` accepts every page.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock, RwLock};
use std::task::{Context, Poll};
use std::time::Instant;

use axum::Router;
use axum::extract::{MatchedPath, Request};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use metrics::Unit;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Latency buckets, in seconds: 50 µs to 2.5 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5,
];

/// The process's Prometheus recorder, installed on first use (with the descriptions of the
/// HTTP metrics). Descriptions given before it is installed are lost, so every
/// `describe_metrics` calls this first.
pub fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
            .expect("non-empty buckets")
            .build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("a metrics recorder was already installed; /metrics may be empty");
        }
        describe_http_metrics();
        handle
    })
}

/// Help text and units of the metrics [`with_http_metrics`] and `http::serve` record.
fn describe_http_metrics() {
    metrics::describe_counter!(
        "http_requests_total",
        Unit::Count,
        "HTTP requests answered, by service, route template and status code"
    );
    metrics::describe_histogram!(
        "http_request_duration_seconds",
        Unit::Seconds,
        "Time to answer an HTTP request, in seconds, by service and route template"
    );
    metrics::describe_gauge!(
        "http_connections_open",
        Unit::Count,
        "Open client connections, by listening address (at most MAX_CONNECTIONS)"
    );
    metrics::describe_counter!(
        "http_connections_refused_total",
        Unit::Count,
        "Connections closed on arrival because MAX_CONNECTIONS were open, by listening address"
    );
}

/// The Prometheus text of everything recorded so far.
pub fn render() -> Response {
    let handle = handle();
    handle.run_upkeep();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        handle.render(),
    )
        .into_response()
}

/// Records `http_requests_total{service,route,status}` and
/// `http_request_duration_seconds{service,route}` for every request through `router`.
pub fn with_http_metrics(router: Router, service: &'static str) -> Router {
    handle();
    router.layer(HttpMetricsLayer {
        handles: Arc::new(HttpHandles::new(service)),
    })
}

/// The layer of [`with_http_metrics`], on each route (where the route template is known):
/// a service and a future written out, so that a request pays for no boxed `Next` and no
/// boxed future of its own here.
#[derive(Clone)]
struct HttpMetricsLayer {
    handles: Arc<HttpHandles>,
}

impl<S> tower::Layer<S> for HttpMetricsLayer {
    type Service = HttpMetrics<S>;

    fn layer(&self, inner: S) -> HttpMetrics<S> {
        HttpMetrics {
            inner,
            handles: self.handles.clone(),
            seen: Arc::default(),
        }
    }
}

#[derive(Clone)]
struct HttpMetrics<S> {
    inner: S,
    handles: Arc<HttpHandles>,
    /// The handles of the route this layer wraps (each route gets its own layer), kept at
    /// its first request: the next ones skip the lookup in `handles` when their route
    /// template is the same (always, short of a route served under two templates).
    seen: Arc<OnceLock<Arc<RouteHandles>>>,
}

impl<S> tower::Service<Request> for HttpMetrics<S>
where
    S: tower::Service<Request, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = Recorded<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let path = req
            .extensions()
            .get::<MatchedPath>()
            .map_or("unmatched", MatchedPath::as_str);
        let route = match self.seen.get() {
            Some(seen) if seen.route == path => seen.clone(),
            _ => {
                let route = self.handles.route(path);
                let _ = self.seen.set(route.clone());
                route
            }
        };
        Recorded {
            inner: self.inner.call(req),
            route,
            started: Instant::now(),
        }
    }
}

pin_project_lite::pin_project! {
    /// A request's answer on its way, recorded when it is made.
    struct Recorded<F> {
        #[pin]
        inner: F,
        route: Arc<RouteHandles>,
        started: Instant,
    }
}

impl<F, E> Future for Recorded<F>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = std::task::ready!(this.inner.poll(cx));
        if let Ok(response) = &result {
            this.route.record(response.status().as_u16(), *this.started);
        }
        Poll::Ready(result)
    }
}

/// The HTTP metric handles of one service, registered once per route and status: a request
/// records through them instead of building its label set and looking it up in the
/// registry, which allocates and hashes on every request. Bounded as the labels are: by the
/// router's route templates and the status codes.
struct HttpHandles {
    service: &'static str,
    routes: RwLock<HashMap<String, Arc<RouteHandles>>>,
}

pub(crate) struct RouteHandles {
    service: &'static str,
    route: String,
    duration: metrics::Histogram,
    /// The counter of the first status answered (most answers of a route have it),
    /// counted without the lock.
    first_status: OnceLock<(u16, metrics::Counter)>,
    by_status: RwLock<Vec<(u16, metrics::Counter)>>,
}

impl HttpHandles {
    fn new(service: &'static str) -> Self {
        Self {
            service,
            routes: RwLock::default(),
        }
    }

    fn route(&self, route: &str) -> Arc<RouteHandles> {
        if let Some(handles) = self.routes.read().expect("not poisoned").get(route) {
            return handles.clone();
        }
        let service = self.service;
        self.routes
            .write()
            .expect("not poisoned")
            .entry(route.to_owned())
            .or_insert_with(|| {
                Arc::new(RouteHandles {
                    service,
                    route: route.to_owned(),
                    duration: metrics::histogram!("http_request_duration_seconds", "service" => service, "route" => route.to_owned()),
                    first_status: OnceLock::new(),
                    by_status: RwLock::default(),
                })
            })
            .clone()
    }
}

/// The handles of `route` in `service`, for a route answered outside a router
/// ([`crate::http::Direct`]): the same series as [`with_http_metrics`] records for it.
pub(crate) fn route_handles(service: &'static str, route: &str) -> Arc<RouteHandles> {
    handle();
    HttpHandles::new(service).route(route)
}

impl RouteHandles {
    /// One answer with `status`, made in the time since `started`.
    pub(crate) fn record(&self, status: u16, started: Instant) {
        match self.first_status.get() {
            Some((first, counter)) if *first == status => counter.increment(1),
            _ => {
                let counter = self.requests(status);
                counter.increment(1);
                let _ = self.first_status.set((status, counter));
            }
        }
        self.duration.record(started.elapsed().as_secs_f64());
    }

    fn requests(&self, status: u16) -> metrics::Counter {
        let found = |all: &[(u16, metrics::Counter)]| {
            all.iter()
                .find(|(s, _)| *s == status)
                .map(|(_, c)| c.clone())
        };
        if let Some(counter) = found(&self.by_status.read().expect("not poisoned")) {
            return counter;
        }
        let mut all = self.by_status.write().expect("not poisoned");
        if let Some(counter) = found(&all) {
            return counter;
        }
        let counter = metrics::counter!("http_requests_total", "service" => self.service, "route" => self.route.clone(), "status" => status.to_string());
        all.push((status, counter.clone()));
        counter
    }
}
