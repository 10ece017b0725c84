//! Redis over TLS (`rediss://`, the CA in `REDIS_CA_FILE`, a client certificate when the
//! server asks for one) and with AUTH (a password or an ACL user in the URL), against real
//! redis-servers that require them, with certificates made by `openssl` at run time.
//!
//! The limiter is built the way the binary builds it, from its command line, in fail-closed
//! mode: a decision that is not degraded was made in Redis, and a Redis the limiter cannot
//! reach refuses instead of deciding locally. (The file needs the `tls` feature, on by
//! default in this package.)

#![cfg(feature = "tls")]

use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use domain::Policy;
use domain::api::CheckError;
use domain::api::CheckRequest;
use kit::report::{Reports, Role};
use rate_limiter::back::store::contract::{self, Advance};
use rate_limiter::back::store::{BucketStore, RedisStore};
use rate_limiter::config::LimiterConfig;
use rate_limiter::limiter::Limiter;
use testkit::{Certificates, RedisCluster, RedisOptions, RedisServer, unique};
use tokio_util::sync::CancellationToken;

/// The limiter the `rate-limiter` binary would build from `--redis-url url`, the key
/// prefix `prefix` and `extra`: capacity 3, refilling too slowly to matter, fail-closed.
async fn limiter(url: &str, prefix: &str, extra: &[&str]) -> anyhow::Result<Arc<Limiter>> {
    let config = config(url, prefix, extra)?;
    let redis = config.redis.resolve().map_err(anyhow::Error::msg)?;
    let (limiter, _events) = rate_limiter::build(
        &config.limiter,
        &redis,
        &config.kafka,
        "tls".into(),
        &CancellationToken::new(),
    )
    .await?;
    Ok(limiter)
}

fn config(url: &str, prefix: &str, extra: &[&str]) -> anyhow::Result<LimiterConfig> {
    let mut argv = vec![
        "rate-limiter",
        "--redis-url",
        url,
        "--redis-key-prefix",
        prefix,
        "--redis-timeout-ms",
        "2000",
        "--fail-mode",
        "closed",
        "--rate-limit-capacity",
        "3",
        "--rate-limit-refill-per-sec",
        "0.001",
    ];
    argv.extend_from_slice(extra);
    Ok(LimiterConfig::try_parse_from(argv)?)
}

fn req(user: &str) -> CheckRequest {
    CheckRequest::user(user, 1)
}

/// Whether each of four checks of `user` was allowed, each asserted decided in Redis.
async fn four_checks(limiter: &Limiter, user: &str) -> Vec<bool> {
    let mut allowed = Vec::new();
    for _ in 0..4 {
        let checked = limiter.check(&req(user)).await.expect("decided in redis");
        assert!(!checked.degraded, "decided by the fallback, not by redis");
        allowed.push(checked.decision.is_allowed());
    }
    allowed
}

/// A bucket store made from the same command line, as the limiter makes it.
fn store(url: &str, prefix: &str, extra: &[&str], policy: Policy) -> RedisStore {
    let config = config(url, prefix, extra).unwrap();
    let endpoint = config
        .redis
        .resolve()
        .unwrap()
        .buckets
        .expect("REDIS_URL is set");
    RedisStore::new(&endpoint, prefix, policy, Duration::from_secs(2)).unwrap()
}

/// Asserts that the limiter `url` and `extra` make cannot use Redis (fail-closed, it
/// refuses to decide), and returns why, as the store says it (what the log shows).
async fn refused(url: &str, extra: &[&str]) -> String {
    let limiter = limiter(url, &unique("refused"), extra).await.unwrap();
    assert_eq!(
        limiter.check(&req("alice")).await.unwrap_err(),
        CheckError::StoreUnavailable
    );
    let store = store(url, &unique("refused"), extra, Policy::new(3, 1.0).unwrap());
    store.ping().await.unwrap_err().to_string()
}

fn tls_server(options: RedisOptions) -> RedisServer {
    RedisServer::start_with(RedisOptions {
        tls: Some(Certificates::generate()),
        ..options
    })
}

fn path(p: std::path::PathBuf) -> String {
    p.display().to_string()
}

