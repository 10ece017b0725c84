//! Envoy's rate limit quota service (RLQS):
//! `envoy.service.rate_limit_quota.v3.RateLimitQuotaService/StreamRateLimitQuotas`, served
//! on `GRPC_PORT` beside `ShouldRateLimit`, for Envoy's `envoy.filters.http.rate_limit_quota`
//! filter. Envoy decides every request itself from an assignment sent here, and reports
//! its usage on one long-lived stream; this service divides each limit between the Envoys
//! that report it.
//!
//! - [`QuotaService`]: one stream per Envoy (a `StreamHandler` each); every report is
//!   answered with an action for each bucket it names.
//! - [`division`]: the arithmetic of shares and token buckets.
//! - [`board`]: the demands of every stream, shared by the limiter replicas (Redis), or in
//!   this process (memory).
//!
//! The mapping:
//! - The stream's domain is the first report's `domain` (required; later ones are ignored).
//! - A bucket id (a map of strings) is the descriptor of that domain whose entries are the
//!   id's, **sorted by key** (a canonical order: Envoy's map has none): `{name: shared,
//!   tenant: acme}` is `[name=shared, tenant=acme]`, matched by a rules file that nests
//!   `name` then `tenant`. The same rules, overrides, shadow mode and live reload apply as
//!   for `ShouldRateLimit`.
//! - No rule, `unlimited`, or shadow mode only → `ALLOW_ALL` (what a shadow limit would
//!   have refused is still spent and counted). An enforced limit → a `token_bucket` of this
//!   Envoy's share of the most restrictive one ([`division::share`] of `limit / window`);
//!   `DENY_ALL` while any enforced limit has nothing left in its window. A rule that no
//!   longer applies to a bucket that had one → `abandon_action` (Envoy subscribes afresh).
//! - Every assignment lives `2 ×` the stream's reporting interval `+ 1 s` (2 s to 60 s,
//!   whole seconds; Envoy 1.40 reports every 5 s, so 11 s): refreshed by every report,
//!   it outlives one lost report; an Envoy that loses this service keeps it that long,
//!   then follows its own `expired_assignment_behavior`.
//! - What Envoy reports admitted is spent from the limits (at most what they have left),
//!   so the fleet's admissions track the limit; allowed and denied are published as events
//!   of the bucket's identity, one per report and outcome, standing for that many requests
//!   (`count`), which the analytics counters add.
//! - A store that is unavailable (fail-closed) gets no action: Envoy keeps what it holds
//!   until the TTL.
//!
//! Bounded input, each with the status that names it: [`MAX_STREAMS_PER_CONNECTION`]
//! and [`MAX_BUCKETS_PER_STREAM`] (`RESOURCE_EXHAUSTED`), a bucket id of at most
//! [`MAX_ENTRIES`] entries and [`MAX_BUCKET_ID_BYTES`] (`INVALID_ARGUMENT`, as is an
//! empty domain, and a bucket's usage of more than [`MAX_REQUESTS_PER_USAGE`] requests),
//! [`MAX_REPORTS_PER_SECOND`] (`RESOURCE_EXHAUSTED`), a report of at most
//! [`MAX_REPORT_BYTES`] (`OUT_OF_RANGE`, tonic's). Each closes that stream only.

pub mod board;
pub mod division;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use domain::api::{CheckRequest, FromJson, MAX_ENTRIES, analytics_identity};
use domain::{Clock, SystemClock};
use envoy_types::pb::envoy::service::rate_limit_quota::v3::rate_limit_quota_response::{
    BucketAction, bucket_action,
};
use envoy_types::pb::envoy::service::rate_limit_quota::v3::rate_limit_quota_service_server::{
    RateLimitQuotaService, RateLimitQuotaServiceServer,
};
use envoy_types::pb::envoy::service::rate_limit_quota::v3::{
    BucketId, RateLimitQuotaResponse, RateLimitQuotaUsageReports,
};
use envoy_types::pb::envoy::r#type::v3::{RateLimitStrategy, TokenBucket, rate_limit_strategy};
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use self::board::{DemandBoard, MemoryBoard, RedisBoard};
use self::division::Assignment;
use crate::limiter::{Checked, Limiter};

