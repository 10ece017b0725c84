//! Slow clients against a real listener. Two thousand connections keep trickling — half
//! a request head a byte a second, or a whole `POST /api` head and then its body a byte a
//! second — and each reconnects as soon as the server lets it go, as an attacker would.
//! Meanwhile `GET /healthz` and ordinary `POST /api` requests are answered at once (a
//! decision, never a shed), and the server closes every slow connection after its header
//! or body timeout.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Connections that send a whole head (`Content-Length: 1000`) and then trickle the body.
const SLOW_BODIES: usize = 1_500;
/// Connections that trickle the head itself and never finish it.
const SLOW_HEADS: usize = 500;
const HEADER_TIMEOUT: Duration = Duration::from_millis(2_000);
const BODY_TIMEOUT: Duration = Duration::from_millis(3_000);
/// How long the attack lasts.
const ATTACK: Duration = Duration::from_secs(9);
/// Room for scheduling on a loaded two-core machine, on top of a timeout.
const SLACK: Duration = Duration::from_millis(1_500);
/// The longest a probe (`/healthz`, a fast `POST /api`) may take while the attack goes on:
/// typically milliseconds; the bound leaves room for one SYN retransmitted (1 s) should
/// the listen queue overflow in a reconnect storm on a loaded machine.
const PROBE_BOUND: Duration = Duration::from_millis(2_500);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Slow {
    Head,
    Body,
}

/// What one slow connection saw: how long the server kept it, and the status it answered
/// (if any) before closing it.
#[derive(Debug)]
struct Closed {
    kind: Slow,
    held: Duration,
    status: Option<u16>,
    error: Option<String>,
}

/// One slow connection: sends its part, trickles a byte a second, and waits for the
/// server to close it; `Err(how long it had been held)` if the server still held it at
/// `deadline`.
async fn slow_connection(
    addr: SocketAddr,
    kind: Slow,
    deadline: Instant,
) -> Result<Closed, Duration> {
    let stream = match tokio::time::timeout_at(deadline.into(), TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => stream,
        _ => return Err(Duration::ZERO),
    };
    let (mut rd, mut wr) = stream.into_split();
    let first: &[u8] = match kind {
        Slow::Body => {
            b"POST /api HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
        }
        Slow::Head => b"POST /api HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ",
    };
    if wr.write_all(first).await.is_err() {
        return Err(Duration::ZERO);
    }
    let sent = Instant::now();
    let trickle = async {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if wr.write_all(b" ").await.is_err() {
                // The server is gone; the reader sees how.
                std::future::pending::<()>().await;
            }
        }
    };
    let read = async {
        let mut answer = Vec::new();
        let _ = rd.read_to_end(&mut answer).await;
        answer
    };
    tokio::select! {
        answer = read => {
            let held = sent.elapsed();
            let text = String::from_utf8_lossy(&answer);
            let status = text
                .strip_prefix("HTTP/1.1 ")
                .and_then(|rest| rest.get(..3))
                .and_then(|code| code.parse().ok());
            let error = text
                .split_once("\r\n\r\n")
                .and_then(|(_, body)| serde_json::from_str::<serde_json::Value>(body).ok())
                .and_then(|body| body["error"].as_str().map(str::to_owned));
            Ok(Closed { kind, held, status, error })
        }
        () = trickle => unreachable!(),
        () = tokio::time::sleep_until(deadline.into()) => Err(sent.elapsed()),
    }
}

