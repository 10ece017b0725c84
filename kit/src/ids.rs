//! Ids no other process makes: a random prefix per process and a counter. The limiter's
//! store calls are remembered under them (a call sent again after a timeout is answered
//! from its first run), and the gateway names each batch it sends with one, which it keeps
//! when it asks another replica the same batch.

use std::sync::atomic::{AtomicU64, Ordering};

/// A source of ids.
#[derive(Debug)]
pub struct IdSource {
    prefix: u64,
    next: AtomicU64,
}

/// A random number, new at every call: std's hasher keys are random per process and per
/// instance (no random-number crate needed for ids that need only differ).
pub fn random_u64() -> u64 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one(std::process::id())
}

impl IdSource {
    pub fn new() -> Self {
        Self {
            prefix: random_u64(),
            next: AtomicU64::new(0),
        }
    }

    /// The next id: hex digits, at most 32.
    pub fn next_id(&self) -> String {
        format!(
            "{:x}{:x}",
            self.prefix,
            self.next.fetch_add(1, Ordering::Relaxed)
        )
    }
}

impl Default for IdSource {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_differ_within_and_across_sources() {
        let ids = IdSource::new();
        assert_ne!(ids.next_id(), ids.next_id());
        assert_ne!(IdSource::new().next_id(), IdSource::new().next_id());
        assert!(ids.next_id().len() <= 32);
    }
}
