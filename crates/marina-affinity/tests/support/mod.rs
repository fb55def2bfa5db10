//! Test support shared by this crate's test files: in-memory endpoints that answer with
//! their position, a round-robin `Balance` over them that reads route hints from
//! extensions, and helpers that send one request through a stack.
//!
//! Requests are `marina_core::Request<Option<String>>` whose body is the session key
//! (`None`: a key-less request), read by [`key_of`]; responses are
//! `marina_core::Response<usize>` whose body is the index of the endpoint that served
//! them.

#![allow(dead_code, unreachable_pub)] // each test binary uses a part of it

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::{Ready, ready};
use std::task::{Context, Poll};

use marina_balance::{Balance, BalanceHandle, RoundRobin};
use marina_core::{BoxError, EndpointId, Request, Response};
use tower::discover::ServiceList;
use tower::{Service, ServiceExt};

/// A request: its body is the session key.
pub type Req = Request<Option<String>>;
/// A response: its body is the index of the endpoint that served it.
pub type Resp = Response<usize>;
/// A round-robin balancer over [`Backend`]s, keyed by position.
pub type Lb = Balance<ServiceList<Vec<Backend>>, Req>;

/// The session key of a request: its body.
pub fn key_of(req: &Req) -> Option<String> {
    req.body.clone()
}

/// An in-memory endpoint that answers every request with its index.
#[derive(Debug, Clone, Copy)]
pub struct Backend(pub usize);

impl Service<Req> for Backend {
    type Response = Resp;
    type Error = Infallible;
    type Future = Ready<Result<Resp, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: Req) -> Self::Future {
        ready(Ok(Response::new(self.0)))
    }
}

/// A round-robin balancer over `n` [`Backend`]s that reads route hints from the
/// requests' extensions, and its handle.
pub fn balance(n: usize) -> (Lb, BalanceHandle) {
    let lb = Balance::from_services((0..n).map(Backend), RoundRobin::new())
        .route_hints_from_extensions();
    let handle = lb.handle();
    (lb, handle)
}

/// The endpoint ids of a balancer whose keys are positions (`ServiceList`), by position.
pub fn ids_by_position(handle: &BalanceHandle) -> HashMap<usize, EndpointId> {
    handle
        .stats()
        .into_iter()
        .map(|s| (s.key.parse().expect("a position key"), s.id))
        .collect()
}

/// Sends one request with session key `key` (none: a key-less request).
pub async fn send<S>(svc: &mut S, key: Option<&str>) -> Result<Resp, BoxError>
where
    S: Service<Req, Response = Resp, Error = BoxError>,
{
    svc.ready()
        .await?
        .call(Request::new(key.map(str::to_owned)))
        .await
}

/// Sends one request for session `key`; the index of the endpoint that served it.
pub async fn served_by<S>(svc: &mut S, key: &str) -> usize
where
    S: Service<Req, Response = Resp, Error = BoxError>,
{
    send(svc, Some(key))
        .await
        .expect("the request succeeds")
        .body
}