/// Streams one connection may hold open at once (Envoy opens one per filter config).
pub const MAX_STREAMS_PER_CONNECTION: usize = 16;
/// Buckets one stream may report.
pub const MAX_BUCKETS_PER_STREAM: usize = 1_000;
/// Longest bucket id: its keys and values together, in bytes.
pub const MAX_BUCKET_ID_BYTES: usize = 1_024;
/// Reports one stream may send a second, on average (Envoy sends one per reporting
/// interval, and one at once for each new bucket).
pub const MAX_REPORTS_PER_SECOND: f64 = 20.0;
/// Reports one stream may send at once above that rate.
pub const REPORT_BURST: f64 = 40.0;
/// Largest report accepted.
pub const MAX_REPORT_BYTES: usize = 256 * 1024;
/// Requests (allowed + denied) one report may name for one bucket: far above what an Envoy
/// serves in a reporting interval, and a bound on what a report adds to the analytics.
pub const MAX_REQUESTS_PER_USAGE: u64 = 1_000_000_000;
/// Store and board calls made at once for one report.
const CONCURRENCY: usize = 16;
/// How often Envoy 1.40's filter reports, whatever the bucket's `reporting_interval`
/// says (its `filter_persistence.cc` hard-codes 5 s): the interval assumed until a stream's
/// reports show their own.
const ENVOY_REPORTING_SECONDS: f64 = 5.0;
/// Shortest and longest assignment TTL, in seconds.
const TTL_SECONDS: (u64, u64) = (2, 60);

/// The service in front of a [`Limiter`].
#[derive(Clone)]
pub struct QuotaService {
    limiter: Arc<Limiter>,
    board: Arc<dyn DemandBoard>,
    clock: Arc<dyn Clock>,
    /// Open streams by connection (its peer address).
    streams: Arc<DashMap<SocketAddr, usize>>,
    shutdown: CancellationToken,
}

impl QuotaService {
    /// The service, with its demand board where the limiter shares its state: Redis when
    /// the limiter has it, else this process.
    pub fn new(limiter: Arc<Limiter>, shutdown: CancellationToken) -> Self {
        let board: Arc<dyn DemandBoard> = match limiter.overrides().shared_redis() {
            Some((conn, prefix, timeout)) => Arc::new(RedisBoard::new(conn, &prefix, timeout)),
            None => Arc::new(MemoryBoard::default()),
        };
        Self::with_board(limiter, board, shutdown)
    }

    /// The service with `board` as its demand board.
    pub fn with_board(
        limiter: Arc<Limiter>,
        board: Arc<dyn DemandBoard>,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            limiter,
            board,
            clock: Arc::new(SystemClock),
            streams: Arc::new(DashMap::new()),
            shutdown,
        }
    }

    /// The tonic service, with the report size bound.
    pub fn server(self) -> RateLimitQuotaServiceServer<Self> {
        RateLimitQuotaServiceServer::new(self)
            .max_decoding_message_size(MAX_REPORT_BYTES)
            .max_encoding_message_size(MAX_REPORT_BYTES)
    }
}

type Responses = Pin<Box<dyn Stream<Item = Result<RateLimitQuotaResponse, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl RateLimitQuotaService for QuotaService {
    type StreamRateLimitQuotasStream = Responses;

    async fn stream_rate_limit_quotas(
        &self,
        request: tonic::Request<tonic::Streaming<RateLimitQuotaUsageReports>>,
    ) -> Result<tonic::Response<Responses>, tonic::Status> {
        let peer = request.remote_addr();
        let slot = match peer {
            Some(peer) => Some(StreamSlot::take(&self.streams, peer)?),
            None => None,
        };
        let (tx, rx) = mpsc::channel(8);
        let handler = StreamHandler {
            service: self.clone(),
            member: stream_id(),
            domain: None,
            buckets: HashMap::new(),
            allowance: REPORT_BURST,
            last_report: Instant::now(),
        };
        tokio::spawn(handler.run(request.into_inner(), tx, slot));
        let responses = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        Ok(tonic::Response::new(Box::pin(responses)))
    }
}

/// A stream's place in its connection's count, given back on drop.
struct StreamSlot {
    streams: Arc<DashMap<SocketAddr, usize>>,
    peer: SocketAddr,
}

impl StreamSlot {
    fn take(
        streams: &Arc<DashMap<SocketAddr, usize>>,
        peer: SocketAddr,
    ) -> Result<Self, tonic::Status> {
        let mut open = streams.entry(peer).or_insert(0);
        if *open >= MAX_STREAMS_PER_CONNECTION {
            refused(tonic::Code::ResourceExhausted);
            return Err(tonic::Status::resource_exhausted(format!(
                "streams: at most {MAX_STREAMS_PER_CONNECTION} open streams per connection"
            )));
        }
        *open += 1;
        Ok(Self {
            streams: streams.clone(),
            peer,
        })
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.streams.remove_if_mut(&self.peer, |_, open| {
            *open -= 1;
            *open == 0
        });
    }
}