/// A slow client that reconnects as soon as it is let go, until `deadline`; returns every
/// connection the server closed, and how long the server had held the one still open at
/// the deadline.
async fn slow_client(addr: SocketAddr, kind: Slow, deadline: Instant) -> (Vec<Closed>, Duration) {
    let mut closed = Vec::new();
    // Bounded in count as well as in time.
    for _ in 0..100 {
        if Instant::now() >= deadline {
            break;
        }
        match slow_connection(addr, kind, deadline).await {
            Ok(c) => closed.push(c),
            Err(held) => return (closed, held),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (closed, Duration::ZERO)
}

/// The file-descriptor limit must cover both ends of every connection (client and server
/// are this one process).
fn raise_fd_limit() {
    let want = 4 * (SLOW_BODIES + SLOW_HEADS) as u64 + 1_000;
    let got = rlimit::increase_nofile_limit(want).expect("raise RLIMIT_NOFILE");
    assert!(
        got >= want,
        "RLIMIT_NOFILE is {got}; this test needs {want} (raise the hard limit)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_hold_no_slot_and_are_closed_after_their_timeouts() {
    raise_fd_limit();
    let header_ms = HEADER_TIMEOUT.as_millis().to_string();
    let body_ms = BODY_TIMEOUT.as_millis().to_string();
    let mut args = vec!["--max-in-flight", "128"];
    args.extend(["--header-timeout-ms", &header_ms]);
    args.extend(["--body-timeout-ms", &body_ms]);
    args.extend(POLICY);
    let system = all_in_one(&args).await;
    let addr = system.gateway_addr;

    let started = Instant::now();
    let deadline = started + ATTACK;
    let connected = Arc::new(AtomicUsize::new(0));
    let attackers: Vec<_> = (0..SLOW_BODIES + SLOW_HEADS)
        .map(|i| {
            let kind = if i < SLOW_BODIES {
                Slow::Body
            } else {
                Slow::Head
            };
            let connected = connected.clone();
            tokio::spawn(async move {
                // Open the connections over half a second, not in one SYN flood.
                tokio::time::sleep(Duration::from_micros(250 * i as u64)).await;
                connected.fetch_add(1, Ordering::Relaxed);
                slow_client(addr, kind, deadline).await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;

    // While the attack goes on: every 200 ms a liveness probe and an ordinary request from
    // a fresh user, each on a new connection.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let mut probes = Vec::new();
    let mut n = 0;
    while Instant::now() + Duration::from_millis(500) < deadline {
        n += 1;
        let t = Instant::now();
        let health = client
            .get(format!("http://{addr}/healthz"))
            .send()
            .await
            .map(|r| r.status().as_u16());
        let health_took = t.elapsed();
        let t = Instant::now();
        let api = match client
            .post(format!("http://{addr}/api"))
            .json(&serde_json::json!({"user_id": format!("fast-{n}")}))
            .send()
            .await
        {
            Ok(r) => {
                let status = r.status().as_u16();
                let body: serde_json::Value = r.json().await.unwrap_or_default();
                Ok((status, body["error"].as_str().map(str::to_owned)))
            }
            Err(e) => Err(e),
        };
        let api_took = t.elapsed();
        probes.push((health, health_took, api, api_took));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let bound = |kind: Slow| {
        SLACK
            + match kind {
                Slow::Head => HEADER_TIMEOUT,
                Slow::Body => BODY_TIMEOUT,
            }
    };
    let mut closed = Vec::new();
    // Connections still open at the end that the server had held past their timeout.
    let mut outlived = 0;
    for (i, attacker) in attackers.into_iter().enumerate() {
        let (c, held) = attacker.await.unwrap();
        closed.extend(c);
        let kind = if i < SLOW_BODIES {
            Slow::Body
        } else {
            Slow::Head
        };
        outlived += usize::from(held > bound(kind));
    }

    // What happened, for the log of a failing run.
    let healthy = probes
        .iter()
        .filter(|(h, took, ..)| matches!(h, Ok(200)) && *took <= PROBE_BOUND)
        .count();
    let decided = probes
        .iter()
        .filter(|(.., api, took)| {
            *took <= PROBE_BOUND
                && match api {
                    Ok((200, _)) => true,
                    Ok((429, Some(e))) => e == "rate_limited",
                    _ => false,
                }
        })
        .count();
    let statuses = |kind: Slow| {
        let mut seen = std::collections::BTreeMap::<String, usize>::new();
        for c in closed.iter().filter(|c| c.kind == kind) {
            let key = format!("{:?} {:?}", c.status, c.error);
            *seen.entry(key).or_default() += 1;
        }
        seen
    };
    let longest = |kind: Slow| {
        closed
            .iter()
            .filter(|c| c.kind == kind)
            .map(|c| c.held)
            .max()
            .unwrap_or_default()
    };
    let slowest = {
        let mut by_time: Vec<_> = probes.iter().collect();
        by_time.sort_by_key(|(_, h, _, a)| std::cmp::Reverse((*h).max(*a)));
        by_time.truncate(3);
        by_time
    };
    let summary = format!(
        "{} slow clients opened; probes: {healthy}/{} /healthz 200 within {PROBE_BOUND:?}, \
         {decided}/{} POST /api decided within {PROBE_BOUND:?}; slowest probes: {:?}; \
         slow bodies closed {} times (longest held {:?}; answers {:?}), \
         slow heads closed {} times (longest held {:?}; answers {:?}); \
         {outlived} still held past their timeout at the end",
        connected.load(Ordering::Relaxed),
        probes.len(),
        probes.len(),
        slowest,
        closed.iter().filter(|c| c.kind == Slow::Body).count(),
        longest(Slow::Body),
        statuses(Slow::Body),
        closed.iter().filter(|c| c.kind == Slow::Head).count(),
        longest(Slow::Head),
        statuses(Slow::Head),
    );
    println!("{summary}");

    assert!(probes.len() >= 10, "{summary}");
    // (a) Liveness answers while slow clients hold the server.
    assert_eq!(healthy, probes.len(), "/healthz: {summary}");
    // (b) Fast requests are decided (200, or 429 rate_limited), never shed as overloaded.
    assert_eq!(decided, probes.len(), "POST /api: {summary}");
    // (c) The server closed every slow connection after its timeout: none outlived it,
    // every slow client was let go at least once, and a trickled body was answered 408.
    assert_eq!(outlived, 0, "{summary}");
    for c in &closed {
        let bound = bound(c.kind);
        assert!(c.held <= bound, "{c:?} held past {bound:?}: {summary}");
    }
    let bodies = closed.iter().filter(|c| c.kind == Slow::Body);
    assert!(bodies.clone().count() >= SLOW_BODIES, "{summary}");
    assert!(
        closed.iter().filter(|c| c.kind == Slow::Head).count() >= SLOW_HEADS,
        "{summary}"
    );
    for c in bodies {
        assert!(
            c.held + SLACK >= BODY_TIMEOUT,
            "a slow body is let go at its timeout, not shed before it: {c:?}: {summary}"
        );
        assert_eq!(
            (c.status, c.error.as_deref()),
            (Some(408), Some("body_timeout")),
            "{summary}"
        );
    }

    system.shutdown().await.unwrap();
}
