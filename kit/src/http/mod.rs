//! The HTTP side of every service: one error type mapped to HTTP in one place, a strict
//! JSON extractor, JSON answers for unknown paths and wrong methods, and what keeps a
//! service answering whatever its clients do:
//!
//! - [`with_guards`]: the whole stack: every request's body read in full, under a deadline
//!   and a size limit, *before* the request takes an in-flight slot (a slow sender holds a
//!   connection, never a slot), then a bound on requests in flight (past it, 429 at once)
//!   and on how long each runs, with the liveness probe outside that bound.
//! - [`serve()`]: HTTP/1.1 on a listener with a header-read timeout, a send timeout, a cap
//!   on open connections and a graceful shutdown.
//!
//! One file each: [`error`] (the error type), [`json`] (the extractor), [`layers`] (the
//! router's layers and the liveness probe), [`body`] (bodies read first) and [`serve`](mod@serve)
//! (the listener and each connection's handler).

pub mod body;
pub mod error;
pub mod json;
pub mod layers;
pub mod serve;
#[cfg(test)]
mod tests;

pub use body::BodyLimit;
pub use error::ApiError;
pub use json::ValidJson;
pub use layers::{Direct, Guarded, HEALTHZ, READYZ, liveness, with_common_layers, with_guards};
pub use serve::{HttpService, ServeLimits, serve};
