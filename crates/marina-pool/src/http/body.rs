//! The response body: hyper's `Incoming`, holding the connection (or HTTP/2 stream)
//! until it ends.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper::body::{Body as HttpBody, Bytes, Frame, Incoming, SizeHint};

/// What a response holds until its body ends: the checked-out HTTP/1 connection, or a
/// stream of a shared HTTP/2 connection.
pub(crate) trait Finish: Send + Sync {
    /// `complete`: the body was read to its end (an HTTP/1 connection is then in step
    /// and reusable); else it was dropped half-read.
    fn finish(self: Box<Self>, complete: bool);
}

/// The body of a response from an [`HttpClient`](super::HttpClient): hyper's
/// [`Incoming`], streamed as it arrives, that holds its connection until the end.
///
/// - **Read to the end** (a frame returns `None`, or the last one is marked end of
///   stream): the connection goes back to the pool at once (HTTP/1), or the stream's
///   slot on the shared connection is freed (HTTP/2).
/// - **Dropped before the end**: an HTTP/1 connection is closed, not reused (the
///   rest of the body would be read by its next user); an HTTP/2 stream is reset
///   (`RST_STREAM`), and the connection carries on with its other streams.
///
/// It implements [`http_body::Body`](hyper::body::Body) with hyper's data and error
/// types, so `http-body-util`'s `BodyExt` (`collect`, `frame`) works on it as on
/// `Incoming`.
pub struct Body {
    inner: Incoming,
    hold: Option<Box<dyn Finish>>,
}

impl Drop for Body {
    fn drop(&mut self) {
        self.release(false);
    }
}

impl Body {
    pub(crate) fn new(inner: Incoming, hold: Box<dyn Finish>) -> Self {
        let mut body = Body {
            inner,
            hold: Some(hold),
        };
        if body.inner.is_end_stream() {
            body.release(true);
        }
        body
    }

    fn release(&mut self, complete: bool) {
        if let Some(hold) = self.hold.take() {
            hold.finish(complete);
        }
    }

    /// True while the body still holds its connection (or stream): it has not ended.
    pub fn holds_connection(&self) -> bool {
        self.hold.is_some()
    }
}

impl fmt::Debug for Body {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Body")
            .field("inner", &self.inner)
            .field("holds_connection", &self.hold.is_some())
            .finish()
    }
}

impl HttpBody for Body {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        match &r {
            Poll::Ready(None) => this.release(true),
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.release(true),
            Poll::Ready(Some(Err(_))) => this.release(false),
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The request body hyper sends: the caller's, or none — a request head kept to send
/// again (an HTTP/2 stream the server refused unprocessed) carries no body.
pub(crate) enum ReqBody<B> {
    Body(B),
    Empty,
}

impl<B: HttpBody + Unpin> HttpBody for ReqBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        match self.get_mut() {
            ReqBody::Body(b) => Pin::new(b).poll_frame(cx),
            ReqBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::Body(b) => b.is_end_stream(),
            ReqBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Body(b) => b.size_hint(),
            ReqBody::Empty => SizeHint::with_exact(0),
        }
    }
}
