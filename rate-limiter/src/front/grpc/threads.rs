//! The threads that serve the gRPC port: each a single-threaded tokio runtime that owns
//! the connections handed to it, as Envoy's own workers own theirs.
//!
//! Why not the process's work-stealing runtime: Envoy multiplexes its calls over one
//! HTTP/2 connection per Envoy worker, and h2 spawns a task per call. On the work-stealing
//! runtime each call's task ran next (its LIFO slot) or on the other thread, woke the
//! connection's task, and that flushed one answer per write: 1.3 system calls and 0.5
//! context switches per decision behind Envoy. On a thread of its own the connection reads
//! every call that arrived, the calls run, and one write carries all their answers: 0.10
//! system calls and 0.02 context switches per decision, and CPU per decision 18-22 ms per
//! 1,000 instead of 31-37 (limitador, which serves its gRPC port on one such thread, 24;
//! BENCHMARKS.md, "gRPC on threads of its own").
//!
//! With the store in Redis the default is the process's runtime instead (see [`serving`]).
//!
//! The threads live as long as the process, so a task a call starts on one (a Redis
//! client's reconnection spawns on the caller's runtime) is never cut off by a server
//! stopping. Connections go to the thread with the fewest open, so the load spreads over
//! them when several Envoys (or an Envoy with several workers) connect.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use tokio::runtime::Handle;

/// One serving thread: its runtime, and how many connections it holds now.
#[derive(Clone)]
pub struct Worker {
    pub handle: Handle,
    open: Arc<AtomicUsize>,
}

/// Where a gRPC port's connections are served: with `threads` set (`GRPC_THREADS` ≥ 1), or
/// by default when the store is in this process, the process's serving threads; by default
/// with a store elsewhere (Redis), this runtime, the process's work-stealing one. There
/// every call waits for the Redis connection, whose task lives on this runtime: from a
/// thread of its own each call crossed threads twice, and behind Envoy on Redis that made
/// 5.2-6.9 system calls and 0.85-1.5 context switches per decision against 2.1-3.1 and
/// 0.27-0.69 here, for no less CPU (BENCHMARKS.md, "gRPC on threads of its own").
pub fn serving(threads: usize, store_is_remote: bool) -> Vec<Worker> {
    if threads == 0 && store_is_remote {
        return vec![Worker {
            handle: Handle::current(),
            open: Arc::default(),
        }];
    }
    workers(threads).to_vec()
}

/// The process's serving threads, started on first use: `threads` of them (0: one per
/// core). A later call gets the same threads whatever it asks.
fn workers(threads: usize) -> &'static [Worker] {
    static WORKERS: OnceLock<Vec<Worker>> = OnceLock::new();
    WORKERS.get_or_init(|| {
        let threads = if threads == 0 {
            std::thread::available_parallelism().map_or(1, usize::from)
        } else {
            threads
        };
        (0..threads).map(start).collect()
    })
}

fn start(index: usize) -> Worker {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name(format!("grpc-{index}"))
        .build()
        .expect("a single-threaded tokio runtime");
    let handle = runtime.handle().clone();
    std::thread::Builder::new()
        .name(format!("grpc-{index}"))
        .spawn(move || runtime.block_on(std::future::pending::<()>()))
        .expect("a gRPC serving thread");
    Worker {
        handle,
        open: Arc::default(),
    }
}

/// A connection's place on its thread, given back on drop.
pub struct Placed(Arc<AtomicUsize>);

impl Drop for Placed {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The index of the thread with the fewest connections, and the new connection's place on it.
pub fn place(workers: &[Worker]) -> (usize, Placed) {
    let (index, worker) = workers
        .iter()
        .enumerate()
        .min_by_key(|(_, w)| w.open.load(Ordering::Relaxed))
        .expect("at least one gRPC thread");
    worker.open.fetch_add(1, Ordering::Relaxed);
    (index, Placed(worker.open.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_go_to_the_thread_with_the_fewest() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let workers: Vec<Worker> = (0..3)
            .map(|_| Worker {
                handle: runtime.handle().clone(),
                open: Arc::default(),
            })
            .collect();
        let (a, first) = place(&workers);
        let (b, _second) = place(&workers);
        let (c, _third) = place(&workers);
        assert_eq!(
            [a, b, c]
                .iter()
                .collect::<std::collections::HashSet<_>>()
                .len(),
            3
        );
        drop(first);
        let (d, _fourth) = place(&workers);
        assert_eq!(d, a, "the place a closed connection left is taken first");
    }
}
