//! `bench-ceiling`: the ceiling every benchmark scenario is reported against.
//!
//! A minimal axum server with no state: `POST /api` parses the same JSON body as the
//! gateway (`{"user_id":"..."}`) and answers `200 {"allowed":true,"user_id":"..."}`. Driven
//! by the same `wrk` line on the same machine in the same run, it measures what the HTTP
//! stack, the JSON work and the load generator cost by themselves, so a scenario's ratio to
//! it says how much the rate limiting adds. Listens on `127.0.0.1:$CEILING_PORT` (default
//! 3999).

use axum::routing::post;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

#[derive(Deserialize)]
struct Request {
    user_id: String,
}

#[derive(Serialize)]
struct Answer {
    allowed: bool,
    user_id: String,
}

async fn api(Json(request): Json<Request>) -> Json<Answer> {
    Json(Answer {
        allowed: true,
        user_id: request.user_id,
    })
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let port: u16 = match std::env::var("CEILING_PORT") {
        Ok(port) => port.parse().map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("CEILING_PORT is invalid: {port:?}; expected a port number"),
            )
        })?,
        Err(_) => 3999,
    };
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    axum::serve(listener, Router::new().route("/api", post(api))).await
}
