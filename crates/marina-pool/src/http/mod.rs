//! A hyper HTTP client service over pooled connections: [`HttpClient`].
//!
//! `HttpClient` is a `tower::Service<http::Request<B>>` to one backend (one target of
//! an I/O connector: a [`TcpConnector`] address, a TLS connector's target). It opens
//! hyper connections in a marina [`Pool`] — so every pool setting, check, statistic
//! and event applies — and streams bodies both ways: any [`http_body::Body`](hyper::body::Body)
//! goes out, and the response's [`Body`] is hyper's `Incoming` as it arrives. You
//! write no connector code.
//!
//! - **HTTP/1** ([`Protocol::Http1`], the default): a request checks a connection out
//!   and holds it until the response body has been read to its end, then the
//!   connection goes back to the pool. A body dropped half-read closes its connection
//!   (its next user would read the rest); a request cancelled mid-flight too. So a
//!   connection is never handed out half-read.
//! - **HTTP/2** ([`Protocol::Http2`], or [`Protocol::Negotiated`] when ALPN said `h2`):
//!   connections are shared. Each carries up to the server's
//!   `SETTINGS_MAX_CONCURRENT_STREAMS` requests at once (capped by
//!   [`HttpClientBuilder::max_streams`]); a new connection is opened only when every
//!   one is full, up to the pool's `max_size`. A connection whose server sent `GOAWAY`
//!   takes no new request (new ones go to a fresh connection); idle ones are pinged.
//!   Details in the shared mode's notes below.
//! - **Nothing lost when a connection was stale**: a request hyper did not send (the
//!   connection closed while idle) is sent again on another one, twice at most; one
//!   that was never sent comes back as a [`NotSent`] error carrying the request, so a
//!   balancer can fail it over. HTTP/2: a bodiless request whose stream the server
//!   refused unprocessed (`REFUSED_STREAM`, or above a graceful `GOAWAY`'s last stream
//!   id) is sent again on another connection from a copy of its head; since hyper
//!   reports a stream it opened just as a `GOAWAY` arrived the same way as one refused,
//!   that second case is re-sent only for idempotent methods (or requests marked
//!   [`Idempotent`](marina_core::Idempotent)). A request with a body cannot be re-sent
//!   (it was streamed); its error says so only when the server proved it unprocessed.
//! - [`tower::load::Load`]: the requests in flight (until their bodies end), for
//!   balancers.
//!
//! # Examples
//!
//! ```
//! use http_body_util::{BodyExt, Full};
//! use hyper::body::Bytes;
//! use marina_pool::http::HttpClient;
//! use marina_pool::Pool;
//! use tower::{Service, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), marina_core::BoxError> {
//! # let addr = serve_hello().await;
//! let mut client = HttpClient::builder()
//!     .pool(Pool::builder().max_size(8))
//!     .build::<Full<Bytes>>(addr)?;
//!
//! let req = http::Request::get("/hello").body(Full::new(Bytes::from_static(b"")))?;
//! let resp = client.ready().await?.call(req).await?;
//! assert_eq!(resp.status(), 200);
//! assert_eq!(client.pool().stats().active, 1); // the body holds the connection
//! let body = resp.into_body().collect().await?.to_bytes(); // streamed; ends here
//! assert_eq!(body, "hello");
//! assert_eq!(client.pool().stats().active, 0); // back in the pool
//! # Ok(()) }
//! # async fn serve_hello() -> std::net::SocketAddr {
//! #     let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
//! #     let addr = l.local_addr().unwrap();
//! #     tokio::spawn(async move { loop {
//! #         let (s, _) = l.accept().await.unwrap();
//! #         tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(
//! #             hyper_util::rt::TokioIo::new(s),
//! #             hyper::service::service_fn(|_r| async { Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(Bytes::from_static(b"hello")))) }),
//! #         ));
//! #     } });
//! #     addr
//! # }
//! ```
//!
//! HTTP/2 with prior knowledge (`h2c`): `.http2()` on the builder. Under a TLS connector,
//! [`Protocol::Negotiated`] picks HTTP/2 when the handshake negotiated `h2` (the stream
//! says so through [`Negotiated`]), HTTP/1.1 otherwise. With the `tls` feature:
//!
//! ```ignore
//! use marina_pool::tls::{TlsConfig, TlsConnector};
//!
//! let tls = TlsConfig::from_ca_file("ca.pem")?.alpn(["h2", "http/1.1"]);
//! let client = HttpClient::builder()
//!     .protocol(Protocol::Negotiated)
//!     .build_with::<_, _, Full<Bytes>>(TlsConnector::new(TcpConnector::new(), tls), addr)?;
//! ```
//!
//! (Run in `tests/tests/http_tls.rs` against rustls servers offering `h2` or only
//! `http/1.1`.)
//!
//! # The shared (HTTP/2) mode
//!
//! A connection checked out of the pool for HTTP/2 is *leased*: it stays checked out
//! while it carries streams, and goes back to the pool (idle) when its last stream
//! ends — the pool's `idle_timeout`, `max_lifetime`, checkout checks and background
//! health checks then apply to it as to any connection, and [`Pool::stats`] counts it
//! active while it carries streams. Its capacity is what the server's first `SETTINGS`
//! frame says (the connect waits for it), read from the frames as hyper reads them;
//! a request takes a stream on the first leased connection with room, waits for a
//! connection being opened if that one's expected streams are not all spoken for, or
//! opens one. At `max_size` it waits for a stream to end, within the pool's
//! `acquire_timeout` ([`PoolError::Timeout`], given back as [`NotSent`] with the
//! request). A stream is held until its response body ends or is dropped (hyper then
//! resets it).
//!
//! # `KeyedPool` as the connector of hyper-util's and tonic's clients
//!
//! Where hyper-util's legacy `Client` or a tonic `Channel` runs the HTTP protocol
//! itself, a [`KeyedPool`](crate::KeyedPool) of streams is their connector (a
//! `Service<Uri>` of hyper I/O, with this crate's `hyper` feature): connects are bounded
//! per host, timed out and retried by the pool, and counted in its stats. Those clients
//! keep each connection they get for as long as it lives (they pool or multiplex it
//! themselves), so the pool's idle timeout, lifetime and health checks do not see it
//! again; [`HttpClient`] is the path where they do.
//!
//! hyper-util's legacy `Client`, over hyper-util's `HttpConnector` (which takes a
//! `Uri`):
//!
//! ```
//! use http_body_util::{BodyExt, Empty};
//! use hyper::body::Bytes;
//! use hyper_util::client::legacy::{Client, connect::HttpConnector};
//! use hyper_util::rt::TokioExecutor;
//! use marina_pool::{KeyedPool, Pool};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), marina_core::BoxError> {
//! # let addr = serve_hello().await;
//! let connector = KeyedPool::new(Pool::builder().max_size(4), HttpConnector::new())?;
//! let client: Client<_, Empty<Bytes>> =
//!     Client::builder(TokioExecutor::new()).build(connector.clone());
//!
//! let resp = client.get(format!("http://{addr}/").parse()?).await?;
//! assert_eq!(resp.into_body().collect().await?.to_bytes(), "hello");
//! assert_eq!(connector.stats()[0].1.created, 1); // one target, one connection
//! # Ok(()) }
//! # async fn serve_hello() -> std::net::SocketAddr {
//! #     let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
//! #     let addr = l.local_addr().unwrap();
//! #     tokio::spawn(async move { loop {
//! #         let (s, _) = l.accept().await.unwrap();
//! #         tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(
//! #             hyper_util::rt::TokioIo::new(s),
//! #             hyper::service::service_fn(|_r| async { Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(Bytes::from_static(b"hello")))) }),
//! #         ));
//! #     } });
//! #     addr
//! # }
//! ```
//!
//! tonic's `Endpoint::connect_with_connector`:
//!
//! ```no_run
//! use hyper_util::client::legacy::connect::HttpConnector;
//! use marina_pool::{KeyedPool, Pool};
//! use tonic::transport::Endpoint;
//!
//! # async fn run() -> Result<(), marina_core::BoxError> {
//! let connector = KeyedPool::new(Pool::builder().max_size(2), HttpConnector::new())?;
//! let channel = Endpoint::from_static("http://127.0.0.1:50051")
//!     .connect_with_connector(connector.clone())
//!     .await?;
//! // `channel` is a tonic `Channel`: hand it to any generated client.
//! # drop(channel);
//! # Ok(()) }
//! ```
//!
//! Over TLS (the `tls` feature), key the pools by `"host:port"` over a
//! `marina_pool::tls::TlsConnector`, and adapt them to what tonic hands and takes — a
//! `Uri` in, hyper I/O out — with two tower combinators:
//!
//! ```ignore
//! let pools: KeyedPool<_, String> =
//!     KeyedPool::new(Pool::builder(), TlsConnector::new(TcpConnector::new(), tls.alpn(["h2"])))?;
//! let connector = tower::ServiceBuilder::new()
//!     .map_request(|uri: tonic::transport::Uri| uri.authority().unwrap().to_string())
//!     .map_response(hyper_util::rt::TokioIo::new)
//!     .service(pools.clone());
//! let channel = Endpoint::from_static("https://backend.internal:443")
//!     .connect_with_connector(connector)
//!     .await?;
//! ```
//!
//! (Run in `tests/tests/http_tls.rs`.)
//!
//! # Cancel safety
//!
//! Dropping a call's future before the response arrives gives up whatever it held: its
//! place in the pool's queue; an HTTP/1 connection mid-exchange is closed, not reused;
//! an HTTP/2 stream is reset and its slot freed.
//!
//! [`NotSent`]: marina_core::NotSent

