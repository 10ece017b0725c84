//! What the all-in-one binary exposes, tried as an outsider would: which of its ports
//! answer on an address other than the loopback one it is reached by locally, and what
//! `--help` prints of the secrets in its environment.

use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_distributed-rate-limiter");

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn connects(ip: [u8; 4], port: u16) -> bool {
    TcpStream::connect_timeout(&SocketAddr::from((ip, port)), Duration::from_millis(200)).is_ok()
}

/// The limiter's API of the all-in-one (`POST /check/batch` spends 256 tokens of anyone a
/// request, and its `/metrics`) is internal: it listens on 127.0.0.1 only, while the
/// gateway listens on every address. 127.0.0.2 is another address of this machine, on
/// the loopback interface: what a socket bound to every address accepts and one bound
/// to 127.0.0.1 refuses.
#[test]
fn the_limiter_port_is_loopback_only_by_default_and_the_gateway_is_public() {
    let (gateway, limiter, grpc) = (
        testkit::free_port(),
        testkit::free_port(),
        testkit::free_port(),
    );
    let child = Command::new(BIN)
        .current_dir(std::env::temp_dir())
        .env_clear()
        .env("GATEWAY_PORT", gateway.to_string())
        .env("LIMITER_PORT", limiter.to_string())
        .env("GRPC_PORT", grpc.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _running = Running(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(connects([127, 0, 0, 1], gateway)
        && connects([127, 0, 0, 1], limiter)
        && connects([127, 0, 0, 1], grpc))
    {
        assert!(Instant::now() < deadline, "the all-in-one did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(connects([127, 0, 0, 2], gateway), "the gateway is public");
    assert!(
        !connects([127, 0, 0, 2], limiter),
        "the limiter answered on an address other than 127.0.0.1"
    );
    assert!(
        !connects([127, 0, 0, 2], grpc),
        "the limiter's gRPC service answered on an address other than 127.0.0.1"
    );
}

#[test]
fn help_does_not_print_the_redis_password() {
    let out = Command::new(BIN)
        .arg("--help")
        .current_dir(std::env::temp_dir())
        .env_clear()
        .env("REDIS_URL", "redis://:hunter2-secret@127.0.0.1:6379/0")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("REDIS_URL"), "{help}");
    assert!(!help.contains("hunter2-secret"), "{help}");
}
