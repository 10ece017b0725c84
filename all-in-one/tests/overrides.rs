//! The admin API of the rules: overrides (per-customer limits set without a deploy),
//! applied by every limiter within a second; bucket peeks and resets; all behind
//! `ADMIN_TOKEN`. Against the embedded all-in-one (through the public gateway) and against
//! two limiters sharing a real redis-server.

mod common;

use std::time::{Duration, Instant};

use common::LimiterInstance;
use serde_json::{Value, json};
use testkit::RedisServer;

const TOKEN: &str = "s3cret-admin";

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

async fn api(base: &str, user: &str) -> u16 {
    client()
        .post(format!("{base}/api"))
        .json(&json!({"user_id": user}))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

fn gold(id: &str, user: &str, requests: u64) -> Value {
    json!({
        "id": id,
        "entries": [{"key": "user_id", "value": user}],
        "limits": [{"name": "default", "requests_per_unit": requests, "unit": "hour"}],
    })
}

async fn put(base: &str, token: Option<&str>, body: &Value) -> (u16, Value) {
    let mut req = client().put(format!("{base}/admin/overrides")).json(body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn get(url: String) -> (u16, Value) {
    let r = client().get(url).bearer_auth(TOKEN).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Without ADMIN_TOKEN the admin routes do not exist; with it, a wrong or missing token
/// is refused; the right one sets an override that gives one user a limit of their own,
/// which the gateway applies at once; peeks spend nothing; a reset starts a bucket afresh;
/// a delete brings the rule back.
#[tokio::test]
async fn overrides_peeks_and_resets_through_the_public_gateway() {
    let open = common::all_in_one(&["--rate-limit-capacity", "2"]).await;
    let base = format!("http://{}", open.gateway_addr);
    let (status, body) = put(&base, Some(TOKEN), &gold("g", "vip", 5)).await;
    assert_eq!(status, 404, "disabled without ADMIN_TOKEN: {body}");
    open.shutdown().await.unwrap();

    let system = common::all_in_one(&[
        "--rate-limit-capacity",
        "2",
        "--rate-limit-refill-per-sec",
        "0.01",
        "--admin-token",
        TOKEN,
    ])
    .await;
    let base = format!("http://{}", system.gateway_addr);
    for token in [None, Some("wrong")] {
        let (status, body) = put(&base, token, &gold("g", "vip", 5)).await;
        assert_eq!(status, 401, "{token:?}: {body}");
    }
    let (status, body) = put(&base, Some(TOKEN), &gold("gold-vip", "vip", 5)).await;
    assert_eq!(status, 200, "{body}");
    let allowed = {
        let mut n = 0;
        for _ in 0..7 {
            n += u32::from(api(&base, "vip").await == 200);
        }
        n
    };
    assert_eq!(allowed, 5, "the override's 5, not the rule's 2");
    assert_eq!(api(&base, "pleb").await, 200);
    assert_eq!(api(&base, "pleb").await, 200);
    assert_eq!(
        api(&base, "pleb").await,
        429,
        "everyone else keeps the rule"
    );
    let (status, list) = get(format!("{base}/admin/overrides")).await;
    assert_eq!(status, 200);
    assert_eq!(list["overrides"][0]["id"], "gold-vip");
    // A peek spends nothing.
    for _ in 0..3 {
        let (status, peek) = get(format!("{base}/admin/buckets?user_id=vip")).await;
        assert_eq!(status, 200, "{peek}");
        assert_eq!(peek["limits"][0]["remaining"], 0, "{peek}");
        assert_eq!(peek["limits"][0]["limit"], 5, "{peek}");
    }
    // A reset starts the bucket afresh.
    let r = client()
        .delete(format!("{base}/admin/buckets?user_id=vip"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(api(&base, "vip").await, 200);
    // Deleted: the rule's limit is back (2, and vip has spent 1 since the reset).
    let r = client()
        .delete(format!("{base}/admin/overrides/gold-vip"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let (_, peek) = get(format!("{base}/admin/buckets?user_id=vip")).await;
    assert_eq!(peek["limits"][0]["limit"], 2, "{peek}");
    let r = client()
        .delete(format!("{base}/admin/overrides/gold-vip"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "already gone");
    system.shutdown().await.unwrap();
}

/// Hostile input to the admin API gets a clear 4xx and changes nothing.
#[tokio::test]
async fn hostile_overrides_are_refused_and_change_nothing() {
    let system = common::all_in_one(&["--rate-limit-capacity", "2", "--admin-token", TOKEN]).await;
    let base = format!("http://{}", system.gateway_addr);
    let many_entries: Vec<Value> = (0..10_000)
        .map(|i| json!({"key": format!("k{i}"), "value": "v"}))
        .collect();
    let cases: Vec<(&str, Value)> = vec![
        (
            "wrong type",
            json!({"id": "x", "entries": "user_id", "limits": []}),
        ),
        (
            "no limits",
            json!({"id": "x", "entries": [{"key": "user_id", "value": "u"}], "limits": []}),
        ),
        (
            "huge number",
            json!({"id": "x", "entries": [{"key": "user_id", "value": "u"}], "limits": [{"name": "n", "requests_per_unit": 1e30, "unit": "second"}]}),
        ),
        (
            "negative",
            json!({"id": "x", "entries": [{"key": "user_id", "value": "u"}], "limits": [{"name": "n", "requests_per_unit": -5, "unit": "second"}]}),
        ),
        (
            "bad unit",
            json!({"id": "x", "entries": [{"key": "user_id", "value": "u"}], "limits": [{"name": "n", "requests_per_unit": 5, "unit": "fortnight"}]}),
        ),
        (
            "typo",
            json!({"id": "x", "entries": [{"key": "user_id", "value": "u"}], "limits": [{"name": "n", "request_per_unit": 5, "unit": "second"}]}),
        ),
        (
            "no name",
            json!({"id": "x", "entries": [{"key": "user_id", "value": "u"}], "limits": [{"requests_per_unit": 5, "unit": "second"}]}),
        ),
        (
            "bad id",
            json!({"id": "../../etc", "entries": [{"key": "user_id", "value": "u"}], "limits": [{"name": "n", "requests_per_unit": 5, "unit": "second"}]}),
        ),
        (
            "unknown field",
            json!({"id": "x", "entries": [{"key": "user_id", "value": "u"}], "limits": [{"name": "n", "requests_per_unit": 5, "unit": "second"}], "admin": true}),
        ),
        (
            "control character",
            json!({"id": "x", "entries": [{"key": "user_id", "value": "a\u{0}b"}], "limits": [{"name": "n", "requests_per_unit": 5, "unit": "second"}]}),
        ),
        (
            "too many entries",
            json!({"id": "x", "entries": many_entries, "limits": [{"name": "n", "requests_per_unit": 5, "unit": "second"}]}),
        ),
        ("not an object", json!([1, 2, 3])),
    ];
    for (what, body) in cases {
        let (status, answer) = put(&base, Some(TOKEN), &body).await;
        assert!(status == 400 || status == 413, "{what}: {status} {answer}");
        if status == 400 {
            assert!(
                answer["detail"].as_str().is_some_and(|d| !d.is_empty()),
                "{what}: {answer}"
            );
        }
    }
    // A valid override of more than 4 KiB (16 limits with long names): the gateway passes
    // on what the limiter takes (once refused at the gateway with 413).
    let limits: Vec<Value> = (0..16)
        .map(|i| json!({"name": format!("{i:02}{}", "n".repeat(250)), "requests_per_unit": 5 + i, "unit": "hour"}))
        .collect();
    let big =
        json!({"id": "big", "entries": [{"key": "user_id", "value": "big"}], "limits": limits});
    assert!(big.to_string().len() > 4 * 1024);
    let (status, answer) = put(&base, Some(TOKEN), &big).await;
    assert_eq!(status, 200, "{answer}");
    let (status, _) = client()
        .delete(format!("{base}/admin/overrides/big"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .map(|r| (r.status().as_u16(), ()))
        .unwrap();
    assert_eq!(status, 204);
    // A descriptor that tries to escape its hash tag is just a value: its own bucket.
    let escape = json!({
        "id": "escape",
        "entries": [{"key": "user_id", "value": "}evil{"}],
        "limits": [{"name": "default", "requests_per_unit": 1, "unit": "hour"}],
    });
    assert_eq!(put(&base, Some(TOKEN), &escape).await.0, 200);
    let (_, list) = get(format!("{base}/admin/overrides")).await;
    assert_eq!(list["overrides"].as_array().unwrap().len(), 1, "{list}");
    assert_eq!(api(&base, "}evil{").await, 200);
    assert_eq!(api(&base, "}evil{").await, 429);
    assert_eq!(api(&base, "evil").await, 200, "another user, untouched");
    system.shutdown().await.unwrap();
}

/// Two limiters on one Redis: an override set through one is in force on the other within
/// a second, and survives on both.
#[tokio::test]
async fn an_override_is_applied_by_a_second_limiter_within_a_second() {
    let redis = RedisServer::start();
    let url = redis.url();
    let prefix = testkit::unique("ovr");
    let args = [
        "--redis-url",
        url.as_str(),
        "--redis-key-prefix",
        prefix.as_str(),
        "--rate-limit-capacity",
        "2",
        "--rate-limit-refill-per-sec",
        "0.01",
        "--admin-token",
        TOKEN,
    ];
    let a = LimiterInstance::start(&args).await;
    let b = LimiterInstance::start(&args).await;
    let check = |base: String| async move {
        let r: Value = client()
            .post(format!("{base}/check"))
            .json(&json!({"user_id": "acme"}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        r["limit"].as_u64().unwrap()
    };
    assert_eq!(check(b.url()).await, 2);
    let (status, body) = put(&a.url(), Some(TOKEN), &gold("acme", "acme", 50)).await;
    assert_eq!(status, 200, "{body}");
    let set = Instant::now();
    loop {
        if check(b.url()).await == 50 {
            break;
        }
        assert!(
            set.elapsed() < Duration::from_secs(1),
            "limiter b does not apply the override a second after it was set on a"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(check(a.url()).await, 50);
    // The count carried over: 3 spent of 50 (the override keeps the rule's limit name).
    let (_, peek) = get(format!("{}/admin/buckets?user_id=acme", b.url())).await;
    assert_eq!(peek["limits"][0]["limit"], 50, "{peek}");
    a.stop().await;
    b.stop().await;
}
