//! What bounds the cost of the analytics reads, which share Redis with the buckets: a
//! window over everyone is computed at most once a second per window, single-flight, and
//! shared by every caller of that second; a window over one user is read by a few callers
//! at a time, the others shed at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use domain::analytics::CounterError;
use tokio::sync::{OnceCell, OwnedSemaphorePermit, Semaphore};

/// Most per-user window reads in flight at once.
const USER_WINDOW_READS: usize = 4;

type Answer = Arc<serde_json::Value>;
/// The second an answer is for, and the answer (or its computation in progress).
type Slot = (u64, Arc<OnceCell<Answer>>);

/// The analytics read guards of one gateway.
pub struct AnalyticsReads {
    /// Per window length (seconds): the second it was computed for, and its answer (or the
    /// computation in progress). Bounded by the distinct window lengths, at most the
    /// retention in minutes.
    global: Mutex<HashMap<u64, Slot>>,
    user_windows: Arc<Semaphore>,
}

impl Default for AnalyticsReads {
    fn default() -> Self {
        Self::new()
    }
}

impl AnalyticsReads {
    pub fn new() -> Self {
        Self {
            global: Mutex::default(),
            user_windows: Arc::new(Semaphore::new(USER_WINDOW_READS)),
        }
    }

    /// The answer for `window_secs` in `second`: computed by `compute` once, by the first
    /// caller, while the others wait for it. A caller that goes away mid-computation hands
    /// it to the next waiter (the cell is not left half-made); a failure is not cached.
    pub async fn global<F, Fut>(
        &self,
        window_secs: u64,
        second: u64,
        compute: F,
    ) -> Result<Answer, CounterError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<serde_json::Value, CounterError>>,
    {
        let cell = {
            let mut global = self.global.lock().expect("analytics cache lock");
            let entry = global
                .entry(window_secs)
                .or_insert_with(|| (second, Arc::default()));
            if entry.0 != second {
                *entry = (second, Arc::default());
            }
            entry.1.clone()
        };
        cell.get_or_try_init(|| async { compute().await.map(Arc::new) })
            .await
            .cloned()
    }

    /// Leave to read one user's window, or `None` when enough such reads are running.
    pub fn user_window_permit(&self) -> Option<OwnedSemaphorePermit> {
        self.user_windows.clone().try_acquire_owned().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn one_computation_per_window_and_second_shared_by_every_caller() {
        let reads = Arc::new(AnalyticsReads::new());
        let computed = Arc::new(AtomicUsize::new(0));
        let ask = |second: u64| {
            let (reads, computed) = (reads.clone(), computed.clone());
            async move {
                reads
                    .global(900, second, || async move {
                        computed.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        Ok(serde_json::json!({"second": second}))
                    })
                    .await
                    .unwrap()
            }
        };
        let answers = futures::future::join_all((0..50).map(|_| ask(7))).await;
        assert!(answers.iter().all(|a| a["second"] == 7));
        assert_eq!(computed.load(Ordering::SeqCst), 1);
        ask(8).await;
        assert_eq!(
            computed.load(Ordering::SeqCst),
            2,
            "a new second, a new answer"
        );
    }

    #[test]
    fn user_window_reads_are_bounded() {
        let reads = AnalyticsReads::new();
        let held: Vec<_> = (0..USER_WINDOW_READS)
            .map(|_| reads.user_window_permit().unwrap())
            .collect();
        assert!(reads.user_window_permit().is_none());
        drop(held);
        assert!(reads.user_window_permit().is_some());
    }
}
