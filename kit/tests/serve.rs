//! `serve` on a real listener on 127.0.0.1, spoken to over raw TCP: the connection cap,
//! the header timeout (slow heads, and idle kept-alive connections), the send timeout (a
//! client that stops reading), and the graceful shutdown.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::get;
use kit::http::{ServeLimits, serve};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

fn limits() -> ServeLimits {
    ServeLimits {
        max_in_flight: 100,
        request_timeout: Duration::from_secs(30),
        header_timeout: Duration::from_secs(10),
        body_timeout: Duration::from_secs(10),
        send_timeout: Duration::from_secs(10),
        max_connections: 100,
        grace: Duration::from_secs(5),
    }
}

/// `GET /` answers `ok`; `GET /sleep/{ms}` after that long; `GET /big` 64 MiB, more than
/// the loopback socket buffers hold.
fn routes() -> Router {
    Router::new()
        .route("/", get(|| async { "ok" }))
        .route(
            "/sleep/{ms}",
            get(
                |axum::extract::Path(ms): axum::extract::Path<u64>| async move {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    "slept"
                },
            ),
        )
        .route("/big", get(|| async { vec![b'x'; 64 << 20] }))
}

struct Server {
    addr: SocketAddr,
    shutdown: CancellationToken,
    task: JoinHandle<std::io::Result<()>>,
}

async fn start(limits: ServeLimits) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { serve(listener, routes(), shutdown, &limits).await }
    });
    Server {
        addr,
        shutdown,
        task,
    }
}

fn request(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").into_bytes()
}

/// Sends `GET path` on `stream` and reads one small response's head and body.
async fn exchange(stream: &mut TcpStream, path: &str) -> String {
    stream.write_all(&request(path)).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let deadline = Instant::now() + Duration::from_secs(5);
    while !String::from_utf8_lossy(&got).ends_with("ok") && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
        if String::from_utf8_lossy(&got).ends_with("slept") {
            break;
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// Waits (at most `within`) for the server to close `stream`; returns how long it took.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at((started + within).into(), stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test]
async fn past_the_connection_cap_new_connections_are_closed_at_once() {
    let server = start(ServeLimits {
        max_connections: 2,
        ..limits()
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        assert!(exchange(&mut stream, "/").await.starts_with("HTTP/1.1 200"));
        held.push(stream);
    }

    // Both slots are held by kept-alive connections: a third is closed unanswered.
    let mut third = TcpStream::connect(server.addr).await.unwrap();
    let _ = third.write_all(&request("/")).await;
    let took = closed_within(&mut third, Duration::from_secs(2)).await;
    assert!(
        took.is_some(),
        "a connection past the cap is closed at once"
    );

    // A connection that goes gives its slot back.
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        if exchange(&mut stream, "/").await.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(Instant::now() < deadline, "the freed slot serves again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.shutdown.cancel();
    server.task.await.unwrap().unwrap();
}

#[tokio::test]
async fn slow_heads_and_idle_connections_are_closed_after_the_header_timeout() {
    let header_timeout = Duration::from_millis(400);
    let server = start(ServeLimits {
        header_timeout,
        ..limits()
    })
    .await;
    let bound = header_timeout + Duration::from_secs(2);

    // Silent from the start.
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    // A head that trickles in and never ends.
    let mut trickling = TcpStream::connect(server.addr).await.unwrap();
    trickling
        .write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .await
        .unwrap();
    let trickle = tokio::spawn(async move {
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if trickling.write_all(b"X-Slow: 1\r\n").await.is_err() {
                break;
            }
        }
        trickling
    });
    // Kept alive after one request, then idle.
    let mut idle = TcpStream::connect(server.addr).await.unwrap();
    assert!(exchange(&mut idle, "/").await.starts_with("HTTP/1.1 200"));

    // Watched side by side, each from its own start: the silent one from its connect (a
    // few ms ago), the idle one from the end of its answer (now).
    let (silent, idle) = tokio::join!(
        closed_within(&mut silent, bound),
        closed_within(&mut idle, bound)
    );
    for (what, took) in [("silent", silent), ("idle", idle)] {
        let took = took.unwrap_or_else(|| panic!("{what}: still open after {bound:?}"));
        assert!(
            took + Duration::from_millis(100) >= header_timeout,
            "{what}: closed after {took:?}, before the header timeout"
        );
    }
    let mut trickling = trickle.await.unwrap();
    assert!(
        closed_within(&mut trickling, Duration::from_millis(100))
            .await
            .is_some(),
        "a head trickled in for 2 s outlived a 400 ms header timeout"
    );
    server.shutdown.cancel();
    server.task.await.unwrap().unwrap();
}

/// A client that asks for a large answer and never reads it holds its connection (and
/// its place under the cap) for the send timeout, not for ever.
#[tokio::test]
async fn a_client_that_stops_reading_is_dropped_after_the_send_timeout() {
    let send_timeout = Duration::from_millis(500);
    let server = start(ServeLimits {
        send_timeout,
        max_connections: 1,
        ..limits()
    })
    .await;
    let mut reader_that_never_reads = TcpStream::connect(server.addr).await.unwrap();
    reader_that_never_reads
        .write_all(&request("/big"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    // The only slot is taken...
    let mut other = TcpStream::connect(server.addr).await.unwrap();
    let _ = other.write_all(&request("/")).await;
    assert!(
        closed_within(&mut other, Duration::from_secs(1))
            .await
            .is_some()
    );
    // ...until the stalled write gives up.
    let started = Instant::now();
    loop {
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        if exchange(&mut stream, "/").await.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(
            started.elapsed() < send_timeout + Duration::from_secs(5),
            "the stalled connection still holds the only slot"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(reader_that_never_reads);
    server.shutdown.cancel();
    server.task.await.unwrap().unwrap();
}

#[tokio::test]
async fn shutdown_finishes_requests_in_flight_within_the_grace_period() {
    let server = start(ServeLimits {
        grace: Duration::from_secs(5),
        ..limits()
    })
    .await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let in_flight = tokio::spawn(async move { exchange(&mut stream, "/sleep/500").await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    server.shutdown.cancel();
    server.task.await.unwrap().unwrap();
    let answer = in_flight.await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    assert!(answer.ends_with("slept"), "{answer:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
    // No longer listening.
    assert!(TcpStream::connect(server.addr).await.is_err());

    // A request longer than the grace period is dropped when it ends.
    let server = start(ServeLimits {
        grace: Duration::from_millis(300),
        ..limits()
    })
    .await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream.write_all(&request("/sleep/60000")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    server.shutdown.cancel();
    server.task.await.unwrap().unwrap();
    let took = started.elapsed();
    assert!(
        (Duration::from_millis(250)..Duration::from_secs(2)).contains(&took),
        "{took:?}"
    );
    assert!(
        closed_within(&mut stream, Duration::from_secs(2))
            .await
            .is_some(),
        "the unfinished request's connection is closed"
    );
}
