//! Envoy's rate limit service: `envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`
//! over gRPC on `GRPC_PORT`, what Envoy's `envoy.filters.http.ratelimit` filter (and Istio,
//! Envoy Gateway) asks, answered by the same [`Limiter`] as the HTTP API.
//!
//! - [`RateLimitService`]: one call → one decision of every descriptor, all or nothing;
//!   also behind envoyproxy/ratelimit's `POST /json` ([`json`]).
//! - [`serve`]: the tonic server, with the `grpc.health.v1` health service, which reports
//!   `NOT_SERVING` while the store is unavailable in fail-closed mode.
//!
//! The mapping:
//! - the request is one [`CheckRequest`]: its `domain`, its descriptors, `cost` =
//!   `hits_addend` (0 means 1); the analytics count it for [`analytics_identity`] (the
//!   `user_id` entry, else the first descriptor's entries `key=value/key=value`).
//! - A descriptor's own `hits_addend` overrides the request's. Descriptors whose addends
//!   differ are decided as one group per addend, in one store call; when any group is
//!   over the limit, the groups that passed are refunded, so nothing is spent unless the
//!   whole call passes (see `RateLimitService::decide`). `is_negative_hits` gives the
//!   hits back (a refund).
//! - One status per descriptor, in order: `OVER_LIMIT` when one of its enforced limits
//!   refuses; `current_limit`, `limit_remaining` and `duration_until_reset` are those of
//!   its limit closest to refusing ([`descriptor_status`]); a descriptor no limit applies
//!   to is `OK` without `current_limit`. `overall_code` is `OVER_LIMIT` when any status is.
//! - A store that is unavailable in fail-closed mode is `UNAVAILABLE` (Envoy then follows
//!   its `failure_mode_deny`); a client mistake is `INVALID_ARGUMENT` naming the field.

mod connections;
pub mod json;
mod refuse_errors;
mod threads;

use std::sync::Arc;
use std::time::Duration;

use crate::config::FailMode;
use domain::api::{
    CheckError, CheckRequest, CheckResponse, FieldError, LimitStatus, MAX_COST, MAX_DESCRIPTORS,
    MAX_ENTRIES, MAX_KEY_BYTES, analytics_identity, canonical_user_id,
};
use domain::descriptor::{Descriptor, Entry};
use envoy_types::pb::envoy::config::core::v3::HeaderValue;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::rate_limit::Unit;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{
    Code, DescriptorStatus, RateLimit,
};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::{
    RateLimitService as RateLimitServiceGrpc, RateLimitServiceServer,
};
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use kit::every::Every;
use kit::http::ServeLimits;
use tokio_util::sync::CancellationToken;

use crate::config::ResponseHeaders;
use crate::limiter::{Checked, Limiter};

/// Largest accepted gRPC message: 16 descriptors of 16 entries of the longest keys and
/// values fit in ~100 KiB only with every byte escaped-free and maximal; real calls are a
/// few hundred bytes, and 64 KiB keeps what one call can make us allocate small.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// How often the health service looks at the store (fail-closed mode).
const HEALTH_INTERVAL: Duration = Duration::from_millis(250);
/// How long a stopping server waits for the calls in flight (each takes at most the store
/// timeout) before it drops its connections.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// `overall_code` of a call over the limit.
pub const OVER_LIMIT: i32 = Code::OverLimit as i32;

/// Why a call got no decision.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// A client mistake: `INVALID_ARGUMENT` (HTTP 400 on `/json`).
    #[error("{0}")]
    Invalid(FieldError),
    /// The store is unavailable and the fail mode is `closed`: `UNAVAILABLE` (HTTP 503).
    #[error("the rate-limit store is unavailable")]
    Unavailable,
}

impl From<CallError> for tonic::Status {
    fn from(err: CallError) -> Self {
        match err {
            CallError::Invalid(e) => tonic::Status::invalid_argument(e.to_string()),
            CallError::Unavailable => tonic::Status::unavailable(err.to_string()),
        }
    }
}

/// Envoy's rate limit service in front of a [`Limiter`].
#[derive(Clone)]
pub struct RateLimitService {
    limiter: Arc<Limiter>,
    headers: ResponseHeaders,
}

