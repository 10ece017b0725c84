//! The `gateway` binary as an operator starts it: a configuration it cannot run with stops
//! it before it serves, with a message naming the variable. (This test also makes
//! `cargo test --workspace` build the binary, which the end-to-end tests of the
//! all-in-one package start as a process.)

use std::process::Command;

fn gateway(env: &[(&str, &str)]) -> std::process::Output {
    let dir = std::env::temp_dir();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gateway"));
    // A scratch directory: no `.env` of the repository is read.
    cmd.current_dir(&dir).env_clear().env("GATEWAY_PORT", "0");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("the gateway binary runs")
}

#[test]
fn without_redis_it_refuses_to_start_and_says_why() {
    let out = gateway(&[]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("REDIS_URL is required"), "{stderr}");
}

#[test]
fn a_bad_value_names_the_variable() {
    let out = gateway(&[
        ("REDIS_URL", "redis://127.0.0.1:1"),
        ("LIMITER_TIMEOUT_MS", "soon"),
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("LIMITER_TIMEOUT_MS"), "{stderr}");
}

/// Built with TLS (the default), the gateway reads the counters from a Redis that serves
/// TLS only, trusting `REDIS_CA_FILE`, as the ACL user in `REDIS_URL`; with another CA it
/// cannot read them (503), and a CA file it cannot read stops it before it serves.
#[tokio::test]
async fn over_tls_it_reads_analytics_trusting_the_ca_file() {
    use testkit::{Certificates, RedisOptions, RedisServer, Service};
    let redis = RedisServer::start_with(RedisOptions {
        tls: Some(Certificates::generate()),
        users: vec![("gateway".into(), "s3cret".into())],
        ..RedisOptions::default()
    });
    let other = Certificates::generate();
    let analytics = |ca: &std::path::Path| {
        let gateway = Service::start(
            "gateway",
            "gateway-tls",
            "GATEWAY_PORT",
            &[
                ("REDIS_URL", redis.url_as("gateway:s3cret")),
                ("REDIS_CA_FILE", ca.display().to_string()),
                ("LIMITER_URL", "http://127.0.0.1:1".into()),
            ],
        );
        async move {
            let url = format!("{}/analytics/alice", gateway.url());
            let answer = reqwest::get(url).await.unwrap();
            let status = answer.status().as_u16();
            (status, answer.text().await.unwrap(), gateway.log_tail(20))
        }
    };
    let (status, body, _) = analytics(&redis.certificates().unwrap().ca_cert()).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""total":0"#), "{body}");
    let (status, body, log) = analytics(&other.ca_cert()).await;
    assert_eq!(status, 503, "{body}");
    // The body hides the cause; the log has it.
    assert!(
        log.contains("invalid peer certificate: UnknownIssuer"),
        "{log}"
    );

    let missing = other.ca_cert().with_extension("missing");
    let url = redis.url();
    let out = gateway(&[
        ("REDIS_URL", url.as_str()),
        ("REDIS_CA_FILE", &missing.display().to_string()),
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("invalid REDIS_CA_FILE"), "{stderr}");
}
