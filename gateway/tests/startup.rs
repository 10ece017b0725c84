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
