//! The live dashboard page (work in progress by a helper; replaced when it lands).

use axum::http::header;
use axum::response::IntoResponse;

/// `GET /dashboard`: one self-contained HTML page.
pub async fn dashboard() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        include_str!("dashboard.html"),
    )
}