#[tokio::test]
async fn over_tls_with_the_ca_file_limiters_share_buckets_in_redis() {
    let redis = tls_server(RedisOptions::default());
    let ca = path(redis.certificates().unwrap().ca_cert());
    assert!(
        redis.url().starts_with("rediss://127.0.0.1:"),
        "{}",
        redis.url()
    );
    let prefix = unique("tls");
    let args = ["--redis-ca-file", ca.as_str()];
    let first = limiter(&redis.url(), &prefix, &args).await.unwrap();
    assert_eq!(
        four_checks(&first, "alice").await,
        [true, true, true, false]
    );
    // A second instance finds the bucket spent: it is in Redis, not in the first's memory.
    let second = limiter(&redis.url(), &prefix, &args).await.unwrap();
    assert_eq!(four_checks(&second, "alice").await, [false; 4]);
}

/// The store contract, over TLS with an ACL user: the setting of a managed Redis.
#[tokio::test]
async fn over_tls_with_an_acl_user_the_redis_store_passes_the_contract_suite() {
    let redis = tls_server(RedisOptions {
        users: vec![("limiter".into(), "s3cret".into())],
        ..RedisOptions::default()
    });
    let ca = path(redis.certificates().unwrap().ca_cert());
    let url = redis.url_as("limiter:s3cret");
    contract::run_all(|policy| {
        let s = store(&url, &unique("contract"), &["--redis-ca-file", &ca], policy);
        async move { (Arc::new(s) as Arc<dyn BucketStore>, Advance::Real) }
    })
    .await;
}

/// A server whose certificate the client cannot verify is never talked to: not with
/// another CA, not with the system's roots.
#[tokio::test]
async fn over_tls_a_wrong_ca_or_the_system_roots_do_not_connect() {
    let redis = tls_server(RedisOptions::default());
    let other = Certificates::generate();
    let other_ca = path(other.ca_cert());
    for extra in [&["--redis-ca-file", other_ca.as_str()][..], &[]] {
        let why = refused(&redis.url(), extra).await;
        assert!(
            why.contains("invalid peer certificate: UnknownIssuer"),
            "{extra:?}: {why}"
        );
    }
}

#[tokio::test]
async fn over_tls_a_server_that_asks_for_a_client_certificate_gets_it() {
    let redis = tls_server(RedisOptions {
        client_certs: true,
        ..RedisOptions::default()
    });
    let certs = redis.certificates().unwrap();
    let (ca, cert, key) = (
        path(certs.ca_cert()),
        path(certs.client_cert()),
        path(certs.client_key()),
    );
    let why = refused(&redis.url(), &["--redis-ca-file", &ca]).await;
    assert!(why.contains("CertificateRequired"), "{why}");
    let with = limiter(
        &redis.url(),
        &unique("tls"),
        &[
            "--redis-ca-file",
            &ca,
            "--redis-client-cert",
            &cert,
            "--redis-client-key",
            &key,
        ],
    )
    .await
    .unwrap();
    assert_eq!(four_checks(&with, "alice").await, [true, true, true, false]);
}

#[tokio::test]
async fn a_password_in_the_url_authenticates_a_wrong_one_does_not() {
    let redis = RedisServer::start_with(RedisOptions {
        password: Some("s3cret".into()),
        ..RedisOptions::default()
    });
    let good = limiter(&redis.url_as(":s3cret"), &unique("auth"), &[])
        .await
        .unwrap();
    assert_eq!(four_checks(&good, "alice").await, [true, true, true, false]);
    let why = refused(&redis.url_as(":wrong"), &[]).await;
    assert!(
        why.contains("refused the user or password in REDIS_URL"),
        "{why}"
    );
    let why = refused(&redis.url(), &[]).await;
    assert!(
        why.contains("requires a password, or an ACL user, in REDIS_URL"),
        "{why}"
    );
}

#[tokio::test]
async fn an_acl_user_in_the_url_authenticates_over_tls() {
    let redis = tls_server(RedisOptions {
        password: Some("default-password".into()),
        users: vec![("limiter".into(), "s3cret".into())],
        ..RedisOptions::default()
    });
    let ca = path(redis.certificates().unwrap().ca_cert());
    let args = ["--redis-ca-file", ca.as_str()];
    let good = limiter(&redis.url_as("limiter:s3cret"), &unique("acl"), &args)
        .await
        .unwrap();
    assert_eq!(four_checks(&good, "alice").await, [true, true, true, false]);
    for url in [redis.url_as("limiter:wrong"), redis.url_as("nobody:s3cret")] {
        let why = refused(&url, &args).await;
        assert!(
            why.contains("refused the user or password in REDIS_URL"),
            "{why}"
        );
    }
}

