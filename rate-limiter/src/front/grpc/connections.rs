//! At most so many connections open on the gRPC port at once, as on the HTTP ports: each
//! accepted connection holds a permit until it closes; one that finds none is closed on
//! arrival (`ratelimit_grpc_connections_refused_total`).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// A connection and its place among the `max` allowed.
pub struct Held {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
}

/// `incoming`, with every connection past the first `max` open ones closed at once.
pub fn bounded(
    incoming: impl Stream<Item = io::Result<TcpStream>> + Send + 'static,
    max: usize,
) -> impl Stream<Item = io::Result<Held>> + Send + 'static {
    let places = Arc::new(Semaphore::new(max.max(1)));
    incoming.filter_map(move |accepted| {
        let places = places.clone();
        async move {
            match accepted {
                Ok(stream) => match places.try_acquire_owned() {
                    Ok(permit) => Some(Ok(Held {
                        stream,
                        _permit: permit,
                    })),
                    Err(_) => {
                        // Dropped: closed.
                        metrics::counter!("ratelimit_grpc_connections_refused_total").increment(1);
                        None
                    }
                },
                Err(err) => Some(Err(err)),
            }
        }
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