/// One group of a call: the descriptors that share a cost, as one request.
struct Group {
    check: CheckRequest,
    /// Index in the call of each of the group's descriptors.
    indices: Vec<usize>,
}

impl Group {
    /// Puts what `checked` says of the group's descriptors in the call's `statuses` (at
    /// their places in the call) and its limits in the call's `decision`.
    fn report(
        &self,
        checked: Checked,
        statuses: &mut [DescriptorStatus],
        decision: &mut CheckResponse,
    ) {
        for (j, &i) in self.indices.iter().enumerate() {
            let limits: Vec<&LimitStatus> = checked
                .limits
                .iter()
                .filter(|l| l.descriptor == j)
                .collect();
            statuses[i] = descriptor_status(&limits);
        }
        decision
            .limits
            .extend(checked.limits.into_iter().map(|mut l| {
                l.descriptor = self.indices[l.descriptor];
                l
            }));
    }
}

impl RateLimitService {
    pub fn new(limiter: Arc<Limiter>, headers: ResponseHeaders) -> Self {
        Self { limiter, headers }
    }

    /// Decides one `ShouldRateLimit` call.
    pub async fn should_rate_limit(
        &self,
        request: &RateLimitRequest,
    ) -> Result<RateLimitResponse, CallError> {
        let groups = groups(request).map_err(CallError::Invalid)?;
        let count = request.descriptors.len();
        let (statuses, decision) = self.decide(&groups, count).await?;
        let overall = if statuses.iter().any(|s| s.code == Code::OverLimit as i32) {
            Code::OverLimit
        } else {
            Code::Ok
        };
        let fields = match self.headers {
            ResponseHeaders::Ietf => domain::headers::ietf(&decision),
            ResponseHeaders::Envoy => domain::headers::trio(&decision),
            ResponseHeaders::Off => Vec::new(),
        };
        Ok(RateLimitResponse {
            overall_code: overall as i32,
            statuses,
            response_headers_to_add: fields
                .into_iter()
                .map(|(key, value)| HeaderValue {
                    key: key.to_owned(),
                    value,
                    raw_value: Vec::new(),
                })
                .collect(),
            ..Default::default()
        })
    }

    /// Decides every group in one store call, all or nothing: when any group is over the
    /// limit, the groups that spent are refunded. Returns one status per descriptor and
    /// the whole call's decision (for the headers).
    ///
    /// A refund gives back exactly what was taken, never above a limit; between the take
    /// and the refund (one more store round trip) another call may see the tokens spent.
    /// One group (the usual case: Envoy sends one addend per call) has no such window.
    async fn decide(
        &self,
        groups: &[Group],
        count: usize,
    ) -> Result<(Vec<DescriptorStatus>, CheckResponse), CallError> {
        if groups
            .iter()
            .any(|g| g.check.cost.unsigned_abs() > MAX_COST)
        {
            return Ok(self.refuse_unhonoured(groups, count));
        }
        // One group (the usual call) is decided as it is; several are copied into one
        // slice for the store's one call.
        let results = if let [group] = groups {
            vec![self.limiter.check(&group.check).await]
        } else {
            let checks: Vec<CheckRequest> = groups.iter().map(|g| g.check.clone()).collect();
            self.limiter.check_many(&checks).await
        };
        let mut statuses = vec![
            DescriptorStatus {
                code: Code::Ok as i32,
                ..Default::default()
            };
            count
        ];
        let mut decision = CheckResponse {
            allowed: true,
            ..Default::default()
        };
        // The groups that spent, refunded if the call ends refused (by their place: a copy
        // is made only for a refund).
        let mut spent: Vec<&Group> = Vec::new();
        for (group, result) in groups.iter().zip(results) {
            let checked: Checked = match result {
                Ok(checked) => checked,
                Err(
                    CheckError::StoreUnavailable | CheckError::Overloaded | CheckError::Other(_),
                ) => {
                    self.refund(&spent).await;
                    return Err(CallError::Unavailable);
                }
                // More than some limit can ever admit: over the limit (not an error, which
                // Envoy's default failure_mode_deny=false would let through), counted and
                // published as a refusal.
                Err(CheckError::Invalid(_)) => self.limiter.refuse_unhonoured(&group.check, false),
            };
            if !checked.decision.is_allowed() {
                decision.allowed = false;
            } else if group.check.cost > 0 && !checked.limits.is_empty() {
                spent.push(group);
            }
            decision.degraded |= checked.degraded;
            group.report(checked, &mut statuses, &mut decision);
        }
        if !decision.allowed {
            self.refund(&spent).await;
        }
        Ok((statuses, decision))
    }