mod body;
mod conn;
mod shared;
mod tap;

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::HOST;
use http::uri::{Authority, Scheme, Uri};
use http::{HeaderValue, Request, Response};
use http_body_util::Full;
use hyper::body::{Body as HttpBody, Bytes};
use marina_core::{BoxError, NotSent};
use tokio::io::{AsyncRead, AsyncWrite};
use tower::load::Load;
use tower_service::Service;

pub use body::Body;
pub use conn::{HttpConn, HttpConnectError, Negotiated, Protocol};

use body::{Finish, ReqBody};
use conn::{H2Settings, HttpManager, Kind};
use shared::{Checkout, Lease, Shared};

use crate::{Builder, Managed, Pool, PoolError, Pooled, TcpConnector};

/// The pool under an [`HttpClient`]: hyper connections to target `T`, request bodies
/// of type `B`.
pub type HttpPool<B, T = SocketAddr> = Pool<Managed<HttpConn<B>, T>, T>;

/// How many times a request hyper did not send (the connection had closed) is tried on
/// another connection.
const SEND_TRIES: usize = 3;

/// A `Service<http::Request<B>>` to one backend over pooled hyper connections: HTTP/1
/// (a connection per request, held until the response body ends) or HTTP/2 (shared
/// connections, up to the server's stream limit each). See the [module docs](self).
///
/// `B` is the request body: any [`http_body::Body`](hyper::body::Body) that is `Send`
/// and `Unpin` (hyper's HTTP/2 requires it), by default `http_body_util::Full<Bytes>`.
///
/// # Sharing
///
/// `Clone`, cheap (one `Arc`), `Send + Sync`: clones share the pool and the HTTP/2
/// connections. Always ready; a request waits for a connection in its future (the
/// pool's `acquire_timeout` bounds that wait).
pub struct HttpClient<B = Full<Bytes>, T = SocketAddr> {
    inner: Arc<Inner<B, T>>,
}