/// Counts a stream refused with `code`.
fn refused(code: tonic::Code) {
    metrics::counter!("ratelimit_rlqs_streams_refused_total", "code" => format!("{code:?}"))
        .increment(1);
}

/// A random id for a stream, its field in the demand board.
fn stream_id() -> String {
    format!("{:016x}", kit::ids::random_u64())
}

/// A bucket id in canonical order.
type BucketKey = Vec<(String, String)>;

/// What a stream knows of one of its buckets.
struct Held {
    /// As Envoy sent it: actions echo it exactly.
    id: BucketId,
    request: CheckRequest,
    /// The bucket's name on the demand board.
    board_key: String,
    /// Requests (allowed + denied) a second, smoothed.
    demand: Option<f64>,
    /// Seconds between reports, smoothed.
    interval: f64,
    last: Option<Instant>,
    held: Option<Assignment>,
    /// An enforced or shadow limit applied when last seen (its removal abandons the bucket).
    limited: bool,
    /// The demands on the board when last read: the division kept while it cannot be read.
    seen: Vec<f64>,
}

/// One bucket's share of a report, decided apart from the stream's state.
struct Job {
    key: BucketKey,
    request: CheckRequest,
    board_key: String,
    demand: f64,
    allowed: u64,
    denied: u64,
    held: Option<Assignment>,
    limited: bool,
    ttl: u64,
    seen: Vec<f64>,
}

/// What became of a job.
struct Done {
    key: BucketKey,
    action: Option<bucket_action::BucketAction>,
    held: Option<Assignment>,
    limited: bool,
    seen: Vec<f64>,
}

/// One Envoy's stream.
struct StreamHandler {
    service: QuotaService,
    member: String,
    domain: Option<String>,
    buckets: HashMap<BucketKey, Held>,
    /// Reports that may still be sent at once (a token bucket of the report rate).
    allowance: f64,
    last_report: Instant,
}

