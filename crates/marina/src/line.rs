//! A line protocol client: one request line, one reply line.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::task::{Context, Poll};

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tower_service::Service;

/// A client of a line protocol (an echo server, a simple text protocol; `\r` is not
/// stripped) on one connection: a `Service<String>` whose request is one line (without
/// its `\n`) and whose response is the reply line (without its `\n`). One request at a
/// time, as a pooled client is used. [`BytesLineClient`] is the same over raw bytes,
/// without the UTF-8 check.
///
/// Errors are `io::Error`s: EOF before the whole reply is `UnexpectedEof`, a request
/// holding `\n` is `InvalidInput` (refused before anything is sent), a reply that is not
/// UTF-8 or longer than [`MAX_LINE`] is `InvalidData`. A call that fails or is dropped before its reply leaves the
/// client broken (the stream may be mid-reply): its `poll_ready` fails from then on, and
/// a pool closes it.
///
/// # Sharing
///
/// Not `Clone`: a client is one connection, with one exchange on it at a time. Share
/// connections by pooling clients (marina-pool's `Pool` and `PoolService`, as the
/// `Stack` does); to share a single connection between tasks, put the client behind
/// tower's `Buffer`, and calls take turns on it.
pub struct LineClient<IO> {
    io: Arc<tokio::sync::Mutex<BufReader<IO>>>,
    broken: Arc<AtomicBool>,
}

impl<IO> fmt::Debug for LineClient<IO> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LineClient")
            .field("broken", &self.broken.load(SeqCst))
            .finish_non_exhaustive()
    }
}

impl<IO: AsyncRead> LineClient<IO> {
    /// A client on `io`.
    pub fn new(io: IO) -> Self {
        LineClient {
            io: Arc::new(tokio::sync::Mutex::new(BufReader::new(io))),
            broken: Arc::new(AtomicBool::new(false)),
        }
    }

    /// False once a call failed or was cancelled mid-exchange.
    pub fn is_usable(&self) -> bool {
        !self.broken.load(SeqCst)
    }

    /// Whether the client can take a request: not broken, no unread bytes waiting, and
    /// `socket_open` (for example [`marina_pool::socket_is_open`] on the underlying
    /// `TcpStream`) true of its connection; a client busy with a call counts as open.
    /// Fit for a pool's checkout check.
    pub fn is_open_with(&self, socket_open: impl FnOnce(&IO) -> bool) -> bool {
        // The connection first: unread bytes mark the client broken.
        let open = self.with_io(socket_open).unwrap_or(true);
        open && self.is_usable()
    }

    /// Runs `f` on the connection if no call holds it (`None` while one does), for
    /// checks such as [`marina_pool::socket_is_open`]. Unread bytes in the buffer count
    /// as a broken exchange.
    pub fn with_io<R>(&self, f: impl FnOnce(&IO) -> R) -> Option<R> {
        self.with_io_mut(|io| f(io))
    }

    /// As [`is_open_with`](Self::is_open_with), for a check that needs the connection
    /// mutably: over TLS, records that arrived while the connection was idle are read
    /// to tell a session ticket from a reply nobody asked for (marina's
    /// `Transport::is_open`).
    pub fn is_open_with_mut(&self, socket_open: impl FnOnce(&mut IO) -> bool) -> bool {
        let open = self.with_io_mut(socket_open).unwrap_or(true);
        open && self.is_usable()
    }

    /// As [`with_io`](Self::with_io), with the connection mutably. Bytes `f` reads
    /// directly from the connection bypass the client's buffer: use it for checks.
    pub fn with_io_mut<R>(&self, f: impl FnOnce(&mut IO) -> R) -> Option<R> {
        let mut io = self.io.try_lock().ok()?;
        if !io.buffer().is_empty() {
            self.broken.store(true, SeqCst);
        }
        Some(f(io.get_mut()))
    }
}

/// The longest reply line read (1 MiB, its `\n` not counted); a longer one fails with
/// `InvalidData`.
pub const MAX_LINE: usize = 1 << 20;

/// Marks the client broken unless disarmed (the exchange completed).
struct BreakGuard(Option<Arc<AtomicBool>>);

impl Drop for BreakGuard {
    fn drop(&mut self) {
        if let Some(flag) = self.0.take() {
            flag.store(true, SeqCst);
        }
    }
}

impl<IO> LineClient<IO>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    fn check_ready(&self) -> Poll<io::Result<()>> {
        if self.broken.load(SeqCst) {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "line client broken by an earlier failed or cancelled call",
            )));
        }
        Poll::Ready(Ok(()))
    }

    /// One exchange: writes `msg` (the request line, its `\n` appended here), reads
    /// the reply line into the same buffer and returns it without its `\n`.
    fn exchange(&self, mut msg: Vec<u8>) -> impl Future<Output = io::Result<Vec<u8>>> + use<IO> {
        let io = self.io.clone();
        let broken = self.broken.clone();
        async move {
            if msg.contains(&b'\n') {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "a line request may not hold '\\n'",
                ));
            }
            let mut guard = BreakGuard(Some(broken));
            let mut io = io.lock_owned().await;
            msg.push(b'\n');
            io.get_mut().write_all(&msg).await?;
            io.get_mut().flush().await?;
            msg.clear();
            // A reply longer than MAX_LINE is garbage, not a line: bounded memory (at
            // most MAX_LINE bytes and the `\n` are read).
            (&mut *io)
                .take(MAX_LINE as u64 + 1)
                .read_until(b'\n', &mut msg)
                .await?;
            if msg.last() != Some(&b'\n') {
                return Err(if msg.len() > MAX_LINE {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("reply longer than {MAX_LINE} bytes without a newline"),
                    )
                } else {
                    io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("connection closed after {} bytes of a reply", msg.len()),
                    )
                });
            }
            msg.pop();
            guard.0 = None;
            Ok(msg)
        }
    }
}