    /// Gives back what the groups of a refused call took.
    async fn refund(&self, spent: &[&Group]) {
        if spent.is_empty() {
            return;
        }
        let refunds: Vec<CheckRequest> = spent
            .iter()
            .map(|group| {
                let mut check = group.check.clone();
                check.cost = -check.cost;
                check
            })
            .collect();
        for result in self.limiter.check_many(&refunds).await {
            if let Err(err) = result {
                tracing::warn!(error = %err, "refund of a refused envoy call failed");
            }
        }
    }

    /// A call with a cost above [`MAX_COST`]: refused whole before anything is spent (the
    /// service does not honour such a cost, whatever the rules say), each such group counted
    /// and published as a refusal; the other descriptors are `OK` with nothing decided.
    fn refuse_unhonoured(
        &self,
        groups: &[Group],
        count: usize,
    ) -> (Vec<DescriptorStatus>, CheckResponse) {
        let mut statuses = vec![
            DescriptorStatus {
                code: Code::Ok as i32,
                ..Default::default()
            };
            count
        ];
        let mut decision = CheckResponse::default();
        for group in groups
            .iter()
            .filter(|g| g.check.cost.unsigned_abs() > MAX_COST)
        {
            let checked = self.limiter.refuse_unhonoured(&group.check, true);
            group.report(checked, &mut statuses, &mut decision);
            // Over the limit even where no limit applies: the cost itself is refused.
            for &i in &group.indices {
                statuses[i].code = Code::OverLimit as i32;
            }
        }
        (statuses, decision)
    }
}

#[tonic::async_trait]
impl RateLimitServiceGrpc for RateLimitService {
    async fn should_rate_limit(
        &self,
        request: tonic::Request<RateLimitRequest>,
    ) -> Result<tonic::Response<RateLimitResponse>, tonic::Status> {
        let request = request.get_ref();
        match RateLimitService::should_rate_limit(self, request).await {
            Ok(answer) => Ok(tonic::Response::new(answer)),
            // A call this service will not decide is over the limit, never an error that
            // Envoy's default `failure_mode_deny: false` would let through.
            Err(CallError::Invalid(mistake)) => {
                Ok(tonic::Response::new(refused_invalid(request, &mistake)))
            }
            Err(err @ CallError::Unavailable) => Err(err.into()),
        }
    }
}

/// A domain or descriptor key: 1 to [`MAX_KEY_BYTES`] bytes, the identity rule of ids.
/// `field` names it in the error (made only then: a valid call formats no field names).
fn key(field: impl FnOnce() -> String, raw: &str) -> Result<String, FieldError> {
    if raw.is_empty() || raw.len() > MAX_KEY_BYTES {
        return Err(FieldError::new(
            field(),
            format!("must be 1 to {MAX_KEY_BYTES} bytes of UTF-8"),
        ));
    }
    canonical_user_id(raw.to_owned()).map_err(|e| FieldError::new(field(), e.detail))
}

/// The cost of a descriptor: its own `hits_addend`, else the request's; 0 means 1;
/// negative when `is_negative_hits`. A cost above [`MAX_COST`] is kept as it is (saturated
/// to `i64`): the call is then refused as over the limit ([`RateLimitService::decide`]).
fn cost(request: &RateLimitRequest, d: &RateLimitDescriptor) -> i64 {
    let addend = match &d.hits_addend {
        Some(own) => own.value,
        None => u64::from(request.hits_addend),
    };
    let addend = i64::try_from(addend.max(1)).unwrap_or(i64::MAX);
    if d.is_negative_hits { -addend } else { addend }
}

