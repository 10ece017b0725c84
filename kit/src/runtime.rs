//! Process plumbing every binary shares: `.env`, logging, the shutdown signal, identity.

use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// Loads `.env` from the working directory (or a parent); the environment wins.
pub fn load_dotenv() {
    let _ = dotenvy::dotenv();
}

/// Structured logs: human-readable by default, one JSON object a line with
/// `LOG_FORMAT=json`; the level comes from `RUST_LOG` (default `info`).
pub fn init_tracing() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    // Colours only for a terminal: log files and `docker logs` get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi);

    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// One token cancelled on the first SIGINT or SIGTERM.
pub fn shutdown_token() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("install SIGTERM handler");
            tokio::select! {
                _ = ctrl_c => {},
                _ = term.recv() => {},
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutdown signal received");
        cancel.cancel();
    });
    token
}

/// A name for this process in events and logs: `INSTANCE_ID`, else `<hostname>-<pid>`.
pub fn instance_id() -> String {
    if let Ok(id) = std::env::var("INSTANCE_ID")
        && !id.trim().is_empty()
    {
        return id;
    }
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned());
    format!("{host}-{}", std::process::id())
}