struct Inner<B, T> {
    pool: HttpPool<B, T>,
    protocol: Protocol,
    shared: Arc<Shared<B>>,
    authority: Option<Authority>,
}

impl<B, T> Clone for HttpClient<B, T> {
    fn clone(&self) -> Self {
        HttpClient {
            inner: self.inner.clone(),
        }
    }
}

impl<B, T> fmt::Debug for HttpClient<B, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpClient")
            .field("protocol", &self.inner.protocol)
            .field("in_flight", &self.in_flight())
            .finish_non_exhaustive()
    }
}

/// Builds an [`HttpClient`]: pool settings, protocol, HTTP/2 settings.
#[derive(Debug, Clone)]
pub struct HttpClientBuilder {
    pool: Builder,
    protocol: Protocol,
    h2: H2Settings,
    authority: Option<String>,
}

impl Default for HttpClientBuilder {
    fn default() -> Self {
        HttpClientBuilder {
            pool: Builder::new(),
            protocol: Protocol::Http1,
            h2: H2Settings::default(),
            authority: None,
        }
    }
}

impl HttpClient {
    /// A builder with the pool's defaults, HTTP/1.
    pub fn builder() -> HttpClientBuilder {
        HttpClientBuilder::default()
    }
}

impl HttpClientBuilder {
    /// The pool's settings (size, timeouts, lifetime, health checks, name): a
    /// [`Pool::builder`].
    pub fn pool(mut self, pool: Builder) -> Self {
        self.pool = pool;
        self
    }

    /// The HTTP version to speak (default [`Protocol::Http1`]).
    pub fn protocol(mut self, protocol: Protocol) -> Self {
        self.protocol = protocol;
        self
    }

    /// HTTP/2 with prior knowledge: [`Protocol::Http2`].
    pub fn http2(self) -> Self {
        self.protocol(Protocol::Http2)
    }

