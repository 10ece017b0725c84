//! The dashboard in a real browser. The all-in-one system serves `GET /dashboard`; a load
//! goes through `POST /api` (a few users within their limit, `blocked-user` far over it);
//! then Debian's headless Chromium loads the page and the test reads what the page
//! rendered from the DOM Chromium serializes: the totals, the per-minute chart, the top
//! blocked users, one user's lookup, the health of each part, and the live requests per
//! second (zero while nothing is sent, above zero under a load). A screenshot is saved
//! under the target directory's `tmp/dashboard-test/`.
//!
//! Chromium runs with `--virtual-time-budget`: the page's timers run on virtual time, which
//! waits for pending fetches, so its one-second polling refreshes several times within a
//! second or two of real time.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;

const BLOCKED_USER: &str = "blocked-user";
const STEADY_USERS: [&str; 4] = ["steady-1", "steady-2", "steady-3", "steady-4"];

/// What the load sent, as the gateway answered it.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct Sent {
    allowed: u64,
    blocked: u64,
}

async fn send(client: &reqwest::Client, url: &str, user: &str, times: usize) -> Sent {
    let mut sent = Sent::default();
    for _ in 0..times {
        match post(client, url, user).await.status().as_u16() {
            200 => sent.allowed += 1,
            429 => sent.blocked += 1,
            other => panic!("POST /api for {user} answered {other}"),
        }
    }
    sent
}