/// The answer to a call this service will not decide (a mistake in it, most often a value
/// the client controls through a header): every descriptor `OVER_LIMIT`, and the reason as
/// the body of the 429 Envoy sends (`raw_body`). Never spent on, never counted per user
/// (a mistaken call has no valid identity); `ratelimit_grpc_invalid_calls_total` counts it.
pub fn refused_invalid(request: &RateLimitRequest, mistake: &FieldError) -> RateLimitResponse {
    metrics::counter!("ratelimit_grpc_invalid_calls_total").increment(1);
    tracing::debug!(field = %mistake.field, detail = %mistake.detail, "envoy call refused as over the limit: invalid");
    refused_all(
        request.descriptors.len().max(1),
        serde_json::json!({
            "error": "invalid_request",
            "field": mistake.field,
            "detail": mistake.detail,
        }),
    )
}

/// Every one of `count` descriptors `OVER_LIMIT`, with `body` as the 429's body.
fn refused_all(count: usize, body: serde_json::Value) -> RateLimitResponse {
    RateLimitResponse {
        overall_code: Code::OverLimit as i32,
        statuses: vec![
            DescriptorStatus {
                code: Code::OverLimit as i32,
                ..Default::default()
            };
            count
        ],
        raw_body: body.to_string().into_bytes(),
        ..Default::default()
    }
}

/// Validates a call and splits it into groups of one cost (one group unless descriptors
/// carry their own `hits_addend`), in the order of their first descriptor.
fn groups(request: &RateLimitRequest) -> Result<Vec<Group>, FieldError> {
    if request.domain.is_empty() {
        return Err(FieldError::new("domain", "must not be empty"));
    }
    let domain = key(|| "domain".to_owned(), &request.domain)?;
    if request.descriptors.is_empty() || request.descriptors.len() > MAX_DESCRIPTORS {
        return Err(FieldError::new(
            "descriptors",
            format!("must hold 1 to {MAX_DESCRIPTORS} descriptors"),
        ));
    }
    let mut descriptors = Vec::with_capacity(request.descriptors.len());
    let mut costs = Vec::with_capacity(request.descriptors.len());
    for (i, d) in request.descriptors.iter().enumerate() {
        let field = || format!("descriptors[{i}].entries");
        if d.entries.is_empty() || d.entries.len() > MAX_ENTRIES {
            return Err(FieldError::new(
                field(),
                format!("must hold 1 to {MAX_ENTRIES} entries"),
            ));
        }
        if d.limit.is_some() {
            return Err(FieldError::new(
                format!("descriptors[{i}].limit"),
                "per-request limit overrides are not supported: put the limit in the rules file (RULES_PATH)",
            ));
        }
        let entries = d
            .entries
            .iter()
            .enumerate()
            .map(|(j, e)| {
                let key = key(|| format!("{}[{j}].key", field()), &e.key)?;
                let value = canonical_user_id(e.value.clone()).map_err(|err| {
                    FieldError::new(format!("{}[{j}].value", field()), err.detail)
                })?;
                Ok(Entry { key, value })
            })
            .collect::<Result<Vec<_>, FieldError>>()?;
        descriptors.push(Descriptor { entries });
        costs.push(cost(request, d));
    }
    let user_id = analytics_identity(&descriptors);
    let mut groups: Vec<Group> = Vec::new();
    for (i, (descriptor, cost)) in descriptors.into_iter().zip(costs).enumerate() {
        match groups.iter_mut().find(|g| g.check.cost == cost) {
            Some(group) => {
                group.check.descriptors.push(descriptor);
                group.indices.push(i);
            }
            None => groups.push(Group {
                check: CheckRequest {
                    user_id: user_id.clone(),
                    domain: domain.clone(),
                    descriptors: vec![descriptor],
                    cost,
                },
                indices: vec![i],
            }),
        }
    }
    Ok(groups)
}

/// A descriptor's status from the limits that applied to it: its enforced limit closest
/// to refusing (the refusing one with the longest wait, else the one with the fewest
/// left); a shadow limit only when nothing is enforced (and then never `OVER_LIMIT`).
pub fn descriptor_status(limits: &[&LimitStatus]) -> DescriptorStatus {
    // The enforced limits, or every limit when none is enforced (without copying them).
    let any_enforced = limits.iter().any(|l| !l.shadow);
    let pool = || {
        limits
            .iter()
            .copied()
            .filter(move |l| !any_enforced || !l.shadow)
    };
    let refusing = pool().filter(|l| l.refused && !l.shadow);
    let over = refusing.clone().next().is_some();
    let chosen = if over {
        refusing.max_by_key(|l| l.retry_after_ms)
    } else {
        pool().min_by_key(|l| (l.remaining, l.limit))
    };
    let Some(chosen) = chosen else {
        return DescriptorStatus {
            code: Code::Ok as i32,
            ..Default::default()
        };
    };
    DescriptorStatus {
        code: if over { Code::OverLimit } else { Code::Ok } as i32,
        current_limit: Some(rate_limit(&chosen.name, chosen.limit, chosen.window_ms)),
        limit_remaining: u32::try_from(chosen.remaining).unwrap_or(u32::MAX),
        duration_until_reset: Some(proto_duration(chosen.reset_after_ms)),
        quota: None,
    }
}

