//! `Pooled`: the RAII guard of a checked-out connection.

use std::fmt;
use std::io;
use std::ops::{Deref, DerefMut};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::core::{Core, Entry, HeldSlot, Reason};

/// A checked-out connection. Dereferences to the connection; returns it to the pool
/// when dropped, unless it was poisoned.
///
/// A `Pooled` is poisoned — closed on drop instead of reused — by [`poison`](Self::poison)
/// or [`mark_broken`](Self::mark_broken), or when an I/O error or end-of-stream is seen
/// through its `AsyncRead`/`AsyncWrite` (and hyper `rt::Read`/`rt::Write`)
/// implementations, or when it is shut down. Do the I/O through the guard
/// (`&mut conn`, not `&mut *conn`) so it sees those. [`detach`](Self::detach) takes the
/// connection out of the pool for good.
///
/// # Cancellation in the middle of an exchange
///
/// If a request/reply exchange on the connection is abandoned half-way (the task is
/// cancelled, a `timeout` around it fires), the connection is out of step with the
/// protocol: a late reply would be read by its next user. The checkout check only
/// catches reply bytes that have already arrived. Bracket each exchange instead:
/// [`mark_broken`](Self::mark_broken) before it, [`mark_healthy`](Self::mark_healthy) once
/// the reply is fully read. Whatever interrupts it in between, the connection is closed
/// rather than reused. [`PoolService`](crate::PoolService) does this for you.
///
/// ```
/// # use marina_pool::{Pool, TcpConnector};
/// # use tokio::io::{AsyncReadExt, AsyncWriteExt};
/// # async fn exchange(pool: &Pool<TcpConnector, std::net::SocketAddr>) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
/// let mut conn = pool.get().await?;
/// conn.mark_broken(); // until the reply is in
/// conn.write_all(b"ping\n").await?;
/// let mut reply = [0; 5];
/// conn.read_exact(&mut reply).await?;
/// conn.mark_healthy(); // in step again: reusable
/// # Ok(()) }
/// ```
///
/// # Examples
///
/// ```
/// # use marina_pool::{Pool, TcpConnector};
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), marina_pool::PoolError> {
/// # let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
/// # let addr = l.local_addr().unwrap();
/// let pool = Pool::builder().max_size(2).build(TcpConnector::new(), addr)?;
/// let conn = pool.get().await?;
/// println!("talking to {}", conn.peer_addr().unwrap()); // Deref to TcpStream
/// conn.poison(); // the protocol got confused: close instead of reusing
/// assert_eq!(pool.stats().destroyed, 1);
/// # Ok(()) }
/// ```
pub struct Pooled<X> {
    entry: Option<Entry<X>>,
    core: Arc<Core<X>>,
    poisoned: bool,
}

impl<X> Pooled<X> {
    pub(crate) fn new(entry: Entry<X>, core: Arc<Core<X>>) -> Self {
        Pooled {
            entry: Some(entry),
            core,
            poisoned: false,
        }
    }

    fn entry(&self) -> &Entry<X> {
        self.entry
            .as_ref()
            .expect("Pooled used after being taken apart")
    }

    fn entry_mut(&mut self) -> &mut Entry<X> {
        self.entry
            .as_mut()
            .expect("Pooled used after being taken apart")
    }

    /// Closes the connection instead of returning it to the pool, now. Its slot is freed
    /// (a waiter, if any, may open a new one).
    pub fn poison(mut self) {
        self.poisoned = true;
    }

    /// Marks the connection as broken without giving up the guard: it will be closed,
    /// not reused, when the guard drops.
    pub fn mark_broken(&mut self) {
        self.poisoned = true;
    }

    /// Undoes [`mark_broken`](Self::mark_broken): the connection goes back to the pool
    /// when the guard drops. For bracketing an exchange (see the type's docs); do not
    /// call it after an I/O error.
    pub fn mark_healthy(&mut self) {
        self.poisoned = false;
    }

    /// Counts an error seen on this connection that does not make it unusable (an
    /// application-level error reply, say), in [`ConnStats::errors`](crate::ConnStats::errors).
    pub fn record_error(&self) {
        self.entry().meta.errors.fetch_add(1, Relaxed);
    }

    /// True if the connection will be closed rather than reused when dropped.
    pub fn is_broken(&self) -> bool {
        self.poisoned
    }

    /// Takes the connection out of the pool for good. The pool forgets it and frees its
    /// slot; the caller owns the connection.
    ///
    /// # Examples
    ///
    /// ```
    /// # use marina_pool::{Pool, TcpConnector};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), marina_pool::PoolError> {
    /// # let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    /// let pool = Pool::builder().max_size(1).build(TcpConnector::new(), l.local_addr().unwrap())?;
    /// let stream: tokio::net::TcpStream = pool.get().await?.detach(); // e.g. to upgrade it
    /// assert_eq!(pool.stats().total, 0); // its slot is free for a new connection
    /// # drop(stream); Ok(()) }
    /// ```
    pub fn detach(mut self) -> X {
        let Entry { conn, meta } = self
            .entry
            .take()
            .expect("Pooled used after being taken apart");
        let core = &self.core;
        meta.released();
        core.forget(&meta);
        core.counters.destroyed.fetch_add(1, Relaxed);
        // The slot first, the event (user code, which may panic) after.
        core.release_slot();
        tracing::debug!(pool = %core.name, id = meta.id, reason = Reason::Detached.as_str(), "connection detached");
        #[cfg(feature = "metrics")]
        core.metrics.closed(Reason::Detached);
        conn
    }

    /// Takes the entry out without returning it, undoing this checkout's use count (a
    /// checkout that did not happen: the connection failed its recycle check). The
    /// caller holds its slot.
    pub(crate) fn take_unused(mut self) -> Entry<X> {
        let e = self
            .entry
            .take()
            .expect("Pooled used after being taken apart");
        e.meta
            .uses
            .store(e.meta.uses.load(Relaxed).saturating_sub(1), Relaxed);
        e
    }

    /// Runs a checkout's checks on a connection held since a checkout that left them to
    /// its user (a [`PoolService`](crate::PoolService) reservation), as it is about to be
    /// used: expiry, then the liveness check. `Some(reason)` when it fails them: the
    /// caller then closes it with [`close_keeping_slot`](Self::close_keeping_slot).
    #[inline]
    pub(crate) fn recheck(&mut self) -> Option<Reason> {
        // Closed on drop if the check (user code) panics.
        let was_broken = std::mem::replace(&mut self.poisoned, true);
        let core = &*self.core;
        let reason = core.unusable(
            self.entry
                .as_mut()
                .expect("Pooled used after being taken apart"),
        );
        self.poisoned = was_broken;
        reason
    }

    /// Closes a connection that failed its [`recheck`](Self::recheck), undoing the
    /// checkout that reserved it (it served nothing), and keeps its slot for the caller
    /// to connect in.
    #[cold]
    pub(crate) fn close_keeping_slot(self, reason: Reason) -> HeldSlot<X> {
        let core = self.core.clone();
        // Held before the close (user code: a connection's `Drop`), so a panic there
        // frees the slot.
        let slot = HeldSlot::new(core.clone());
        core.retire(self.take_unused(), reason, false);
        slot
    }

    /// The pool's id for this connection (as in [`ConnStats::id`](crate::ConnStats::id)).
    pub fn id(&self) -> u64 {
        self.entry().meta.id
    }

    /// How many times this connection has been checked out, this time included.
    pub fn uses(&self) -> u64 {
        self.entry().meta.uses.load(Relaxed)
    }

    fn io(&mut self) -> Pin<&mut X>
    where
        X: Unpin,
    {
        Pin::new(&mut self.entry_mut().conn)
    }
}

impl<X> Drop for Pooled<X> {
    fn drop(&mut self) {
        if let Some(e) = self.entry.take() {
            self.core.give_back(e, self.poisoned);
        }
    }
}

impl<X> Deref for Pooled<X> {
    type Target = X;

    fn deref(&self) -> &X {
        &self.entry().conn
    }
}

impl<X> DerefMut for Pooled<X> {
    fn deref_mut(&mut self) -> &mut X {
        &mut self.entry_mut().conn
    }
}

impl<X: fmt::Debug> fmt::Debug for Pooled<X> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pooled")
            .field("id", &self.id())
            .field("conn", &self.entry().conn)
            .field("poisoned", &self.poisoned)
            .finish()
    }
}

