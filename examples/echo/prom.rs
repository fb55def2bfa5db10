//! `--metrics ADDR`: marina's metrics in the Prometheus text format at `http://ADDR/metrics`.
//!
//! The recorder (metrics-exporter-prometheus) is installed first, before the stack is
//! built, so that the handles the layers register at construction are live; the page is
//! served by a small HTTP/1 server of our own on the given address (port 0: any free
//! port; the bound address is printed).

use std::convert::Infallible;
use std::net::SocketAddr;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// Installs the Prometheus recorder as the global `metrics` recorder. Call it before the
/// stack is built.
pub(crate) fn install() -> Result<PrometheusHandle, String> {
    PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| format!("cannot install the metrics recorder: {e}"))
}

/// Serves `GET /metrics` on `addr` until the returned task is aborted; returns the bound
/// address with it.
pub(crate) async fn serve(
    addr: SocketAddr,
    handle: PrometheusHandle,
) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let mut connections = tokio::task::JoinSet::new();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let handle = handle.clone();
            connections.spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let handle = handle.clone();
                    async move { Ok::<_, Infallible>(page(&req, &handle)) }
                });
                // A scraper that hangs up mid-answer is its own business.
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
            // Reap the finished ones so the set does not grow.
            while connections.try_join_next().is_some() {}
        }
    });
    Ok((bound, task))
}

fn page(req: &Request<Incoming>, handle: &PrometheusHandle) -> Response<Full<Bytes>> {
    let (status, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => {
            // Histograms are kept in buckets that upkeep drains: run it before each render.
            handle.run_upkeep();
            (StatusCode::OK, handle.render())
        }
        (&Method::GET, _) => (StatusCode::NOT_FOUND, "not found: try /metrics\n".into()),
        _ => (StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into()),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}