    /// HTTP/2: at most `n` streams per connection, even where the server allows more
    /// (default 1000; at least 1).
    pub fn max_streams(mut self, n: usize) -> Self {
        self.h2.max_streams = n.max(1);
        self
    }

    /// HTTP/2: ping every connection (idle ones too) every `interval`, and close it when
    /// a ping gets no answer within `timeout`; `None` for no pings. Default 5 s and 20 s.
    pub fn keep_alive(mut self, ping: Option<(Duration, Duration)>) -> Self {
        self.h2.keep_alive = ping;
        self
    }

    /// The `Host` (HTTP/1) or `:authority` (HTTP/2) of requests whose URI names none
    /// (default: the target, as it prints: `127.0.0.1:8080`).
    pub fn authority(mut self, authority: impl Into<String>) -> Self {
        self.authority = Some(authority.into());
        self
    }

    /// A client over TCP to `addr` ([`TcpConnector::new`]).
    pub fn build<B>(self, addr: SocketAddr) -> Result<HttpClient<B, SocketAddr>, PoolError>
    where
        B: HttpBody + Unpin + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        self.build_with(TcpConnector::new(), addr)
    }

    /// A client over the streams `connector` opens to `target`: a TLS connector, a
    /// connector of your own. Its streams are tokio I/O that say what they
    /// negotiated ([`Negotiated`]: `TcpStream` and the TLS streams do).
    ///
    /// Fails with [`PoolError::Invalid`] when the pool's settings are invalid.
    pub fn build_with<C, T, B>(self, connector: C, target: T) -> Result<HttpClient<B, T>, PoolError>
    where
        C: Service<T> + Clone + Send + Sync + 'static,
        C::Response: AsyncRead + AsyncWrite + Negotiated + Unpin + Send + 'static,
        C::Error: Into<BoxError>,
        C::Future: Send,
        T: Clone + fmt::Debug + fmt::Display + Send + Sync + 'static,
        B: HttpBody + Unpin + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let manager = HttpManager {
            io: connector,
            protocol: self.protocol,
            h2: self.h2,
            _body: PhantomData,
        };
        let authority = self
            .authority
            .unwrap_or_else(|| target.to_string())
            .parse::<Uri>()
            .ok()
            .and_then(|u| u.into_parts().authority);
        let pool = self.pool.build(Managed::new(manager), target)?;
        let config = pool.config();
        let shared = Shared::new(config.max_size, self.h2.max_streams, config.max_lifetime);
        Ok(HttpClient {
            inner: Arc::new(Inner {
                protocol: self.protocol,
                shared: Arc::new(shared),
                authority,
                pool,
            }),
        })
    }
}

/// What an [`HttpClient`] carries now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct HttpStats {
    /// Requests in flight: from the call until the response body ends or is dropped.
    pub in_flight: usize,
    /// HTTP/2 connections leased for shared use (checked out of the pool).
    pub shared_connections: usize,
    /// Streams those connections carry.
    pub streams: usize,
}

/// One line, e.g. `4 requests in flight, 1 shared connection carrying 3 streams`.
impl fmt::Display for HttpStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let plural = |n: usize| if n == 1 { "" } else { "s" };
        write!(
            f,
            "{} request{} in flight, {} shared connection{} carrying {} stream{}",
            self.in_flight,
            plural(self.in_flight),
            self.shared_connections,
            plural(self.shared_connections),
            self.streams,
            plural(self.streams)
        )
    }
}

impl<B, T> HttpClient<B, T> {
    /// The pool of connections: [`Pool::stats`], [`Pool::close`], [`Pool::ready_min`].
    pub fn pool(&self) -> &HttpPool<B, T> {
        &self.inner.pool
    }

    /// Requests in flight: from the call until the response body ends or is dropped.
    pub fn in_flight(&self) -> usize {
        self.inner.shared.in_flight.load(Relaxed)
    }

    /// What the client carries now (HTTP/2 leases and streams included).
    pub fn stats(&self) -> HttpStats {
        let (shared_connections, streams) = self.inner.shared.leased();
        HttpStats {
            in_flight: self.in_flight(),
            shared_connections,
            streams,
        }
    }
}

impl<B, T> Load for HttpClient<B, T> {
    type Metric = usize;

    fn load(&self) -> usize {
        self.in_flight()
    }
}