impl<IO> Service<String> for LineClient<IO>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Response = String;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<String>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.check_ready()
    }

    fn call(&mut self, line: String) -> Self::Future {
        let reply = self.exchange(line.into_bytes());
        let broken = self.broken.clone();
        Box::pin(async move {
            String::from_utf8(reply.await?).map_err(|e| {
                // A server that answers garbage is not trusted with the next request.
                broken.store(true, SeqCst);
                io::Error::new(io::ErrorKind::InvalidData, e)
            })
        })
    }
}

/// A [`LineClient`] whose requests and replies are raw bytes ([`Bytes`](bytes::Bytes)),
/// never checked for UTF-8: for protocols whose lines are not text, and to skip the
/// check's cost. The same rules otherwise: a request holding `\n` is refused unsent, a
/// reply is at most [`MAX_LINE`] bytes, a failed or cancelled call breaks the client.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> std::io::Result<()> {
/// use bytes::Bytes;
/// use marina::line::BytesLineClient;
/// use tower::{Service, ServiceExt};
///
/// let (client_io, mut server_io) = tokio::io::duplex(64);
/// tokio::spawn(async move {
///     use tokio::io::{AsyncReadExt, AsyncWriteExt};
///     let mut buf = [0u8; 64];
///     let n = server_io.read(&mut buf).await.unwrap();
///     server_io.write_all(&buf[..n]).await.unwrap(); // echo
/// });
/// let mut client = BytesLineClient::new(client_io);
/// let reply = client.ready().await?.call(Bytes::from_static(b"\xffraw")).await?;
/// assert_eq!(reply, Bytes::from_static(b"\xffraw"));
/// # Ok(()) }
/// ```
pub struct BytesLineClient<IO>(LineClient<IO>);

impl<IO> fmt::Debug for BytesLineClient<IO> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("BytesLineClient").field(&self.0).finish()
    }
}

impl<IO: AsyncRead> BytesLineClient<IO> {
    /// A client on `io`.
    pub fn new(io: IO) -> Self {
        BytesLineClient(LineClient::new(io))
    }

    /// False once a call failed or was cancelled mid-exchange.
    pub fn is_usable(&self) -> bool {
        self.0.is_usable()
    }

    /// As [`LineClient::is_open_with`].
    pub fn is_open_with(&self, socket_open: impl FnOnce(&IO) -> bool) -> bool {
        self.0.is_open_with(socket_open)
    }

    /// As [`LineClient::with_io`].
    pub fn with_io<R>(&self, f: impl FnOnce(&IO) -> R) -> Option<R> {
        self.0.with_io(f)
    }

    /// As [`LineClient::is_open_with_mut`].
    pub fn is_open_with_mut(&self, socket_open: impl FnOnce(&mut IO) -> bool) -> bool {
        self.0.is_open_with_mut(socket_open)
    }

    /// As [`LineClient::with_io_mut`].
    pub fn with_io_mut<R>(&self, f: impl FnOnce(&mut IO) -> R) -> Option<R> {
        self.0.with_io_mut(f)
    }
}

impl<IO> Service<bytes::Bytes> for BytesLineClient<IO>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Response = bytes::Bytes;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<bytes::Bytes>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.check_ready()
    }

    fn call(&mut self, line: bytes::Bytes) -> Self::Future {
        let reply = self.0.exchange(Vec::from(line));
        Box::pin(async move { reply.await.map(bytes::Bytes::from) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers one request line with `reply` (raw bytes) from the other end of a pipe,
    /// then hangs up (a reply without its `\n` then ends in EOF, not a wait for more).
    async fn answer(reply: Vec<u8>) -> io::Result<String> {
        let (client, mut server) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move {
            let mut byte = [0u8; 1];
            while server.read_exact(&mut byte).await.is_ok() && byte[0] != b'\n' {}
            server.write_all(&reply).await.unwrap();
            // Dropped here: kept alive until the client's call ended, a reply cut short
            // left the client waiting for bytes that never came, and the test hung.
        });
        let mut svc = LineClient::new(client);
        let out = svc.call("ping".to_string()).await;
        server.await.unwrap();
        out
    }

    /// Found by the `line_reply` fuzz target: a reply of exactly `MAX_LINE` bytes was
    /// refused because its `\n` was counted.
    #[tokio::test]
    async fn a_reply_of_max_line_bytes_is_read_and_a_longer_one_refused() {
        let mut exact = vec![b'x'; MAX_LINE];
        exact.push(b'\n');
        assert_eq!(answer(exact).await.unwrap().len(), MAX_LINE);

        let mut long = vec![b'x'; MAX_LINE + 1];
        long.push(b'\n');
        let e = answer(long).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");

        let e = answer(b"half a line".to_vec()).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
    }
}