/// The units of the protocol, shortest first, with their length in milliseconds (a month
/// is 30 days and a year 365, as in the rules).
const UNITS: [(Unit, u64); 7] = [
    (Unit::Second, 1_000),
    (Unit::Minute, 60_000),
    (Unit::Hour, 3_600_000),
    (Unit::Day, 86_400_000),
    (Unit::Week, 7 * 86_400_000),
    (Unit::Month, 30 * 86_400_000),
    (Unit::Year, 365 * 86_400_000),
];

/// A limit of `limit` per `window_ms` as the protocol's `requests_per_unit` per `unit`:
/// the longest unit not longer than the window (a second at least), and the limit scaled
/// to it, rounded (a longer unit when that rounds to 0). Exact when the window is a unit
/// (`unit: minute` in the rules). For a token bucket, whose window is the time an empty
/// bucket takes to fill, this is its refill rate per unit (capacity over fill time).
pub fn rate_limit(name: &str, limit: u64, window_ms: u64) -> RateLimit {
    let window_ms = window_ms.max(1);
    let start = UNITS
        .iter()
        .rposition(|&(_, ms)| ms <= window_ms)
        .unwrap_or(0);
    let scaled = |unit_ms: u64| {
        let n = (u128::from(limit) * u128::from(unit_ms) + u128::from(window_ms) / 2)
            / u128::from(window_ms);
        u32::try_from(n).unwrap_or(u32::MAX)
    };
    let (unit, requests) = UNITS[start..]
        .iter()
        .map(|&(unit, ms)| (unit, scaled(ms)))
        .find(|&(_, n)| n > 0)
        .unwrap_or((Unit::Year, scaled(UNITS[6].1).max(1)));
    RateLimit {
        name: name.to_owned(),
        requests_per_unit: requests,
        unit: unit as i32,
    }
}