impl<B, T> Service<Request<B>> for HttpClient<B, T>
where
    B: HttpBody + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
    T: Clone + fmt::Debug + Send + Sync + 'static,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> ResponseFuture {
        ResponseFuture {
            inner: Box::pin(send(self.inner.clone(), req)),
        }
    }
}

/// The future of an [`HttpClient`] call: the response head; its body streams after.
///
/// # Cancel safety
///
/// Dropping it cancels the request: see the [module docs](self#cancel-safety).
pub struct ResponseFuture {
    inner: Pin<Box<dyn Future<Output = Result<Response<Body>, BoxError>> + Send>>,
}

impl fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl Future for ResponseFuture {
    type Output = Result<Response<Body>, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

/// Counts a request in flight until dropped.
struct InFlight<B>(Arc<Shared<B>>);

impl<B> InFlight<B> {
    fn new(shared: &Arc<Shared<B>>) -> Self {
        shared.in_flight.fetch_add(1, Relaxed);
        InFlight(shared.clone())
    }
}

impl<B> Drop for InFlight<B> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Relaxed);
    }
}

/// A stream of a leased HTTP/2 connection, given back on drop.
struct Stream<B> {
    lease: Arc<Lease<B>>,
    shared: Arc<Shared<B>>,
}

impl<B> Drop for Stream<B> {
    fn drop(&mut self) {
        self.shared.release(&self.lease);
    }
}

/// What a response body holds (for their `Drop`: the connection or stream, and the
/// in-flight count).
#[allow(dead_code)]
enum Hold<B> {
    Own(Pooled<HttpConn<B>>, InFlight<B>),
    Stream(Stream<B>, InFlight<B>),
}

impl<B: Send + 'static> Finish for Hold<B> {
    fn finish(self: Box<Self>, complete: bool) {
        if let Hold::Own(mut conn, _) = *self
            && complete
        {
            // Read to the end: in step, reusable.
            conn.mark_healthy();
        }
    }
}

async fn send<B, T>(inner: Arc<Inner<B, T>>, req: Request<B>) -> Result<Response<Body>, BoxError>
where
    B: HttpBody + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
    T: Clone + fmt::Debug + Send + Sync + 'static,
{
    let flight = InFlight::new(&inner.shared);
    let mut req = req.map(ReqBody::Body);
    let mut tries = 0;
    loop {
        tries += 1;
        let checkout = if inner.protocol == Protocol::Http1 {
            inner.pool.get().await.map(Checkout::Own)
        } else {
            // The pool bounds its own checkouts; the wait for a stream, the same way.
            let acquire = inner.shared.acquire(|| inner.pool.get());
            match inner.pool.config().acquire_timeout {
                Some(limit) => tokio::time::timeout(limit, acquire)
                    .await
                    .unwrap_or(Err(PoolError::Timeout(limit))),
                None => acquire.await,
            }
        };
        let checkout = match checkout {
            Ok(c) => c,
            Err(e) => return Err(not_sent(e, req)),
        };
        // HTTP/2: a request without a body can be sent again if the server refuses its
        // stream unprocessed (`GOAWAY` raced with it): keep its head.
        let mut replay = None;
        let mut error = match checkout {
            Checkout::Own(mut conn) => {
                // Closed, not reused, unless the body is read to its end.
                conn.mark_broken();
                let Kind::H1(sender) = &mut conn.kind else {
                    unreachable!("only HTTP/1 connections are checked out alone")
                };
                if let Err(e) = sender.ready().await {
                    // Closed while idle: nothing was sent.
                    if tries < SEND_TRIES {
                        continue;
                    }
                    return Err(not_sent(e, req));
                }
                origin_form(&mut req, inner.authority.as_ref());
                match sender.try_send_request(req).await {
                    Ok(resp) => {
                        let hold = Box::new(Hold::Own(conn, flight));
                        return Ok(resp.map(|b| Body::new(b, hold)));
                    }
                    Err(e) => e,
                }
            }
            Checkout::Stream(lease) => {
                let mut sender = lease.sender.clone();
                let stream = Stream {
                    lease,
                    shared: inner.shared.clone(),
                };
                absolute_form(&mut req, inner.authority.as_ref());
                if req.body().is_end_stream() {
                    replay = Some(head_of(&req));
                }
                match sender.try_send_request(req).await {
                    Ok(resp) => {
                        let hold = Box::new(Hold::Stream(stream, flight));
                        return Ok(resp.map(|b| Body::new(b, hold)));
                    }
                    Err(e) => e,
                }
            }
        };
        match error.take_message() {
            // Not sent: the connection was closing. Another one.
            Some(back) if tries < SEND_TRIES => req = back,
            Some(back) => return Err(not_sent(error.into_error(), back)),
            None => {
                let e = error.into_error();
                match refusal(&e) {
                    Refusal::None => return Err(e.into()),
                    Refusal::Certain => match replay {
                        Some(head) if tries < SEND_TRIES => req = head,
                        _ => return Err(NotSent::new(e).into()),
                    },
                    // hyper reports a `GOAWAY` the same way for a stream h2 refused to
                    // open and for one it opened just before (which the server may
                    // have processed): sent again only when that would be harmless.
                    Refusal::Likely => match replay {
                        Some(head) if tries < SEND_TRIES && idempotent(&head) => req = head,
                        _ => return Err(e.into()),
                    },
                }
            }
        }
    }
}

