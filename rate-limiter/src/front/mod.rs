//! The doors requests come in by, each a thin translation to and from the limiter.
//!
//! - [`http`]: `POST /check`, `POST /check/batch` (the gateway's exchange), `POST /json`,
//!   the probes and `/metrics`.
//! - [`admin`]: `/admin`: overrides, bucket peeks and resets, behind the admin token.
//! - [`grpc`]: Envoy's rate limit service (`ShouldRateLimit`) and the gRPC port's bounds.
//! - [`rlqs`]: Envoy's rate limit quota service, on the same port.

pub mod admin;
pub mod grpc;
pub mod http;
pub mod rlqs;
