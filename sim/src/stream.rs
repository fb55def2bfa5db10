//! The client side's stream: turmoil's TCP, recording each request line written.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::log::{Event, Log};
use crate::request::parse_id;

/// A turmoil TCP stream to backend `backend`; every complete request line written
/// through it is logged as [`Event::Sent`].
#[derive(Debug)]
pub struct SimStream {
    inner: turmoil::net::TcpStream,
    backend: usize,
    log: Log,
    /// The current line's bytes so far.
    line: Vec<u8>,
}

impl SimStream {
    /// Connects to `addr`, backend `backend`.
    pub async fn connect(addr: SocketAddr, backend: usize, log: Log) -> io::Result<Self> {
        let inner = turmoil::net::TcpStream::connect(addr).await?;
        log.push(Event::Connected {
            backend,
            port: inner.local_addr()?.port(),
        });
        log.live_streams()
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(SimStream {
            inner,
            backend,
            log,
            line: Vec::new(),
        })
    }

    fn wrote(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if b == b'\n' {
                if let Some(id) = std::str::from_utf8(&self.line).ok().and_then(parse_id) {
                    self.log.push(Event::Sent {
                        id,
                        backend: self.backend,
                    });
                }
                self.line.clear();
            } else {
                self.line.push(b);
            }
        }
    }
}

impl Drop for SimStream {
    fn drop(&mut self) {
        self.log
            .live_streams()
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl AsyncRead for SimStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for SimStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let n = std::task::ready!(Pin::new(&mut this.inner).poll_write(cx, buf))?;
        this.wrote(&buf[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
