//! The JSON wire types of the public API and of the gateway-to-limiter hop, and the
//! validation of what clients send.
//!
//! - `check`: one check (`POST /check`, `POST /api`) and its answer.
//! - `batch`: `POST /check/batch`, the gateway's exchange with a limiter: checks, the
//!   refusal notices, and the answers with the limiter's generation.
//! - `identity`: the identity rule of user ids, domains and descriptor entries.
//! - `error`: a client's mistake in one field, the error body every service answers with,
//!   and [`CheckError`], the typed reason a check got no decision, the same on both sides of
//!   the hop.

mod batch;
mod check;
mod error;
mod identity;
#[cfg(test)]
mod tests;

pub use batch::*;
pub use check::*;
pub use error::*;
pub use identity::*;

/// Longest accepted `user_id`, in bytes of UTF-8.
pub const MAX_USER_ID_BYTES: usize = 256;
/// Largest accepted `cost`.
pub const MAX_COST: u64 = 1_000_000;
/// Largest accepted request body, in bytes.
pub const MAX_BODY_BYTES: usize = 4 * 1024;
/// Largest body of an `/admin` request (an override document), at the limiter and at the
/// gateway that passes it on.
pub const MAX_ADMIN_BODY_BYTES: usize = 64 * 1024;

/// Most descriptors in one request.
pub const MAX_DESCRIPTORS: usize = 16;
/// Most entries in one descriptor.
pub const MAX_ENTRIES: usize = 16;
/// Longest descriptor key or domain, in bytes of UTF-8 (values are as long as user ids).
pub const MAX_KEY_BYTES: usize = 128;
