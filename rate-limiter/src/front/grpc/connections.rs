//! The gRPC port's connections: accepted on the process's runtime, at most so many open at
//! once as on the HTTP ports (each holds a permit until it closes; one that finds none is
//! closed on arrival, `ratelimit_grpc_connections_refused_total`), then handed to the
//! serving thread with the fewest ([`super::threads`]), where it is registered with that
//! thread's own reactor: its reads, its calls and its writes all happen there.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tonic::transport::server::{Connected, TcpConnectInfo};

use super::threads::{self, Placed, Worker};

/// A connection on its way to its thread: not yet registered with any reactor.
pub struct Handed {
    stream: std::net::TcpStream,
    permit: OwnedSemaphorePermit,
    placed: Placed,
}

/// A connection, its place among the `max` allowed and its place on its thread.
pub struct Held {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
    _placed: Placed,
}

/// Accepts on `listener` until `shutdown`: every connection past the first `max` open ones
/// is closed at once; the others go, `TCP_NODELAY` set, to the thread of `workers` with
/// the fewest, through its sender in `to`.
pub async fn accept(
    listener: TcpListener,
    max: usize,
    workers: &[Worker],
    to: &[mpsc::Sender<Handed>],
    shutdown: &CancellationToken,
) {
    let places = Arc::new(Semaphore::new(max.max(1)));
    loop {
        let accepted = tokio::select! {
            biased;
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(err) => {
                // A connection reset before it was accepted, or out of file descriptors: a
                // short pause rather than a spin.
                tracing::debug!(error = %err, "gRPC accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let Ok(permit) = places.clone().try_acquire_owned() else {
            // Dropped: closed.
            metrics::counter!("ratelimit_grpc_connections_refused_total").increment(1);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let Ok(stream) = stream.into_std() else {
            continue;
        };
        let (index, placed) = threads::place(workers);
        let handed = Handed {
            stream,
            permit,
            placed,
        };
        // Only fails when the thread's server has stopped: the connection is closed.
        let _ = to[index].send(handed).await;
    }
}

/// The connections handed to this thread, registered with its reactor, as tonic's incoming
/// stream; it ends when the acceptor stops.
pub fn adopt(handed: mpsc::Receiver<Handed>) -> impl Stream<Item = io::Result<Held>> + Send {
    futures::stream::unfold(handed, |mut handed| async move {
        let Handed {
            stream,
            permit,
            placed,
        } = handed.recv().await?;
        let held = TcpStream::from_std(stream).map(|stream| Held {
            stream,
            _permit: permit,
            _placed: placed,
        });
        Some((held, handed))
    })
}

impl Connected for Held {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Held {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Held {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}