impl StreamHandler {
    async fn run(
        mut self,
        mut reports: tonic::Streaming<RateLimitQuotaUsageReports>,
        tx: mpsc::Sender<Result<RateLimitQuotaResponse, tonic::Status>>,
        _slot: Option<StreamSlot>,
    ) {
        let shutdown = self.service.shutdown.clone();
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tx.closed() => break,
                next = reports.message() => next,
            };
            let report = match next {
                Ok(Some(report)) => report,
                Ok(None) => break,
                Err(status) => {
                    // Garbage (tonic's decode error is INTERNAL), or a report above the
                    // size bound: this stream ends. Anything else is the peer gone.
                    let code = match status.code() {
                        tonic::Code::Internal => tonic::Code::InvalidArgument,
                        code @ (tonic::Code::OutOfRange | tonic::Code::ResourceExhausted) => code,
                        _ => {
                            tracing::debug!(error = %status, "rlqs stream ended by its peer");
                            break;
                        }
                    };
                    refused(code);
                    tracing::debug!(error = %status, "rlqs stream closed: unreadable report");
                    let _ = tx
                        .send(Err(tonic::Status::new(code, status.message().to_owned())))
                        .await;
                    break;
                }
            };
            match self.answer(report).await {
                Ok(actions) if actions.is_empty() => {}
                Ok(actions) => {
                    let response = RateLimitQuotaResponse {
                        bucket_action: actions,
                    };
                    if tx.send(Ok(response)).await.is_err() {
                        break;
                    }
                }
                Err(status) => {
                    refused(status.code());
                    tracing::debug!(error = %status, "rlqs stream refused");
                    let _ = tx.send(Err(status)).await;
                    break;
                }
            }
        }
        // Off the board at once: the others' shares grow at their next report.
        let board = &self.service.board;
        futures::stream::iter(self.buckets.values())
            .for_each_concurrent(CONCURRENCY, |held| {
                board.leave(&held.board_key, &self.member)
            })
            .await;
    }

    /// The actions answering one report, or why the stream ends.
    async fn answer(
        &mut self,
        report: RateLimitQuotaUsageReports,
    ) -> Result<Vec<BucketAction>, tonic::Status> {
        let now = Instant::now();
        self.allowance = (self.allowance
            + now.duration_since(self.last_report).as_secs_f64() * MAX_REPORTS_PER_SECOND)
            .min(REPORT_BURST);
        self.last_report = now;
        if self.allowance < 1.0 {
            return Err(tonic::Status::resource_exhausted(format!(
                "reports: at most {MAX_REPORTS_PER_SECOND} a second per stream"
            )));
        }
        self.allowance -= 1.0;
        let domain = match &self.domain {
            Some(domain) => domain.clone(),
            None => {
                let domain = valid_domain(&report.domain)?;
                self.domain = Some(domain.clone());
                domain
            }
        };
        let mut jobs = Vec::with_capacity(report.bucket_quota_usages.len());
        for (i, usage) in report.bucket_quota_usages.into_iter().enumerate() {
            let field = format!("bucket_quota_usages[{i}].bucket_id");
            let id = usage.bucket_id.unwrap_or_default();
            let key = bucket_key(&id, &field)?;
            if !self.buckets.contains_key(&key) {
                if self.buckets.len() >= MAX_BUCKETS_PER_STREAM {
                    return Err(tonic::Status::resource_exhausted(format!(
                        "bucket_quota_usages: at most {MAX_BUCKETS_PER_STREAM} buckets per stream"
                    )));
                }
                let request = bucket_request(&domain, &key, &field)?;
                let board_key = format!(
                    "{domain}:{}",
                    key.iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join("/")
                );
                self.buckets.insert(
                    key.clone(),
                    Held {
                        id,
                        request,
                        board_key,
                        demand: None,
                        interval: ENVOY_REPORTING_SECONDS,
                        last: None,
                        held: None,
                        limited: false,
                        seen: Vec::new(),
                    },
                );
            }
            let held = self.buckets.get_mut(&key).expect("inserted");
            let used = usage
                .num_requests_allowed
                .saturating_add(usage.num_requests_denied);
            if used > MAX_REQUESTS_PER_USAGE {
                return Err(tonic::Status::invalid_argument(format!(
                    "bucket_quota_usages[{i}]: at most {MAX_REQUESTS_PER_USAGE} requests (allowed + denied) a report"
                )));
            }
            let reported = usage.time_elapsed.map_or(0.0, |d| {
                d.seconds.max(0) as f64 + f64::from(d.nanos.max(0)) / 1e9
            });
            // Over what time `used` was spent: since this stream's last report of the
            // bucket (our clock), else what Envoy says (whole seconds; 0 for a new bucket,
            // whose first report is sent at once and says nothing of its demand yet).
            let elapsed = match held.last {
                Some(last) => {
                    let seen = now.duration_since(last).as_secs_f64();
                    // Up at once, down slowly: the TTL must outlive the longest gap.
                    held.interval = (0.9 * held.interval + 0.1 * seen).max(seen).min(60.0);
                    Some(seen.max(0.25))
                }
                None => (reported >= 1.0).then_some(reported),
            };
            held.last = Some(now);
            if let Some(elapsed) = elapsed {
                let sample = used as f64 / elapsed;
                held.demand = Some(match held.demand {
                    Some(d) => 0.5 * d + 0.5 * sample,
                    None => sample,
                });
            }
            let demand = held.demand.unwrap_or(0.0);
            let ttl = ((2.0 * held.interval).ceil() as u64 + 1).clamp(TTL_SECONDS.0, TTL_SECONDS.1);
            jobs.push(Job {
                key,
                request: held.request.clone(),
                board_key: held.board_key.clone(),
                demand,
                allowed: usage.num_requests_allowed,
                denied: usage.num_requests_denied,
                held: held.held,
                limited: held.limited,
                ttl,
                seen: held.seen.clone(),
            });
        }
        let service = &self.service;
        let member = &self.member;
        let done: Vec<Done> = futures::stream::iter(jobs)
            .map(|job| decide(service, member, job))
            .buffered(CONCURRENCY)
            .collect()
            .await;
        let mut actions = Vec::with_capacity(done.len());
        for done in done {
            let Some(action) = done.action else { continue };
            let abandoned = matches!(action, bucket_action::BucketAction::AbandonAction(_));
            // A bucket named twice in one report may be gone already (abandoned).
            let id = if abandoned {
                let Some(held) = self.buckets.remove(&done.key) else {
                    continue;
                };
                self.service
                    .board
                    .leave(&held.board_key, &self.member)
                    .await;
                held.id
            } else {
                let Some(held) = self.buckets.get_mut(&done.key) else {
                    continue;
                };
                held.held = done.held;
                held.limited = done.limited;
                held.seen = done.seen;
                held.id.clone()
            };
            actions.push(BucketAction {
                bucket_id: Some(id),
                bucket_action: Some(action),
            });
        }
        Ok(actions)
    }
}