fn proto_duration(ms: u64) -> envoy_types::pb::google::protobuf::Duration {
    envoy_types::pb::google::protobuf::Duration {
        seconds: i64::try_from(ms / 1000).unwrap_or(i64::MAX),
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

/// Serves Envoy's rate limit service and the health service on `listener` until
/// `shutdown`, then lets the calls in flight finish (at most a few seconds). Bounded as the
/// HTTP ports are: at most `limits.max_connections` connections (more are closed on
/// arrival), `limits.max_in_flight` calls at once (more are refused at once, and Envoy
/// follows its `failure_mode_deny`), each at most `limits.request_timeout`. Connections
/// are accepted here and served on the process's gRPC threads (`threads` of them, 0: one
/// per core with the store in memory, this runtime with the store in Redis; see
/// [`threads::serving`]).
pub async fn serve(
    listener: tokio::net::TcpListener,
    service: RateLimitService,
    fail_mode: FailMode,
    limits: &ServeLimits,
    threads: usize,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_serving::<RateLimitServiceServer<RateLimitService>>()
        .await;
    if fail_mode == FailMode::Closed {
        spawn_health(reporter, service.limiter.clone(), shutdown.clone());
    }
    tracing::info!(addr = ?listener.local_addr().ok(), "envoy rate limit service (gRPC) listening");
    let store_is_remote = service.limiter.store_is_remote();
    // One router for every thread: its clones share the in-flight bound and the services.
    let router = tonic::transport::Server::builder()
        .timeout(limits.request_timeout)
        .layer(tower::ServiceBuilder::new().load_shed().layer(
            tower::limit::GlobalConcurrencyLimitLayer::new(limits.max_in_flight.max(1)),
        ))
        // Envoy keeps one HTTP/2 connection per worker thread open: find dead peers.
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(health)
        .add_service(
            crate::front::rlqs::QuotaService::new(service.limiter.clone(), shutdown.clone())
                .server(),
        )
        .add_service(refuse_errors::RefuseErrors::new(
            RateLimitServiceServer::new(service)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        ));
    let workers = threads::serving(threads, store_is_remote);
    let (senders, served): (Vec<_>, Vec<_>) = workers
        .iter()
        .map(|worker| {
            let (to, handed) = tokio::sync::mpsc::channel(64);
            let router = router.clone();
            let shutdown = shutdown.clone();
            let served = worker.handle.spawn(async move {
                let server = router.serve_with_incoming_shutdown(
                    connections::adopt(handed),
                    shutdown.clone().cancelled_owned(),
                );
                tokio::select! {
                    served = server => served,
                    // A client that keeps its connection open must not hold the shutdown forever.
                    () = async { shutdown.cancelled().await; tokio::time::sleep(SHUTDOWN_GRACE).await } => Ok(()),
                }
            });
            (to, served)
        })
        .unzip();
    connections::accept(
        listener,
        limits.max_connections,
        &workers,
        &senders,
        &shutdown,
    )
    .await;
    drop(senders);
    let mut result = Ok(());
    for served in served {
        match served.await {
            Ok(Err(err)) if result.is_ok() => result = Err(err),
            Ok(_) => {}
            // A thread's server panicked: said, not swallowed (the others were served).
            Err(err) => tracing::error!(error = %err, "a gRPC serving task failed"),
        }
    }
    result
}

/// Keeps the health status at `NOT_SERVING` while the store is unavailable (fail-closed:
/// every call would be refused), `SERVING` otherwise.
fn spawn_health(
    reporter: tonic_health::server::HealthReporter,
    limiter: Arc<Limiter>,
    shutdown: CancellationToken,
) {
    tokio::spawn(async move {
        let mut serving = true;
        let mut every = Every::new(HEALTH_INTERVAL, shutdown);
        while every.tick().await {
            let ready = limiter.ready().await;
            if ready == serving {
                continue;
            }
            serving = ready;
            let status = if ready {
                tonic_health::ServingStatus::Serving
            } else {
                tonic_health::ServingStatus::NotServing
            };
            tracing::info!(serving = ready, "grpc health changed");
            reporter.set_service_status("", status).await;
            reporter
                .set_service_status(
                    <RateLimitServiceServer<RateLimitService> as tonic::server::NamedService>::NAME,
                    status,
                )
                .await;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor;
    use envoy_types::pb::google::protobuf::UInt64Value;

    fn descriptor(entries: &[(&str, &str)], addend: Option<u64>) -> RateLimitDescriptor {
        RateLimitDescriptor {
            entries: entries
                .iter()
                .map(|(k, v)| rate_limit_descriptor::Entry {
                    key: (*k).into(),
                    value: (*v).into(),
                })
                .collect(),
            hits_addend: addend.map(|value| UInt64Value { value }),
            ..Default::default()
        }
    }

    fn request(descriptors: Vec<RateLimitDescriptor>, hits_addend: u32) -> RateLimitRequest {
        RateLimitRequest {
            domain: "api".into(),
            descriptors,
            hits_addend,
        }
    }

    #[test]
    fn windows_map_to_the_nearest_unit() {
        let unit = |limit, window_ms| {
            let r = rate_limit("x", limit, window_ms);
            (Unit::try_from(r.unit).unwrap(), r.requests_per_unit)
        };
        assert_eq!(unit(10, 1_000), (Unit::Second, 10));
        assert_eq!(unit(100, 60_000), (Unit::Minute, 100));
        assert_eq!(unit(5, 86_400_000), (Unit::Day, 5));
        assert_eq!(unit(3, 1_500), (Unit::Second, 2));
        // A token bucket of 50 refilled at 10/s fills in 5 s: 10 per second.
        assert_eq!(unit(50, 5_000), (Unit::Second, 10));
        // Below a second: per second.
        assert_eq!(unit(1, 100), (Unit::Second, 10));
        // 10 per 30 minutes is 0.33 a minute: 20 an hour.
        assert_eq!(unit(10, 1_800_000), (Unit::Hour, 20));
        assert_eq!(unit(u64::MAX, 1), (Unit::Second, u32::MAX));
    }

    #[test]
    fn addends_group_descriptors_and_default_to_one() {
        let g = groups(&request(
            vec![
                descriptor(&[("a", "1")], None),
                descriptor(&[("b", "2")], Some(5)),
                descriptor(&[("c", "3")], Some(0)),
            ],
            0,
        ))
        .unwrap();
        let shape: Vec<(i64, Vec<usize>)> = g
            .iter()
            .map(|g| (g.check.cost, g.indices.clone()))
            .collect();
        assert_eq!(shape, [(1, vec![0, 2]), (5, vec![1])]);
        assert!(g.iter().all(|g| g.check.user_id == "a=1"));
        let one = groups(&request(vec![descriptor(&[("user_id", "u")], None)], 7)).unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].check.cost, 7);
        assert_eq!(one[0].check.user_id, "u");
    }

    #[test]
    fn mistakes_name_the_field() {
        let field = |r: RateLimitRequest| groups(&r).err().map(|e| e.field);
        let mut empty_domain = request(vec![descriptor(&[("a", "1")], None)], 0);
        empty_domain.domain.clear();
        assert_eq!(field(empty_domain).as_deref(), Some("domain"));
        assert_eq!(field(request(vec![], 0)).as_deref(), Some("descriptors"));
        assert_eq!(
            field(request(vec![descriptor(&[], None)], 0)).as_deref(),
            Some("descriptors[0].entries")
        );
        assert_eq!(
            field(request(vec![descriptor(&[("a", "")], None)], 0)).as_deref(),
            Some("descriptors[0].entries[0].value")
        );
        assert_eq!(
            field(request(vec![descriptor(&[("", "v")], None)], 0)).as_deref(),
            Some("descriptors[0].entries[0].key")
        );
        // A cost above MAX_COST is no mistake of the call's shape: it is decided (refused
        // as over the limit, see `RateLimitService::decide`), never an error.
        let big = groups(&request(
            vec![descriptor(&[("a", "1")], Some(MAX_COST + 1))],
            0,
        ))
        .unwrap();
        assert_eq!(big[0].check.cost, (MAX_COST + 1) as i64);
        let many = vec![descriptor(&[("a", "1")], None); MAX_DESCRIPTORS + 1];
        assert_eq!(field(request(many, 0)).as_deref(), Some("descriptors"));
        let mut overridden = descriptor(&[("a", "1")], None);
        overridden.limit = Some(rate_limit_descriptor::RateLimitOverride {
            requests_per_unit: 1,
            unit: 1,
        });
        assert_eq!(
            field(request(vec![overridden], 0)).as_deref(),
            Some("descriptors[0].limit")
        );
    }

    #[test]
    fn the_status_is_the_limit_closest_to_refusing() {
        let l = |name: &str, remaining, refused, retry, shadow| LimitStatus {
            name: name.into(),
            limit: 10,
            remaining,
            window_ms: 1000,
            reset_after_ms: 1500,
            retry_after_ms: retry,
            refused,
            shadow,
            ..Default::default()
        };
        let (a, b, s) = (
            l("a", 4, false, 0, false),
            l("b", 2, false, 0, false),
            l("s", 0, true, 900, true),
        );
        let st = descriptor_status(&[&a, &b, &s]);
        assert_eq!(st.code, Code::Ok as i32);
        assert_eq!(st.current_limit.unwrap().name, "b");
        assert_eq!(st.limit_remaining, 2);
        assert_eq!(st.duration_until_reset.unwrap().nanos, 500_000_000);
        let (c, d) = (l("c", 0, true, 100, false), l("d", 0, true, 700, false));
        let st = descriptor_status(&[&a, &c, &d]);
        assert_eq!(st.code, Code::OverLimit as i32);
        assert_eq!(st.current_limit.unwrap().name, "d");
        // Shadow only: reported, never over.
        let st = descriptor_status(&[&s]);
        assert_eq!(st.code, Code::Ok as i32);
        assert_eq!(st.current_limit.unwrap().name, "s");
        let st = descriptor_status(&[]);
        assert_eq!((st.code, st.current_limit), (Code::Ok as i32, None));
    }
}
