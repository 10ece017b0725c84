//! Rules end to end: a rules file in envoyproxy/ratelimit's format (with our extensions)
//! read by a running limiter, asked over its HTTP API, with buckets in memory and in a real
//! redis-server. What a user of the rules notices: which requests are refused, by which
//! limit, what the others kept, and how a change to the file takes effect.

mod common;

use std::time::{Duration, Instant};

use common::{LimiterInstance, RulesFile};
use domain::api::CheckResponse;
use serde_json::{Value, json};
use testkit::RedisServer;

/// One descriptor of `entries` in domain `api`.
fn descriptor(entries: &[(&str, &str)]) -> Value {
    json!({"entries": entries.iter().map(|(k, v)| json!({"key": k, "value": v})).collect::<Vec<_>>()})
}

async fn check(limiter: &str, descriptors: Vec<Value>, cost: i64) -> CheckResponse {
    let response = reqwest::Client::new()
        .post(format!("{limiter}/check"))
        .json(&json!({"domain": "api", "descriptors": descriptors, "cost": cost}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    response.json().await.unwrap()
}

fn remaining(r: &CheckResponse) -> Vec<(String, u64)> {
    r.limits
        .iter()
        .map(|l| (l.name.clone(), l.remaining))
        .collect()
}

/// A limiter on the memory store, or on `redis` when given.
async fn limiter(rules: &RulesFile, redis: Option<&RedisServer>) -> LimiterInstance {
    let rules = rules.arg();
    let prefix = testkit::unique("rules");
    let url = redis.map(RedisServer::url);
    let mut args = vec!["--rules-path", rules.as_str()];
    if let Some(url) = &url {
        args.extend([
            "--redis-url",
            url.as_str(),
            "--redis-key-prefix",
            prefix.as_str(),
        ]);
    }
    LimiterInstance::start(&args).await
}

const TWO_LIMITS: &str = r#"
domain: api
descriptors:
  - key: api_key
    rate_limits:
      - name: burst
        algorithm: fixed_window
        requests_per_unit: 3
        window: 1s
      - name: daily
        algorithm: fixed_window
        requests_per_unit: 5
        unit: day
"#;

/// A burst limit and a daily quota on one key: each refuses on its own, and a refusal by
/// either spends nothing on the other; a refund gives both back, never above the limit.
async fn two_limits_on_one_key(redis: Option<&RedisServer>) {
    let rules = RulesFile::new(TWO_LIMITS);
    let l = limiter(&rules, redis).await;
    let k1 = || vec![descriptor(&[("api_key", "k1")])];
    let refused_by = |r: &CheckResponse| -> Vec<String> {
        r.limits
            .iter()
            .filter(|l| l.refused)
            .map(|l| l.name.clone())
            .collect()
    };
    // Start just after a second boundary, so the burst window lasts the next steps.
    let into_second = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_millis();
    tokio::time::sleep(Duration::from_millis(u64::from(1_000 - into_second) + 20)).await;
    for _ in 0..3 {
        assert!(check(&l.url(), k1(), 1).await.allowed);
    }
    let refused = check(&l.url(), k1(), 1).await;
    assert!(!refused.allowed);
    assert_eq!(refused_by(&refused), ["burst"]);
    assert_eq!(
        remaining(&refused),
        [("burst".into(), 0), ("daily".into(), 2)],
        "nothing spent on the daily quota"
    );
    assert!(refused.retry_after_ms > 0 && refused.retry_after_ms <= 1_000);
    // The next burst window: the daily quota (2 left) refuses a cost of 3 alone.
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let refused = check(&l.url(), k1(), 3).await;
    assert!(!refused.allowed);
    assert_eq!(refused_by(&refused), ["daily"]);
    assert_eq!(
        remaining(&refused),
        [("burst".into(), 3), ("daily".into(), 2)],
        "nothing spent on the burst limit"
    );
    // A refund of 3 (work that turned out cheaper) gives back to both, never above a limit.
    let refunded = check(&l.url(), k1(), -3).await;
    assert_eq!(
        remaining(&refunded),
        [("burst".into(), 3), ("daily".into(), 5)]
    );
    // Another key is untouched.
    assert!(
        check(&l.url(), vec![descriptor(&[("api_key", "k2")])], 3)
            .await
            .allowed
    );
    l.stop().await;
}

#[tokio::test]
async fn two_limits_on_one_key_in_memory() {
    two_limits_on_one_key(None).await;
}

#[tokio::test]
async fn two_limits_on_one_key_in_redis() {
    let redis = RedisServer::start();
    two_limits_on_one_key(Some(&redis)).await;
}

const WINDOWS: &str = r#"
domain: api
descriptors:
  - key: user_id
    rate_limit:
      name: per_user
      algorithm: fixed_window
      requests_per_unit: 5
      unit: hour
"#;

/// A change to the file applies within a second, without a restart and without resetting
/// any bucket; a bad file is refused and the rules in force stay.
async fn a_rule_change_applies_live(redis: Option<&RedisServer>) {
    let rules = RulesFile::new(WINDOWS);
    let l = limiter(&rules, redis).await;
    let u1 = || vec![descriptor(&[("user_id", "u1")])];
    for _ in 0..3 {
        assert!(check(&l.url(), u1(), 1).await.allowed);
    }
    rules.write(&WINDOWS.replace("requests_per_unit: 5", "requests_per_unit: 4"));
    let changed = Instant::now();
    loop {
        let peek = check(&l.url(), vec![descriptor(&[("user_id", "u9")])], 1).await;
        if peek.limits[0].limit == 4 {
            break;
        }
        assert!(
            changed.elapsed() < Duration::from_secs(1),
            "the new limit is not in force a second after the change"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let after = check(&l.url(), u1(), 1).await;
    assert!(after.allowed);
    assert_eq!(
        (after.limit, after.remaining),
        (4, 0),
        "the count of 3 survived the change: 4 - 4 = 0, not a fresh bucket"
    );
    assert!(!check(&l.url(), u1(), 1).await.allowed);
    // A bad file (a typo in a field name) is refused; the rules in force stay.
    rules.write(&WINDOWS.replace("requests_per_unit: 5", "request_per_unit: 100"));
    tokio::time::sleep(Duration::from_millis(800)).await;
    let kept = check(&l.url(), vec![descriptor(&[("user_id", "u8")])], 1).await;
    assert_eq!(kept.limit, 4, "the previous rules stay in force");
    l.stop().await;
}

#[tokio::test]
async fn a_rule_change_applies_live_in_memory() {
    a_rule_change_applies_live(None).await;
}

#[tokio::test]
async fn a_rule_change_applies_live_in_redis() {
    let redis = RedisServer::start();
    a_rule_change_applies_live(Some(&redis)).await;
}

const MATCHING: &str = r#"
domain: api
descriptors:
  - key: path
    value: "/search*"
    rate_limit: {name: search, unit: hour, requests_per_unit: 2}
  - key: path
    rate_limit: {name: any_path, unit: hour, requests_per_unit: 4}
  - key: plan
    value: trial
    shadow_mode: true
    rate_limit: {name: trial, unit: hour, requests_per_unit: 1}
  - key: plan
    value: internal
    rate_limit: {unlimited: true}
"#;

/// A wildcard value and a per-value rule (one bucket per distinct value); a shadow rule
/// never refuses but reports and counts what it would have refused; an unlimited rule
/// applies no limit.
#[tokio::test]
async fn wildcards_per_value_shadow_and_unlimited_rules() {
    let redis = RedisServer::start();
    let rules = RulesFile::new(MATCHING);
    let l = limiter(&rules, Some(&redis)).await;
    let path = |p: &str| vec![descriptor(&[("path", p)])];
    // Each value matching the wildcard counts on its own (the value is part of the key).
    for p in ["/search?q=1", "/search/x"] {
        let r: Vec<bool> = futures_allowed(&l.url(), path(p), 3).await;
        assert_eq!(r, [true, true, false], "{p}");
    }
    let first = check(&l.url(), path("/search?q=2"), 1).await;
    assert_eq!(first.limits[0].name, "search");
    // Any other path: the per-value rule, 4 each.
    assert_eq!(
        futures_allowed(&l.url(), path("/other"), 5).await,
        [true, true, true, true, false]
    );
    assert_eq!(
        check(&l.url(), path("/other2"), 1).await.limits[0].name,
        "any_path"
    );
    // Shadow: never refused, reported as would-refuse, counted in the metrics.
    let trial = || vec![descriptor(&[("plan", "trial")])];
    for i in 0..4 {
        let r = check(&l.url(), trial(), 1).await;
        assert!(r.allowed, "shadow never refuses");
        assert!(r.limits[0].shadow);
        assert_eq!(r.limits[0].refused, i > 0, "request {i}");
    }
    let metrics = reqwest::get(format!("{}/metrics", l.url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("ratelimit_shadow_refusals_total 3"),
        "{metrics}"
    );
    // Unlimited: allowed, no limit applied; so is a descriptor no rule matches.
    for d in [
        vec![descriptor(&[("plan", "internal")])],
        vec![descriptor(&[("nothing", "x")])],
    ] {
        for _ in 0..10 {
            let r = check(&l.url(), d.clone(), 1).await;
            assert!(r.allowed && r.limits.is_empty());
        }
    }
    l.stop().await;
}

/// `n` checks one after the other; whether each was allowed.
async fn futures_allowed(limiter: &str, descriptors: Vec<Value>, n: usize) -> Vec<bool> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(check(limiter, descriptors.clone(), 1).await.allowed);
    }
    out
}

/// Without `RULES_PATH` a request naming only a user keeps today's answers, and with a
/// rules file that does not define the default domain too.
#[tokio::test]
async fn the_built_in_rule_stays_beside_a_rules_file() {
    let rules = RulesFile::new(MATCHING);
    let l =
        LimiterInstance::start(&["--rules-path", &rules.arg(), "--rate-limit-capacity", "3"]).await;
    let client = reqwest::Client::new();
    let mut allowed = Vec::new();
    for _ in 0..4 {
        let r: CheckResponse = client
            .post(format!("{}/check", l.url()))
            .json(&json!({"user_id": "alice"}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        allowed.push((r.allowed, r.limit));
    }
    assert_eq!(allowed, [(true, 3), (true, 3), (true, 3), (false, 3)]);
    l.stop().await;
}

/// A bad rules file at start-up: the limiter refuses to start, naming the file, the line
/// and the field.
#[tokio::test]
async fn a_bad_rules_file_stops_the_start_naming_file_line_and_field() {
    let rules = RulesFile::new(&TWO_LIMITS.replace("unit: day", "unit: fortnight"));
    let config = <rate_limiter::config::LimiterConfig as clap::Parser>::try_parse_from([
        "rate-limiter",
        "--rules-path",
        &rules.arg(),
    ])
    .unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let err = rate_limiter::Standalone::start(&config, "x".into(), &shutdown)
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("api.yaml:"), "{err}");
    // The line of the limit that holds `unit: fortnight`, and the field's whole path.
    assert!(err.contains("api.yaml:10:"), "{err}");
    assert!(err.contains("descriptors[0].rate_limits[1].unit"), "{err}");
    assert!(err.contains("fortnight"), "{err}");
}

/// A deploy that empties the rules directory before copying the new files in (`rm
/// *.yaml; cp new/*.yaml .`) must not drop every limit between two polls: a directory
/// without rules files is refused like a bad file (the rules in force stay), and stops the
/// start-up unless RULES_ALLOW_EMPTY says that no rules is meant.
#[tokio::test]
async fn an_emptied_rules_directory_keeps_the_rules_in_force() {
    let rules = RulesFile::new(TWO_LIMITS);
    let dir = rules.dir_arg();
    let l = LimiterInstance::start(&["--rules-path", dir.as_str()]).await;
    let key = || vec![descriptor(&[("api_key", "k")])];
    assert_eq!(check(&l.url(), key(), 1).await.limits.len(), 2);
    rules.remove();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let kept = check(&l.url(), key(), 1).await;
    assert_eq!(kept.limits.len(), 2, "the limits stay in force: {kept:?}");
    // The new files arrive: applied as usual.
    rules.write(&TWO_LIMITS.replace("requests_per_unit: 3", "requests_per_unit: 7"));
    let written = Instant::now();
    while check(&l.url(), vec![descriptor(&[("api_key", "k2")])], 1)
        .await
        .limits[0]
        .limit
        != 7
    {
        assert!(
            written.elapsed() < Duration::from_secs(2),
            "the new file is not applied"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    l.stop().await;

    rules.remove();
    let start = |extra: &[&str]| {
        let mut argv = vec!["rate-limiter", "--rules-path", dir.as_str()];
        argv.extend_from_slice(extra);
        <rate_limiter::config::LimiterConfig as clap::Parser>::try_parse_from(argv).unwrap()
    };
    let shutdown = tokio_util::sync::CancellationToken::new();
    let err = rate_limiter::Standalone::start(&start(&[]), "x".into(), &shutdown)
        .await
        .err()
        .expect("an empty rules directory stops the start-up")
        .to_string();
    assert!(err.contains("RULES_ALLOW_EMPTY"), "{err}");
    let allowed = rate_limiter::Standalone::start(
        &start(&["--rules-allow-empty", "true"]),
        "x".into(),
        &shutdown,
    )
    .await;
    assert!(allowed.is_ok(), "allowed when asked for");
    shutdown.cancel();
}

/// Refunds are for the services behind the limiter: the public gateway refuses them, so a
/// client cannot give itself tokens back.
#[tokio::test]
async fn the_gateway_refuses_refunds() {
    let system = common::all_in_one(&["--rate-limit-capacity", "2"]).await;
    let client = reqwest::Client::new();
    let api = format!("http://{}/api", system.gateway_addr);
    for _ in 0..2 {
        let r = client
            .post(&api)
            .json(&json!({"user_id": "mallory"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let refund = client
        .post(&api)
        .json(&json!({"user_id": "mallory", "cost": -2}))
        .send()
        .await
        .unwrap();
    assert_eq!(refund.status(), 400);
    let body: Value = refund.json().await.unwrap();
    assert_eq!(body["field"], "cost");
    let r = client
        .post(&api)
        .json(&json!({"user_id": "mallory"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429, "nothing was given back");
    system.shutdown().await.unwrap();
}

/// Descriptor requests through the public gateway: the per-rule analytics count what each
/// limit did (allowed, blocked, shadow-blocked), exactly, and `GET /analytics` shows them;
/// the 429 names the violated policy in the IETF headers and, when asked, problem details.
#[tokio::test]
async fn per_rule_counts_and_headers_through_the_gateway() {
    let rules = RulesFile::new(
        r#"
domain: api
descriptors:
  - key: api_key
    rate_limits:
      - {name: burst, requests_per_unit: 2, unit: hour}
      - {name: daily, algorithm: fixed_window, requests_per_unit: 100, unit: day}
  - key: plan
    value: trial
    shadow_mode: true
    rate_limit: {name: trial, requests_per_unit: 1, unit: hour}
"#,
    );
    let system = common::all_in_one(&["--rules-path", &rules.arg()]).await;
    let api = format!("http://{}/api", system.gateway_addr);
    let body = json!({
        "domain": "api",
        "descriptors": [
            {"entries": [{"key": "api_key", "value": "k1"}]},
            {"entries": [{"key": "plan", "value": "trial"}]},
        ],
    });
    let client = reqwest::Client::new();
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let r = client.post(&api).json(&body).send().await.unwrap();
        statuses.push(r.status().as_u16());
        if r.status() == 200 {
            assert_eq!(
                r.headers()["ratelimit-policy"],
                "\"burst\";q=2;w=3600, \"daily\";q=100;w=86400"
            );
        }
    }
    assert_eq!(statuses, [200, 200, 429]);
    let refused = client
        .post(&api)
        .header("accept", "application/problem+json")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 429);
    assert_eq!(
        refused.headers()["content-type"],
        "application/problem+json"
    );
    assert!(
        refused.headers()["ratelimit"]
            .to_str()
            .unwrap()
            .starts_with("\"burst\";r=0;t="),
        "{:?}",
        refused.headers()["ratelimit"]
    );
    let problem: Value = refused.json().await.unwrap();
    assert_eq!(problem["violated-policies"], json!(["burst"]));
    assert_eq!(problem["status"], 429);
    // 4 decisions: burst allowed 2 and blocked 2; daily allowed 2 (it refused nothing);
    // trial (shadow) allowed the first, would have refused the 3 others.
    // Most blocked (or shadow-blocked) first.
    let expected = json!([
        {"rule": "api:trial", "allowed": 1, "blocked": 0, "shadow_blocked": 3},
        {"rule": "api:burst", "allowed": 2, "blocked": 2, "shadow_blocked": 0},
        {"rule": "api:daily", "allowed": 2, "blocked": 0, "shadow_blocked": 0},
    ]);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let analytics: Value = client
            .get(format!("http://{}/analytics", system.gateway_addr))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if analytics["rules"] == expected {
            break;
        }
        assert!(Instant::now() < deadline, "{}", analytics["rules"]);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    system.shutdown().await.unwrap();
}