/// Spends what the bucket's Envoy admitted, counts its report, posts its demand, and
/// decides its assignment.
async fn decide(service: &QuotaService, member: &str, job: Job) -> Done {
    let limiter = &service.limiter;
    let mut spend = job.request.clone();
    spend.cost = i64::try_from(job.allowed).unwrap_or(i64::MAX);
    let checked: Checked = match limiter.spend_admitted(&spend).await {
        Ok(checked) => checked,
        Err(err) => {
            // Nothing is sent: Envoy keeps its assignment until the TTL.
            tracing::debug!(error = %err, "rlqs: bucket not decided");
            return Done {
                key: job.key,
                action: None,
                held: job.held,
                limited: job.limited,
                seen: job.seen,
            };
        }
    };
    limiter.count_reported(&job.request, &checked, job.allowed, job.denied);
    let limited = !checked.limits.is_empty();
    let enforced: Vec<_> = checked.limits.iter().filter(|l| !l.shadow).collect();
    let mut seen = job.seen.clone();
    let assignment = if enforced.is_empty() {
        if job.limited && !limited {
            // The rule went away: Envoy forgets the bucket and subscribes afresh.
            return Done {
                key: job.key,
                action: Some(bucket_action::BucketAction::AbandonAction(
                    bucket_action::AbandonAction {},
                )),
                held: None,
                limited: false,
                seen: Vec::new(),
            };
        }
        Assignment::AllowAll
    } else if enforced.iter().any(|l| l.remaining == 0) {
        Assignment::DenyAll
    } else {
        let stale = Duration::from_secs(job.ttl);
        let all = match service
            .board
            .post(
                &job.board_key,
                member,
                job.demand,
                service.clock.now_ms(),
                stale,
            )
            .await
        {
            Ok(all) => all,
            // The division last seen (this stream alone when there is none): the shares
            // hold while the board is away rather than each Envoy taking the whole limit.
            Err(err) if job.seen.is_empty() => {
                tracing::debug!(error = %err, "rlqs: demand board unavailable; dividing by this stream alone");
                vec![job.demand]
            }
            Err(err) => {
                tracing::debug!(error = %err, "rlqs: demand board unavailable; keeping the last division");
                job.seen.clone()
            }
        };
        seen.clone_from(&all);
        let rate = enforced
            .iter()
            .map(|l| {
                let total = l.limit as f64 / (l.window_ms.max(1) as f64 / 1000.0);
                division::share(total, job.demand, &all)
            })
            .fold(f64::INFINITY, f64::min);
        Assignment::share(rate).settled(job.held)
    };
    Done {
        key: job.key,
        action: Some(quota_action(assignment, job.ttl)),
        held: Some(assignment),
        limited,
        seen,
    }
}

/// An assignment as Envoy's action, living `ttl` seconds.
fn quota_action(assignment: Assignment, ttl: u64) -> bucket_action::BucketAction {
    use rate_limit_strategy::{BlanketRule, Strategy};
    let strategy = match assignment {
        Assignment::AllowAll => Strategy::BlanketRule(BlanketRule::AllowAll as i32),
        Assignment::DenyAll => Strategy::BlanketRule(BlanketRule::DenyAll as i32),
        Assignment::Share { bucket, .. } => Strategy::TokenBucket(TokenBucket {
            max_tokens: bucket.max_tokens,
            tokens_per_fill: Some(envoy_types::pb::google::protobuf::UInt32Value {
                value: bucket.tokens_per_fill,
            }),
            // As many nanoseconds as seconds (Envoy reads whole seconds): Envoy 1.40
            // compares a new token bucket with the one it holds by `max_tokens`,
            // `tokens_per_fill` and the interval's *nanos* only, so an interval that
            // changes in seconds alone would be ignored.
            fill_interval: Some(envoy_types::pb::google::protobuf::Duration {
                seconds: i64::try_from(bucket.fill_seconds).unwrap_or(i64::MAX),
                nanos: i32::try_from(bucket.fill_seconds).unwrap_or(0),
            }),
        }),
    };
    bucket_action::BucketAction::QuotaAssignmentAction(bucket_action::QuotaAssignmentAction {
        assignment_time_to_live: Some(seconds(ttl)),
        rate_limit_strategy: Some(RateLimitStrategy {
            strategy: Some(strategy),
        }),
    })
}