/// Waits until `GET /analytics?window=15m` counts `want` (the worker counts events
/// asynchronously), so that the page, when it loads, has everything to show.
async fn window_settles(gateway: SocketAddr, want: Sent) {
    let client = http();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = client
            .get(format!("http://{gateway}/analytics?window=15m"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "GET /analytics?window=15m");
        let body: serde_json::Value = r.json().await.unwrap();
        let got = Sent {
            allowed: body["allowed"].as_u64().unwrap_or(0),
            blocked: body["blocked"].as_u64().unwrap_or(0),
        };
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the analytics count {got:?}, not {want:?}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Debian's Chromium, or a failure saying how to install it.
fn chromium_binary() -> PathBuf {
    let found = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .map(PathBuf::from)
        .chain(
            std::env::var_os("PATH")
                .map(|p| {
                    std::env::split_paths(&p)
                        .map(|d| d.join("chromium"))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default(),
        )
        .find(|p| p.is_file());
    found.unwrap_or_else(|| {
        panic!(
            "chromium is not installed: the dashboard test drives a headless Chromium; \
             run scripts/test.sh, which installs the Debian packages chromium and fonts-liberation"
        )
    })
}

/// Loads `url` in headless Chromium on a fresh profile, lets the page run for 8 s of
/// virtual time, and returns the DOM it serialized. `extra` adds flags (a screenshot).
async fn render(url: &str, extra: &[String]) -> Dom {
    let profile = std::env::temp_dir().join(testkit::unique("dashboard-chromium"));
    let mut command = tokio::process::Command::new(chromium_binary());
    command
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-proxy-server",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-default-apps",
            "--disable-extensions",
            "--mute-audio",
            "--hide-scrollbars",
            "--virtual-time-budget=8000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(url)
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(90), command.output())
        .await
        .expect("chromium finishes within 90 s")
        .expect("chromium starts");
    let _ = std::fs::remove_dir_all(&profile);
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stdout.contains("<body"),
        "chromium failed ({}): {}",
        output.status,
        stderr.lines().rev().take(20).collect::<Vec<_>>().join("\n")
    );
    Dom::new(stdout)
}

/// The page as Chromium serialized it, without its script (whose text mentions ids too).
struct Dom(String);

impl Dom {
    fn new(mut html: String) -> Self {
        if let Some(script) = html.find("<script") {
            html.truncate(script);
        }
        Self(html)
    }

    /// The opening tag of the element with `id`.
    fn tag(&self, id: &str) -> &str {
        let needle = format!(" id=\"{id}\"");
        let at = self
            .0
            .find(&needle)
            .unwrap_or_else(|| panic!("the page has no #{id}"));
        let start = self.0[..at].rfind('<').unwrap();
        let end = at + self.0[at..].find('>').unwrap();
        &self.0[start..=end]
    }

    fn attr(&self, id: &str, name: &str) -> Option<String> {
        attr(self.tag(id), name)
    }

    /// `data-value` (the raw figure behind the text) of `#id`, as a number.
    fn value(&self, id: &str) -> f64 {
        self.number(id, "data-value")
    }

    fn number(&self, id: &str, name: &str) -> f64 {
        let raw = self.attr(id, name).unwrap_or_default();
        raw.parse()
            .unwrap_or_else(|_| panic!("#{id} {name}={raw:?} is not a number"))
    }

    fn body(&self) -> &str {
        let start = self.0.find("<body").expect("a body");
        &self.0[start..=start + self.0[start..].find('>').unwrap()]
    }

    /// `(data-user, data-blocked)` of every user row of the table `#id`.
    fn table_rows(&self, id: &str) -> Vec<(String, u64)> {
        let start = self.0.find(&format!(" id=\"{id}\"")).unwrap();
        let table = &self.0[start..start + self.0[start..].find("</table>").unwrap()];
        table
            .match_indices("<tr ")
            .filter_map(|(i, _)| {
                let tag = &table[i..=i + table[i..].find('>').unwrap()];
                Some((
                    attr(tag, "data-user")?,
                    attr(tag, "data-blocked")?.parse().unwrap(),
                ))
            })
            .collect()
    }
}

fn attr(tag: &str, name: &str) -> Option<String> {
    let needle = format!(" {name}=\"");
    let start = tag.find(&needle)? + needle.len();
    let end = start + tag[start..].find('"')?;
    Some(
        tag[start..end]
            .replace("&quot;", "\"")
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&amp;", "&"),
    )
}

/// Sends requests until `stop`: a new user each time (allowed) and `blocked-user`
/// (blocked), so that the live rates have something to show.
fn live_load(gateway: SocketAddr, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Sent> {
    tokio::spawn(async move {
        let client = http();
        let url = format!("http://{gateway}/api");
        let mut sent = Sent::default();
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            let user = if n.is_multiple_of(3) {
                BLOCKED_USER.to_string()
            } else {
                format!("live-{n}")
            };
            let s = send(&client, &url, &user, 1).await;
            sent.allowed += s.allowed;
            sent.blocked += s.blocked;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        sent
    })
}

fn screenshot_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard-test");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_dashboard_shows_traffic_blocked_users_and_health_in_a_browser() {
    chromium_binary(); // fail first, and clearly, when the browser is missing
    let system = all_in_one(&[
        "--rate-limit-capacity",
        "5",
        "--rate-limit-refill-per-sec",
        "1",
    ])
    .await;
    let gateway = system.gateway_addr;
    let client = http();
    let api = format!("http://{gateway}/api");

    let mut total = Sent::default();
    for user in STEADY_USERS {
        let s = send(&client, &api, user, 3).await;
        assert_eq!(
            s,
            Sent {
                allowed: 3,
                blocked: 0
            },
            "{user} is within its limit"
        );
        total.allowed += 3;
    }
    let blocked_user = send(&client, &api, BLOCKED_USER, 40).await;
    assert!(
        blocked_user.blocked >= 30,
        "capacity 5, 1 token/s: {blocked_user:?}"
    );
    total.allowed += blocked_user.allowed;
    total.blocked += blocked_user.blocked;
    window_settles(gateway, total).await;

    let served = client
        .get(format!("http://{gateway}/dashboard"))
        .send()
        .await
        .unwrap();
    assert_eq!(served.status(), 200);
    assert_eq!(served.headers()["content-type"], "text/html; charset=utf-8");
    assert_eq!(served.headers()["cache-control"], "no-cache");

    let page = format!("http://{gateway}/dashboard#user={BLOCKED_USER}");

    // Nothing is sent while the page runs: the figures are exactly the load's.
    let dom = render(&page, &[]).await;
    assert!(
        dom.body().contains("data-ready=\"1\""),
        "the page never completed a refresh: {}",
        dom.body()
    );
    assert!(
        dom.number("chart-rps", "data-points") >= 2.0,
        "the page polled more than once: {}",
        dom.tag("chart-rps")
    );
    assert!(
        dom.attr("banner", "hidden").is_some(),
        "no error banner: {}",
        dom.tag("banner")
    );
    assert_eq!(dom.value("total-allowed"), total.allowed as f64);
    assert_eq!(dom.value("total-blocked"), total.blocked as f64);
    assert_eq!(
        dom.value("total-requests"),
        (total.allowed + total.blocked) as f64
    );
    let minutes = "chart-minutes";
    assert_eq!(
        dom.number(minutes, "data-sum-allowed"),
        total.allowed as f64,
        "the per-minute chart draws every allowed request: {}",
        dom.tag(minutes)
    );
    assert_eq!(
        dom.number(minutes, "data-sum-blocked"),
        total.blocked as f64,
        "the per-minute chart draws every blocked request: {}",
        dom.tag(minutes)
    );
    assert_eq!(
        dom.table_rows("top-blocked"),
        [(BLOCKED_USER.to_string(), blocked_user.blocked)],
        "only blocked-user was blocked"
    );
    assert_eq!(
        dom.table_rows("top-blocked-day"),
        [(BLOCKED_USER.to_string(), blocked_user.blocked)]
    );
    // The lookup from the URL's #user=blocked-user.
    assert_eq!(
        dom.attr("user-result", "data-user").as_deref(),
        Some(BLOCKED_USER)
    );
    assert_eq!(dom.value("user-allowed"), blocked_user.allowed as f64);
    assert_eq!(dom.value("user-blocked"), blocked_user.blocked as f64);
    assert_eq!(
        dom.number("chart-user", "data-sum-blocked"),
        blocked_user.blocked as f64
    );
    for part in ["limiter", "store", "stream"] {
        let id = format!("health-{part}");
        assert_eq!(
            dom.attr(&id, "data-ok").as_deref(),
            Some("true"),
            "{}",
            dom.tag(&id)
        );
    }
    assert_eq!(dom.value("events-dropped"), 0.0);
    assert_eq!(dom.value("decisions-degraded"), 0.0);
    assert_eq!(dom.value("decisions-allowed"), total.allowed as f64);
    assert_eq!(dom.value("decisions-limited"), total.blocked as f64);
    // Live means live: nothing was decided while the page polled.
    assert_eq!(dom.value("rps-allowed"), 0.0);
    assert_eq!(dom.value("rps-blocked"), 0.0);

    // Under a load, the live rates and their chart rise above zero.
    let stop = Arc::new(AtomicBool::new(false));
    let load = live_load(gateway, stop.clone());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let screenshot = screenshot_dir().join("dashboard.png");
    let _ = std::fs::remove_file(&screenshot);
    let dom = render(
        &page,
        &[
            "--window-size=1280,1240".to_string(),
            format!("--screenshot={}", screenshot.display()),
        ],
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    let live = load.await.unwrap();
    assert!(live.allowed > 0 && live.blocked > 0, "{live:?}");
    assert!(
        dom.value("rps-allowed") > 0.0 && dom.value("rps-blocked") > 0.0,
        "live rates under load: {} {}",
        dom.tag("rps-allowed"),
        dom.tag("rps-blocked")
    );
    assert!(
        dom.number("chart-rps", "data-sum-allowed") > 0.0
            && dom.number("chart-rps", "data-sum-blocked") > 0.0,
        "the live chart draws the load: {}",
        dom.tag("chart-rps")
    );
    assert!(dom.value("total-allowed") > total.allowed as f64);
    let top = dom.table_rows("top-blocked");
    assert_eq!(top.first().map(|(u, _)| u.as_str()), Some(BLOCKED_USER));
    assert!(top[0].1 > blocked_user.blocked);

    let png = std::fs::read(&screenshot).expect("chromium saved a screenshot");
    assert!(png.starts_with(b"\x89PNG"), "a PNG");
    assert!(
        png.len() > 20_000,
        "a rendered page, not a blank one: {} bytes",
        png.len()
    );
    println!("dashboard screenshot: {}", screenshot.display());

    system.shutdown().await.unwrap();
}
