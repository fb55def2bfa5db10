//! A read-side tap on an HTTP/2 connection: follows the server's frames as hyper reads
//! them, to learn what hyper does not tell — the server's `SETTINGS_MAX_CONCURRENT_STREAMS`
//! and whether it sent a `GOAWAY` — without touching the bytes.

use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

/// What the tap saw, shared with the pool.
#[derive(Debug)]
pub(crate) struct Seen {
    /// The server's `SETTINGS_MAX_CONCURRENT_STREAMS` (`usize::MAX` until it names one).
    max_streams: AtomicUsize,
    /// A `SETTINGS` frame from the server has been read.
    settings: AtomicBool,
    /// A `GOAWAY` frame from the server has been read: no new streams on this connection.
    goaway: AtomicBool,
    /// Woken when the first `SETTINGS` arrives or the connection ends.
    changed: Notify,
}

impl Seen {
    pub(crate) fn new() -> Self {
        Seen {
            max_streams: AtomicUsize::new(usize::MAX),
            settings: AtomicBool::new(false),
            goaway: AtomicBool::new(false),
            changed: Notify::new(),
        }
    }

    pub(crate) fn max_streams(&self) -> usize {
        self.max_streams.load(Relaxed)
    }

    pub(crate) fn has_settings(&self) -> bool {
        self.settings.load(Acquire)
    }

    pub(crate) fn goaway(&self) -> bool {
        self.goaway.load(Acquire)
    }

    /// Waits for the server's first `SETTINGS` (or the end of the connection: then the
    /// caller finds the sender closed).
    pub(crate) async fn settings(&self) {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.settings.load(Acquire) || self.goaway() {
                return;
            }
            notified.await;
        }
    }

    fn ended(&self) {
        // The connection cannot take new streams; wake a connect waiting for SETTINGS.
        self.goaway.store(true, Release);
        self.changed.notify_waiters();
    }
}

const FRAME_SETTINGS: u8 = 0x4;
const FRAME_GOAWAY: u8 = 0x7;
const FLAG_ACK: u8 = 0x1;
const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;

/// The frame parser's position in the byte stream.
#[derive(Debug)]
struct Parser {
    header: [u8; 9],
    /// Header bytes collected so far (9: in a payload).
    have: usize,
    /// Payload bytes of the current frame still to come.
    left: usize,
    /// In a server `SETTINGS` payload: collect its 6-byte parameters.
    settings: bool,
    param: [u8; 6],
    param_have: usize,
}

impl Parser {
    fn new() -> Self {
        Parser {
            header: [0; 9],
            have: 0,
            left: 0,
            settings: false,
            param: [0; 6],
            param_have: 0,
        }
    }

    fn feed(&mut self, mut bytes: &[u8], seen: &Seen) {
        while !bytes.is_empty() {
            if self.have < 9 {
                let n = (9 - self.have).min(bytes.len());
                self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
                self.have += n;
                bytes = &bytes[n..];
                if self.have == 9 {
                    self.start_frame(seen);
                }
                continue;
            }
            let n = self.left.min(bytes.len());
            if self.settings {
                for &b in &bytes[..n] {
                    self.param[self.param_have] = b;
                    self.param_have += 1;
                    if self.param_have == 6 {
                        self.param_have = 0;
                        let id = u16::from_be_bytes([self.param[0], self.param[1]]);
                        let value = u32::from_be_bytes([
                            self.param[2],
                            self.param[3],
                            self.param[4],
                            self.param[5],
                        ]);
                        if id == SETTINGS_MAX_CONCURRENT_STREAMS {
                            seen.max_streams.store(value as usize, Relaxed);
                        }
                    }
                }
            }
            self.left -= n;
            bytes = &bytes[n..];
            if self.left == 0 {
                self.end_frame(seen);
            }
        }
    }

    fn start_frame(&mut self, seen: &Seen) {
        let h = &self.header;
        self.left = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
        let (kind, flags) = (h[3], h[4]);
        self.settings = kind == FRAME_SETTINGS && flags & FLAG_ACK == 0;
        self.param_have = 0;
        if kind == FRAME_GOAWAY {
            seen.goaway.store(true, Release);
            seen.changed.notify_waiters();
        }
        if self.left == 0 {
            self.end_frame(seen);
        }
    }

    fn end_frame(&mut self, seen: &Seen) {
        if self.settings {
            seen.settings.store(true, Release);
            seen.changed.notify_waiters();
        }
        self.settings = false;
        self.have = 0;
    }
}

pin_project_lite::pin_project! {
    /// An I/O stream whose reads are followed by the frame parser.
    #[derive(Debug)]
    pub(crate) struct Tap<IO> {
        #[pin]
        io: IO,
        parser: Parser,
        seen: std::sync::Arc<Seen>,
    }

    impl<IO> PinnedDrop for Tap<IO> {
        fn drop(this: Pin<&mut Self>) {
            this.seen.ended();
        }
    }
}

impl<IO> Tap<IO> {
    pub(crate) fn new(io: IO, seen: std::sync::Arc<Seen>) -> Self {
        Tap {
            io,
            parser: Parser::new(),
            seen,
        }
    }
}

impl<IO: AsyncRead> AsyncRead for Tap<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let r = this.io.poll_read(cx, buf);
        match &r {
            Poll::Ready(Ok(())) if buf.filled().len() == before && buf.remaining() > 0 => {
                this.seen.ended()
            }
            Poll::Ready(Ok(())) => this.parser.feed(&buf.filled()[before..], this.seen),
            Poll::Ready(Err(_)) => this.seen.ended(),
            Poll::Pending => {}
        }
        r
    }
}

impl<IO: AsyncWrite> AsyncWrite for Tap<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().io.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().io.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let len = (payload.len() as u32).to_be_bytes();
        let mut f = vec![len[1], len[2], len[3], kind, flags, 0, 0, 0, 0];
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn reads_max_streams_and_goaway_split_anywhere() {
        let mut bytes = frame(FRAME_SETTINGS, 0, &[0, 4, 0, 1, 0, 0, 0, 3, 0, 0, 0, 7]);
        bytes.extend(frame(0x0, 0, &[9; 40])); // DATA
        bytes.extend(frame(FRAME_SETTINGS, FLAG_ACK, &[]));
        let before_goaway = bytes.len();
        bytes.extend(frame(FRAME_GOAWAY, 0, &[0, 0, 0, 1, 0, 0, 0, 0]));
        for chunk in [1, 2, 5, 9, 13, 100] {
            let seen = Seen::new();
            let mut p = Parser::new();
            for (i, c) in bytes[..before_goaway].chunks(chunk).enumerate() {
                p.feed(c, &seen);
                if i == 0 && chunk < 9 {
                    assert!(!seen.settings.load(Relaxed));
                }
            }
            assert_eq!(seen.max_streams(), 7, "chunk {chunk}");
            assert!(seen.settings.load(Relaxed));
            assert!(!seen.goaway());
            for c in bytes[before_goaway..].chunks(chunk) {
                p.feed(c, &seen);
            }
            assert!(seen.goaway(), "chunk {chunk}");
        }
    }
}
