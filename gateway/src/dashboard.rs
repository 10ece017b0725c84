//! The live dashboard: `GET /dashboard` serves one self-contained HTML page (inline CSS,
//! inline JavaScript, charts in inline SVG; nothing fetched from elsewhere) that polls the
//! gateway's own `GET /status` and `GET /analytics?window=` every second and draws
//! requests per second allowed vs blocked, per-minute traffic, the top blocked users, one
//! user's series on demand, and the health of the limiter, store and event stream.
//!
//! With `ADMIN_TOKEN` set, the page (which holds no data) still loads without it; its
//! reads answer 401 until it sends the token, which it asks for once and keeps in the
//! page's memory.

use axum::http::header;
use axum::response::IntoResponse;

/// The page, compiled into the binary.
const PAGE: &str = include_str!("dashboard.html");

/// `GET /dashboard`: the dashboard page. `no-cache` so that a new release's page is
/// picked up on the next load.
pub async fn dashboard() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        PAGE,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn serves_the_page_as_uncached_html() {
        let response = dashboard().await.into_response();
        assert_eq!(response.status(), 200);
        let h = response.headers();
        assert_eq!(h[header::CONTENT_TYPE], "text/html; charset=utf-8");
        assert_eq!(h[header::CACHE_CONTROL], "no-cache");
    }

    #[test]
    fn the_page_loads_nothing_from_elsewhere() {
        let page = PAGE.to_ascii_lowercase();
        for external in [
            "src=\"http",
            "src=\"//",
            "href=\"http",
            "href=\"//",
            "@import",
            "url(http",
            "url(//",
        ] {
            assert!(!page.contains(external), "the page references {external}…");
        }
        assert!(page.starts_with("<!doctype html>"));
    }

    #[test]
    fn the_page_reads_the_endpoints_relative_to_itself() {
        // Relative paths keep the page working behind a proxy that adds a prefix.
        for path in [
            "getjson(\"status\")",
            "\"analytics?window=\"",
            "\"analytics/\"",
        ] {
            assert!(
                PAGE.to_ascii_lowercase().contains(path),
                "the page fetches {path}"
            );
        }
    }
}