/// The standalone limiter without Kafka uses three Redis clients: the buckets, the
/// counters it counts its decisions into, and the status reports. All three go over TLS.
#[tokio::test]
async fn over_tls_the_standalone_limiter_counts_and_reports_in_redis() {
    let redis = tls_server(RedisOptions::default());
    let ca = path(redis.certificates().unwrap().ca_cert());
    let config = config(
        &redis.url(),
        &unique("standalone"),
        &["--redis-ca-file", &ca],
    )
    .unwrap();
    let shutdown = CancellationToken::new();
    let service = rate_limiter::Standalone::start(&config, "tls-1".into(), &shutdown)
        .await
        .unwrap();
    let limiter = service.limiter.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let serve = config.serve.limits();
    let serving = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { service.serve(listener, &serve, shutdown).await }
    });
    assert_eq!(
        four_checks(&limiter, "alice").await,
        [true, true, true, false]
    );
    let redis = config.redis.resolve().unwrap();
    let reports = Reports::from_settings(&redis).unwrap().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while reports.read(Role::Limiter).await.unwrap().is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "no report in redis");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Stopping counts what is left.
    shutdown.cancel();
    serving.await.unwrap().unwrap();
    let counters = counters::redis_reader(redis.analytics.as_ref().unwrap(), &redis).unwrap();
    let alice = counters.get("alice").await.unwrap();
    assert_eq!((alice.total, alice.allowed, alice.blocked), (4, 3, 1));
}

/// Bad TLS settings stop the service before it serves, naming the variable.
#[tokio::test]
async fn bad_tls_settings_stop_the_limiter_naming_the_variable() {
    let certs = Certificates::generate();
    let (ca, cert, key) = (
        path(certs.ca_cert()),
        path(certs.client_cert()),
        path(certs.client_key()),
    );
    let url = "rediss://127.0.0.1:1/";
    let missing = format!("{ca}.missing");
    let cases: [(&str, Vec<&str>, &str); 4] = [
        (
            url,
            vec!["--redis-ca-file", &missing],
            "invalid REDIS_CA_FILE",
        ),
        // A key where the certificates should be.
        (url, vec!["--redis-ca-file", &key], "invalid REDIS_CA_FILE"),
        (
            url,
            vec!["--redis-client-cert", &cert, "--redis-client-key", &cert],
            "invalid REDIS_CLIENT_KEY",
        ),
        // A forgotten `s`: the CA file would be ignored.
        (
            "redis://127.0.0.1:1/",
            vec!["--redis-ca-file", &ca],
            "REDIS_CA_FILE",
        ),
    ];
    for (url, extra, expected) in cases {
        let err = limiter(url, &unique("bad"), &extra).await.err().unwrap();
        assert!(err.to_string().contains(expected), "{extra:?}: {err}");
    }
}

/// A Redis Cluster whose nodes serve TLS only (the cluster bus too): the slot map's
/// nodes are reached over TLS with the same CA. Users spread over the three nodes.
#[tokio::test]
async fn over_tls_a_redis_cluster_decides_on_every_node() {
    let cluster = RedisCluster::start_with(Some(Certificates::generate()));
    let ca = path(cluster.certificates().unwrap().ca_cert());
    let args = ["--redis-cluster", "true", "--redis-ca-file", ca.as_str()];
    let prefix = unique("cluster");
    let limiter = limiter(&cluster.url(), &prefix, &args).await.unwrap();
    for i in 0..30 {
        let user = format!("user-{i}");
        assert_eq!(
            four_checks(&limiter, &user).await,
            [true, true, true, false]
        );
    }
    // Every node holds some of the buckets: each was reached over TLS.
    let trusted = redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(std::fs::read(&ca).unwrap()),
    };
    for node in cluster.node_urls() {
        let client = redis::Client::build_with_tls(node.as_str(), trusted.clone()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}*"))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(!keys.is_empty(), "no bucket on {node}");
    }
}
