//! The `analytics-worker` binary as an operator starts it: a configuration it cannot run
//! with stops it before it serves, with a message naming the variable. (This test also
//! makes `cargo test --workspace` build the binary, which the end-to-end tests of the
//! all-in-one package start as a process.)
#![cfg(feature = "kafka")]

use std::process::Command;

fn worker(env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_analytics-worker"));
    // A scratch directory: no `.env` of the repository is read.
    cmd.current_dir(std::env::temp_dir())
        .env_clear()
        .env("WORKER_PORT", "0");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("the worker binary runs")
}

#[test]
fn without_kafka_it_refuses_to_start_and_says_why() {
    let out = worker(&[("REDIS_URL", "redis://127.0.0.1:1")]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("KAFKA_BROKERS is required"), "{stderr}");
}

#[test]
fn without_redis_it_refuses_to_start_and_says_why() {
    let out = worker(&[("KAFKA_BROKERS", "127.0.0.1:1")]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("REDIS_URL is required"), "{stderr}");
}
