//! TCP_QUICKACK on a connection's socket (directcall's patch).
//!
//! Linux delays an ACK by up to 40 ms hoping to piggyback it on data. A
//! broker that leaves Nagle's algorithm on (Mosquitto as Debian ships it)
//! then holds the second of two small packets it sends back to back (a
//! PUBACK and the reply that follows it) until that delayed ACK. Quick-ack
//! mode is not sticky (Linux leaves it on its own), so it is set again after
//! every read.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::framed::AsyncReadWrite;

/// `tcp` as the connection's stream, acknowledging every read at once when
/// `quickack` (on Linux and Android; elsewhere the option does nothing).
pub(crate) fn boxed(tcp: TcpStream, quickack: bool) -> Box<dyn AsyncReadWrite> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if quickack {
        let _ = tcp.set_quickack(true);
        return Box::new(QuickAck(tcp));
    }
    let _ = quickack;
    Box::new(tcp)
}

/// A TCP stream in quick-ack mode after every read.
#[cfg(any(target_os = "linux", target_os = "android"))]
struct QuickAck(TcpStream);

#[cfg(any(target_os = "linux", target_os = "android"))]
impl AsyncRead for QuickAck {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let read = Pin::new(&mut self.0).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = read {
            let _ = self.0.set_quickack(true);
        }
        read
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
impl AsyncWrite for QuickAck {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}