impl<X> Pooled<X> {
    fn observe<T>(&mut self, r: &Poll<io::Result<T>>) {
        if let Poll::Ready(Err(_)) = r {
            self.poisoned = true;
        }
    }
}

impl<X: AsyncRead + Unpin> AsyncRead for Pooled<X> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let wanted = buf.remaining() > 0;
        let r = this.io().poll_read(cx, buf);
        this.observe(&r);
        if matches!(r, Poll::Ready(Ok(()))) && wanted && buf.filled().len() == before {
            // End of stream: the peer closed; this connection cannot be reused.
            this.poisoned = true;
        }
        r
    }
}

impl<X: AsyncWrite + Unpin> AsyncWrite for Pooled<X> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = this.io().poll_write(cx, buf);
        this.observe(&r);
        if matches!(r, Poll::Ready(Ok(0))) && !buf.is_empty() {
            this.poisoned = true;
        }
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = this.io().poll_write_vectored(cx, bufs);
        this.observe(&r);
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.entry().conn.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = this.io().poll_flush(cx);
        this.observe(&r);
        r
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // A connection that was shut down cannot be reused.
        this.poisoned = true;
        this.io().poll_shutdown(cx)
    }
}

#[cfg(feature = "hyper")]
mod hyper_io {
    use super::*;
    use hyper::rt::{Read, ReadBufCursor, Write};
    use hyper_util::client::legacy::connect::{Connected, Connection};

    impl<X: Read + Unpin> Read for Pooled<X> {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: ReadBufCursor<'_>,
        ) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            let r = Read::poll_read(this.io(), cx, buf);
            this.observe(&r);
            r
        }
    }

    impl<X: Write + Unpin> Write for Pooled<X> {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            let r = Write::poll_write(this.io(), cx, buf);
            this.observe(&r);
            if matches!(r, Poll::Ready(Ok(0))) && !buf.is_empty() {
                this.poisoned = true;
            }
            r
        }

        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            let r = Write::poll_flush(this.io(), cx);
            this.observe(&r);
            r
        }

        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            this.poisoned = true;
            Write::poll_shutdown(this.io(), cx)
        }
    }

    impl<X: Connection> Connection for Pooled<X> {
        fn connected(&self) -> Connected {
            self.entry().conn.connected()
        }
    }
}
