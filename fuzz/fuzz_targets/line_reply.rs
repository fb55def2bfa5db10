//! marina's `LineClient` / `BytesLineClient` reading replies: arbitrary bytes, delivered
//! in arbitrary chunks, on an in-memory connection under a current-thread runtime.
//!
//! Input: a header line, then the bytes the server sends. The header's words:
//! - `bytes`: a `BytesLineClient` (default: a `LineClient`, which checks UTF-8);
//! - `chunks=N,N,...`: the sizes the connection delivers, cycled (default: all at once);
//!   a 0 is one `Pending` (woken at once) before the next chunk;
//! - `pad=N`: N × 64 KiB of `x` before the bytes (N ≤ 40), to reach `MAX_LINE` (16 is
//!   exactly 1 MiB);
//! - `calls=N`: how many requests to make (default 8, at most 64);
//! - `nl=N`: request number N holds a `\n`.
//!
//! Invariants (the docs of `LineClient`):
//! - nothing panics; memory stays bounded (a reply longer than `MAX_LINE` is
//!   `InvalidData`, read no further than `MAX_LINE + 1` bytes);
//! - each answer is exactly the next line of the stream, without its `\n`, for as long
//!   as lines are at most `MAX_LINE` bytes (and UTF-8, for `LineClient`);
//! - a request is written as itself plus `\n`, and nothing else is written; a request
//!   holding `\n` is `InvalidInput` and sends nothing;
//! - EOF before a whole line is `UnexpectedEof`; a line that is not UTF-8 is
//!   `InvalidData` (`LineClient`);
//! - after a failed exchange the client is not usable: `is_usable()` is false and
//!   `poll_ready` fails.
#![no_main]

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use libfuzzer_sys::fuzz_target;
use marina::line::{BytesLineClient, LineClient, MAX_LINE};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tower_service::Service;

/// A connection that serves `data` in the given chunk sizes and records what is written.
struct Script {
    data: Vec<u8>,
    pos: usize,
    chunks: Vec<usize>,
    next: usize,
    pending: bool,
    written: Arc<Mutex<Vec<u8>>>,
    reads: usize,
}

