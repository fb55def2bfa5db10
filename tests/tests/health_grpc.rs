//! `GrpcProbe` against a real `grpc.health.v1` server (tonic-health over hyper's
//! HTTP/2 server) on loopback.

use std::net::SocketAddr;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use marina_core::Probe;
use marina_health::GrpcProbe;
use tokio::net::TcpListener;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

/// Serves the standard health service; returns its address and the reporter that sets
/// each service's status.
async fn health_server() -> (SocketAddr, HealthReporter) {
    let (reporter, service) = tonic_health::server::health_reporter();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let svc = TowerToHyperService::new(service.clone());
            tokio::spawn(async move {
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, reporter)
}

#[tokio::test]
async fn grpc_probe_follows_the_serving_status() {
    let (mut addr, reporter) = health_server().await;
    reporter
        .set_service_status("svc.A", ServingStatus::Serving)
        .await;
    reporter
        .set_service_status("svc.B", ServingStatus::NotServing)
        .await;
    let limit = Duration::from_secs(10);

    let a = GrpcProbe::new("svc.A");
    let rt = tokio::time::timeout(limit, a.probe(&mut addr))
        .await
        .unwrap();
    assert!(rt.is_ok(), "{rt:?}");

    let b = GrpcProbe::new("svc.B");
    let err = tokio::time::timeout(limit, b.probe(&mut addr))
        .await
        .unwrap()
        .unwrap_err();
    assert!(err.to_string().contains("NOT_SERVING"), "{err}");

    // An unknown service is a gRPC NotFound error, not a pass.
    let unknown = GrpcProbe::new("svc.Missing");
    assert!(
        tokio::time::timeout(limit, unknown.probe(&mut addr))
            .await
            .unwrap()
            .is_err()
    );

    // Status changes are seen on the next round.
    reporter
        .set_service_status("svc.A", ServingStatus::NotServing)
        .await;
    assert!(
        tokio::time::timeout(limit, a.probe(&mut addr))
            .await
            .unwrap()
            .is_err()
    );
}

#[tokio::test]
async fn grpc_probe_fails_when_nothing_listens() {
    let (_hold, mut addr) = integration_tests::refused_addr();
    let err = tokio::time::timeout(Duration::from_secs(10), GrpcProbe::new("").probe(&mut addr))
        .await
        .unwrap()
        .unwrap_err();
    assert!(!err.to_string().is_empty());
}