/// Whether a request may be sent twice: an idempotent method (RFC 9110 9.2.2), or
/// marked [`Idempotent`](marina_core::Idempotent).
fn idempotent<B>(req: &Request<B>) -> bool {
    use http::Method;
    matches!(
        *req.method(),
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    ) || req.extensions().get::<marina_core::Idempotent>().is_some()
}

/// A request that was not sent, as an error: given back to the caller when it still
/// holds the caller's body.
fn not_sent<B: Send + 'static>(e: impl Into<BoxError>, req: Request<ReqBody<B>>) -> BoxError {
    let (parts, body) = req.into_parts();
    match body {
        ReqBody::Body(b) => NotSent::with_request(e, Request::from_parts(parts, b)).into(),
        ReqBody::Empty => NotSent::new(e).into(),
    }
}

/// A copy of a bodiless request's head.
fn head_of<B>(req: &Request<ReqBody<B>>) -> Request<ReqBody<B>> {
    let mut copy = Request::new(ReqBody::Empty);
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    *copy.extensions_mut() = req.extensions().clone();
    copy
}

/// What an HTTP/2 error says about whether the server processed the request.
enum Refusal {
    /// Nothing: it may have.
    None,
    /// The server reset the stream as refused (`REFUSED_STREAM`): never processed.
    Certain,
    /// A graceful `GOAWAY`: a stream above its last stream id (never processed), or,
    /// rarely, one hyper opened just as the `GOAWAY` arrived (maybe processed).
    Likely,
}

fn refusal(e: &hyper::Error) -> Refusal {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(h2) = err.downcast_ref::<h2::Error>() {
            let reason = h2.reason();
            return if !h2.is_remote() {
                Refusal::None
            } else if h2.is_reset() && reason == Some(h2::Reason::REFUSED_STREAM) {
                Refusal::Certain
            } else if h2.is_go_away() && reason == Some(h2::Reason::NO_ERROR) {
                Refusal::Likely
            } else {
                Refusal::None
            };
        }
        cur = err.source();
    }
    Refusal::None
}

/// HTTP/1: the request line carries the path; the authority goes into `Host`.
fn origin_form<B>(req: &mut Request<B>, default: Option<&Authority>) {
    let authority = req.uri().authority().cloned();
    if !req.headers().contains_key(HOST)
        && let Some(a) = authority.as_ref().or(default)
        && let Ok(v) = HeaderValue::from_str(a.as_str())
    {
        req.headers_mut().insert(HOST, v);
    }
    if authority.is_some() {
        let path = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        *req.uri_mut() = Uri::from(path);
    }
}

/// HTTP/2: `:scheme` and `:authority` come from the URI; fill them in when missing.
fn absolute_form<B>(req: &mut Request<B>, default: Option<&Authority>) {
    if req.uri().authority().is_some() {
        return;
    }
    let authority = req
        .headers()
        .get(HOST)
        .and_then(|h| Authority::try_from(h.as_bytes()).ok())
        .or_else(|| default.cloned());
    let Some(authority) = authority else { return };
    let mut parts = std::mem::take(req.uri_mut()).into_parts();
    parts.scheme.get_or_insert(Scheme::HTTP);
    parts.authority = Some(authority);
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
    }
    if let Ok(uri) = Uri::from_parts(parts) {
        *req.uri_mut() = uri;
    }
}

#[cfg(test)]
mod stats_tests {
    use super::HttpStats;

    #[test]
    fn http_stats_display() {
        let s = HttpStats {
            in_flight: 4,
            shared_connections: 1,
            streams: 3,
        };
        assert_eq!(
            s.to_string(),
            "4 requests in flight, 1 shared connection carrying 3 streams"
        );
    }
}