impl AsyncRead for Script {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        this.reads += 1;
        let mut size = usize::MAX;
        if !this.chunks.is_empty() {
            size = this.chunks[this.next % this.chunks.len()];
            if size == 0 && !this.pending {
                this.pending = true;
                this.next += 1;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            this.pending = false;
            if size == 0 {
                size = 1;
            }
            this.next += 1;
        }
        // Large streams come in larger pieces: bounded polls per input.
        let size = size.max(this.data.len() / 2048);
        let n = size.min(buf.remaining()).min(this.data.len() - this.pos);
        buf.put_slice(&this.data[this.pos..this.pos + n]);
        this.pos += n;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Script {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        // Partial writes: at most 3 bytes at a time.
        let n = b.len().min(3);
        self.written.lock().unwrap().extend_from_slice(&b[..n]);
        Poll::Ready(Ok(n))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

struct Header {
    bytes: bool,
    chunks: Vec<usize>,
    pad: usize,
    calls: usize,
    nl: Option<usize>,
}

fn header(line: &[u8]) -> Header {
    let mut h = Header {
        bytes: false,
        chunks: Vec::new(),
        pad: 0,
        calls: 8,
        nl: None,
    };
    let text = String::from_utf8_lossy(line);
    for word in text.split_ascii_whitespace() {
        let num = |v: &str| v.parse::<usize>().ok();
        if word == "bytes" {
            h.bytes = true;
        } else if let Some(v) = word.strip_prefix("chunks=") {
            h.chunks = v
                .split(',')
                .filter_map(num)
                .map(|n| n.min(1 << 20))
                .take(64)
                .collect();
        } else if let Some(v) = word.strip_prefix("pad=") {
            h.pad = num(v).unwrap_or(0).min(40);
        } else if let Some(v) = word.strip_prefix("calls=") {
            h.calls = num(v).unwrap_or(8).min(64);
        } else if let Some(v) = word.strip_prefix("nl=") {
            h.nl = num(v);
        }
    }
    h
}

/// What the docs say call `i` gets from `rest` (the unread bytes): the reply and how many
/// bytes it consumes, or the error kind.
fn expected(rest: &[u8], utf8: bool) -> Result<(Vec<u8>, usize), io::ErrorKind> {
    match rest.iter().position(|&b| b == b'\n') {
        Some(n) if n <= MAX_LINE => {
            let line = &rest[..n];
            if utf8 && std::str::from_utf8(line).is_err() {
                return Err(io::ErrorKind::InvalidData);
            }
            Ok((line.to_vec(), n + 1))
        }
        Some(_) => Err(io::ErrorKind::InvalidData),
        None if rest.len() > MAX_LINE => Err(io::ErrorKind::InvalidData),
        None => Err(io::ErrorKind::UnexpectedEof),
    }
}

enum Client {
    Text(LineClient<Script>),
    Bytes(BytesLineClient<Script>),
}

impl Client {
    fn usable(&self) -> bool {
        match self {
            Client::Text(c) => c.is_usable(),
            Client::Bytes(c) => c.is_usable(),
        }
    }

    async fn ready(&mut self) -> io::Result<()> {
        match self {
            Client::Text(c) => std::future::poll_fn(|cx| c.poll_ready(cx)).await,
            Client::Bytes(c) => std::future::poll_fn(|cx| c.poll_ready(cx)).await,
        }
    }

    async fn call(&mut self, line: String) -> io::Result<Vec<u8>> {
        match self {
            Client::Text(c) => c.call(line).await.map(String::into_bytes),
            Client::Bytes(c) => c.call(bytes::Bytes::from(line)).await.map(|b| b.to_vec()),
        }
    }
}

fuzz_target!(|input: &[u8]| {
    let (head, body) = match input.iter().position(|&b| b == b'\n') {
        Some(i) => (&input[..i], &input[i + 1..]),
        None => (input, &[][..]),
    };
    let h = header(head);
    let mut data = vec![b'x'; h.pad * 64 * 1024];
    data.extend_from_slice(body);
    let written = Arc::new(Mutex::new(Vec::new()));
    let io = Script {
        data: data.clone(),
        pos: 0,
        chunks: h.chunks.clone(),
        next: 0,
        pending: false,
        written: written.clone(),
        reads: 0,
    };
    let mut client = if h.bytes {
        Client::Bytes(BytesLineClient::new(io))
    } else {
        Client::Text(LineClient::new(io))
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime");
    rt.block_on(async move {
        let mut pos = 0;
        let mut sent = Vec::new();
        for i in 0..h.calls {
            assert!(client.usable(), "call {i}: unusable after success");
            client.ready().await.expect("ready after success");
            if h.nl == Some(i) {
                let before = written.lock().unwrap().len();
                let err = client
                    .call(format!("bad\nrequest {i}"))
                    .await
                    .expect_err("a '\\n' request");
                assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{err}");
                assert_eq!(
                    written.lock().unwrap().len(),
                    before,
                    "a refused request sent bytes"
                );
                // Nothing was sent: the stream is where it was; the client may go on.
                if !client.usable() {
                    return;
                }
                continue;
            }
            let line = format!("request {i}");
            sent.extend_from_slice(line.as_bytes());
            sent.push(b'\n');
            let got = client.call(line).await;
            assert_eq!(*written.lock().unwrap(), sent, "call {i}: written bytes");
            match (expected(&data[pos..], !h.bytes), got) {
                (Ok((want, used)), Ok(reply)) => {
                    assert!(
                        reply == want,
                        "call {i}: reply {:?}, want {:?}",
                        short(&reply),
                        short(&want)
                    );
                    pos += used;
                }
                (Err(kind), Err(e)) => {
                    assert_eq!(e.kind(), kind, "call {i}: {e}");
                    assert!(!client.usable(), "call {i}: usable after {e}");
                    let e = client
                        .ready()
                        .await
                        .expect_err("ready after a failed exchange");
                    assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
                    return;
                }
                (Ok((want, _)), Err(e)) => {
                    panic!(
                        "call {i}: error {e} ({:?}), want the {}-byte line {:?}",
                        e.kind(),
                        want.len(),
                        short(&want)
                    )
                }
                (Err(kind), Ok(reply)) => {
                    panic!(
                        "call {i}: reply of {} bytes {:?}, want {kind:?}",
                        reply.len(),
                        short(&reply)
                    )
                }
            }
        }
    });
    drop(rt);
});

/// A long byte string, shortened for a message.
fn short(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(&b[..b.len().min(64)]).into_owned();
    if b.len() > 64 {
        format!("{s}… ({} bytes)", b.len())
    } else {
        s
    }
}