fn seconds(s: u64) -> envoy_types::pb::google::protobuf::Duration {
    envoy_types::pb::google::protobuf::Duration {
        seconds: i64::try_from(s).unwrap_or(i64::MAX),
        nanos: 0,
    }
}

/// The stream's domain: the first report's, required.
fn valid_domain(raw: &str) -> Result<String, tonic::Status> {
    if raw.is_empty() {
        return Err(tonic::Status::invalid_argument(
            "domain: must not be empty in a stream's first report",
        ));
    }
    let request = CheckRequest::from_json(
        serde_json::json!({"domain": raw, "descriptors": [{"entries": [{"key": "k", "value": "v"}]}]})
            .to_string()
            .as_bytes(),
    )
    .map_err(|e| tonic::Status::invalid_argument(format!("{}: {}", e.field, e.detail)))?;
    Ok(request.domain)
}

/// A bucket id's entries sorted by key, within the bounds.
fn bucket_key(id: &BucketId, field: &str) -> Result<BucketKey, tonic::Status> {
    if id.bucket.is_empty() || id.bucket.len() > MAX_ENTRIES {
        return Err(tonic::Status::invalid_argument(format!(
            "{field}: must hold 1 to {MAX_ENTRIES} entries"
        )));
    }
    let bytes: usize = id.bucket.iter().map(|(k, v)| k.len() + v.len()).sum();
    if bytes > MAX_BUCKET_ID_BYTES {
        return Err(tonic::Status::invalid_argument(format!(
            "{field}: must be at most {MAX_BUCKET_ID_BYTES} bytes of keys and values"
        )));
    }
    let sorted: BTreeMap<&String, &String> = id.bucket.iter().collect();
    Ok(sorted
        .into_iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect())
}

/// The request a bucket stands for: its domain and one descriptor, checked as any
/// request's (key and value lengths, the identity rule).
fn bucket_request(
    domain: &str,
    key: &BucketKey,
    field: &str,
) -> Result<CheckRequest, tonic::Status> {
    let entries: Vec<serde_json::Value> = key
        .iter()
        .map(|(k, v)| serde_json::json!({"key": k, "value": v}))
        .collect();
    let body = serde_json::json!({"domain": domain, "descriptors": [{"entries": entries}]});
    let mut request = CheckRequest::from_json(body.to_string().as_bytes())
        .map_err(|e| tonic::Status::invalid_argument(format!("{field}: {}", e.detail)))?;
    request.user_id = analytics_identity(&request.descriptors);
    Ok(request)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(pairs: &[(&str, &str)]) -> BucketId {
        BucketId {
            bucket: pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }

    #[test]
    fn a_bucket_id_is_a_descriptor_in_key_order() {
        let key = bucket_key(&id(&[("tenant", "acme"), ("name", "shared")]), "b").unwrap();
        let request = bucket_request("api", &key, "b").unwrap();
        let entries: Vec<(&str, &str)> = request.descriptors[0]
            .entries
            .iter()
            .map(|e| (e.key.as_str(), e.value.as_str()))
            .collect();
        assert_eq!(entries, [("name", "shared"), ("tenant", "acme")]);
        assert_eq!(request.domain, "api");
        assert_eq!(request.user_id, "name=shared/tenant=acme");
    }

    #[test]
    fn bad_bucket_ids_and_domains_are_invalid_arguments() {
        let code = |r: Result<BucketKey, tonic::Status>| r.err().map(|s| s.code());
        assert_eq!(
            code(bucket_key(&id(&[]), "b")),
            Some(tonic::Code::InvalidArgument)
        );
        let huge = "x".repeat(MAX_BUCKET_ID_BYTES);
        assert_eq!(
            code(bucket_key(&id(&[("k", &huge)]), "b")),
            Some(tonic::Code::InvalidArgument)
        );
        let key = bucket_key(&id(&[("", "v")]), "b").unwrap();
        assert!(bucket_request("api", &key, "b").is_err());
        assert_eq!(
            valid_domain("").unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        assert_eq!(valid_domain("api").unwrap(), "api");
    }
}
