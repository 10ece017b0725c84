//! Prometheus metrics: one recorder per process, `GET /metrics` on every service, and HTTP
//! request metrics by route (the route template, never the raw path or a user id, so label
//! cardinality stays bounded).
//!
//! Every metric is described (help text and unit) by the crate that records it, once the
//! recorder is installed: [`handle`] describes the HTTP metrics recorded here, and each
//! service's `describe_metrics` its own. `promtool check metrics` accepts every page.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Instant;

use axum::Router;
use axum::extract::{MatchedPath, Request};
use axum::http::header;
use axum::middleware::Next;
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
    let handles = Arc::new(HttpHandles::new(service));
    router.layer(axum::middleware::from_fn(
        move |req: Request, next: Next| {
            let handles = handles.clone();
            async move {
                let route = handles.route(
                    req.extensions()
                        .get::<MatchedPath>()
                        .map_or("unmatched", MatchedPath::as_str),
                );
                let started = Instant::now();
                let response = next.run(req).await;
                route.requests(response.status().as_u16()).increment(1);
                route.duration.record(started.elapsed().as_secs_f64());
                response
            }
        },
    ))
}

/// The HTTP metric handles of one service, registered once per route and status: a request
/// records through them instead of building its label set and looking it up in the
/// registry, which allocates and hashes on every request. Bounded as the labels are: by the
/// router's route templates and the status codes.
struct HttpHandles {
    service: &'static str,
    routes: RwLock<HashMap<String, Arc<RouteHandles>>>,
}

struct RouteHandles {
    service: &'static str,
    route: String,
    duration: metrics::Histogram,
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
                    by_status: RwLock::default(),
                })
            })
            .clone()
    }
}

impl RouteHandles {
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
