//! Health checking for tower endpoints: passive outlier detection and active probes,
//! as a readiness gate.
//!
//! [`Health<S>`](Health) wraps one endpoint's service (built with [`Health::builder`],
//! or by [`HealthLayer`] for each endpoint a balancer discovers). It counts the
//! endpoint's failures, can probe it in the background, and while the endpoint is
//! ejected its `poll_ready` returns `Pending`, so any balancer above it — marina's or
//! tower's — routes around it.
//!
//! # Add it
//!
//! ```toml
//! [dependencies]
//! marina-health = "0.1"
//! # with the HTTP 5xx classifier and the gRPC health probe:
//! # marina-health = { version = "0.1", features = ["http", "grpc"] }
//! ```
//!
//! # Cargo features
//!
//! Default: none. The other probes ([`TcpConnectProbe`], [`LineProbe`], [`HttpProbe`])
//! need no feature.
//!
//! | feature | enables |
//! |---|---|
//! | `http` | [`Http5xx`], a classifier that counts HTTP 5xx responses as failures |
//! | `grpc` | [`GrpcProbe`], the standard gRPC health check (`grpc.health.v1.Health/Check`) through tonic and tonic-health |
//!
//! # Examples
//!
//! Wrapping one endpoint: three failures in a row eject it, and when the ejection
//! ends it is half-open, ready for one trial request.
//!
//! ```
//! use std::time::Duration;
//! use marina_health::{Health, HealthConfig, Status};
//! use tower::{Service, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! // An endpoint that fails every request.
//! let backend = service_fn(|_: ()| async { Err::<(), _>(std::io::Error::other("down")) });
//! let mut svc = Health::builder(backend)
//!     .config(HealthConfig { consecutive_failures: 3, ..HealthConfig::default() })
//!     .build();
//! let handle = svc.handle();
//!
//! for _ in 0..3 {
//!     let _ = svc.ready().await.unwrap().call(()).await;
//! }
//! assert!(matches!(handle.status(), Status::Ejected { until: Some(_) }));
//!
//! // Ejected: not ready for the 30 s base ejection...
//! assert!(tokio::time::timeout(Duration::from_secs(29), svc.ready()).await.is_err());
//! // ...then half-open: ready for one trial request.
//! svc.ready().await.unwrap();
//! assert_eq!(handle.status(), Status::Degraded);
//! # }
//! ```
//!
//! With an active probe, a backend that answers again comes back after
//! `healthy_threshold` passing probe rounds, long before its ejection time is up:
//!
//! ```
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicBool, Ordering};
//! use std::time::Duration;
//! use marina_core::probe_fn;
//! use marina_health::{ActiveConfig, Health, HealthConfig, Status};
//! use tower::{Service, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let down = Arc::new(AtomicBool::new(true));
//! let backend = {
//!     let down = down.clone();
//!     service_fn(move |_: ()| {
//!         let down = down.load(Ordering::SeqCst);
//!         async move { if down { Err(std::io::Error::other("down")) } else { Ok(()) } }
//!     })
//! };
//! // The probe answers while the backend does (here: once it is up again).
//! let probe = {
//!     let down = down.clone();
//!     probe_fn(move |_: &mut ()| {
//!         let down = down.load(Ordering::SeqCst);
//!         Box::pin(async move { if down { Err("down".into()) } else { Ok(()) } })
//!     })
//! };
//! let active = ActiveConfig { interval: Duration::from_millis(200), ..ActiveConfig::default() };
//! let mut svc = Health::builder(backend)
//!     .config(HealthConfig { consecutive_failures: 3, ..HealthConfig::default() })
//!     .probe(active, probe, ())
//!     .build();
//! let handle = svc.handle();
//!
//! for _ in 0..3 {
//!     let _ = svc.ready().await.unwrap().call(()).await;
//! }
//! assert!(matches!(handle.status(), Status::Ejected { until: Some(_) }));
//!
//! // The backend is back: two passing probe rounds (rise) end the 30 s ejection.
//! down.store(false, Ordering::SeqCst);
//! tokio::time::timeout(Duration::from_secs(1), svc.ready()).await.unwrap().unwrap();
//! assert!(matches!(handle.status(), Status::Healthy | Status::Degraded));
//! # }
//! ```
//!
//! # How it works
//!
//! - **Passive**: every completed request is classified ([`Classify`]; by default every
//!   `Err` is a failure). Two detectors eject the endpoint: `consecutive_failures` in a
//!   row (default 5), and a failure rate over a sliding window once it holds enough
//!   requests ([`FailureRate`]).
//! - **Ejection is a closed readiness gate**: `poll_ready` returns `Pending` and wakes the
//!   task when the ejection ends — never `Err`, which would make tower's balancers drop
//!   the endpoint for good. The n-th ejection lasts `n × base_ejection` (30 s), capped
//!   at `max_ejection` (300 s); the count resets after `reset_after` healthy. When an
//!   ejection ends the endpoint is half-open: exactly one trial request (or probe round)
//!   decides between healthy and ejected again.
//! - **Active**: with a [`Probe`](marina_core::Probe) — [`TcpConnectProbe`],
//!   [`LineProbe`], [`HttpProbe`], `GrpcProbe` (feature `grpc`), or any closure through [`probe_fn`](marina_core::probe_fn)
//!   — one task per endpoint probes every `interval` (with jitter) under a `timeout`;
//!   `unhealthy_threshold` failing rounds in a row take the endpoint out,
//!   `healthy_threshold` passing ones bring it back ([`ActiveConfig`]). Passive and
//!   active run together (hybrid), and the probe has the last word: `healthy_threshold`
//!   passing rounds, all begun after a passive ejection, end it early and the endpoint
//!   serves again at once (no half-open trial; every waiting caller is woken). Turn
//!   that off with [`HealthConfig::uneject_on_probe_success`], for a probe that can pass
//!   while requests fail. A probe that panics or hangs only fails its round.
//! - **Visible**: [`HealthHandle`] gives the [`Status`] (`Unknown`, `Healthy`, `Degraded`,
//!   `Ejected { until }`), a [`HealthReport`] (health % over the last probe rounds, the
//!   last round's checks: socket, response time, error rate, age), and a
//!   `tokio::sync::watch` subscription to status changes. Every change is a `tracing`
//!   event.
//!
//! **Settings are checked.** Every field of [`HealthConfig`], [`FailureRate`] and
//! [`ActiveConfig`] documents its unit and valid range, and the constructors refuse a
//! configuration out of range instead of running with it: a failure-rate threshold of
//! `50.0` (meant 50%: the detector could never fire), a zero probe `interval` (a probe
//! connection as fast as the backend answers, hundreds a second from every client),
//! a `base_ejection` above `max_ejection`, a zero threshold. The `try_` constructors
//! ([`HealthLayer::try_new`], [`HealthLayer::try_probe`], [`HealthBuilder::try_build`],
//! [`Health::try_new`]) return an [`InvalidHealthConfig`] that lists every problem
//! with its path (`failure_rate.threshold: must be within 0.0..1.0 (a share, not a
//! percentage), got 50.0`); the plain ones panic with that message.
//! [`HealthConfig::validate`] and [`ActiveConfig::validate`] check without building.
//!
//! It works under any tower balancer, tower's own `p2c::Balance` included. Put load
//! tracking (`tower::load::PendingRequests`, …) outside `Health`, and a request timeout
//! inside it: a call cancelled from outside says nothing about the endpoint, so a
//! backend that accepts and never answers is only caught if the timeout's error reaches
//! the classifier (or by an active probe).
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod active;
mod classify;
mod config;
mod future;
mod handle;
mod layer;
mod probe;
mod report;
mod service;
mod shared;

#[cfg(feature = "http")]
pub use classify::Http5xx;
pub use classify::{Classify, ClassifyFn, ErrorsOnly, classify_fn};
pub use config::{
    ActiveConfig, FailureRate, HealthConfig, HealthConfigProblem, InvalidHealthConfig,
    MAX_EJECTION_LIMIT, MAX_PROBE_JITTER, MIN_FAILURE_WINDOW, MIN_PROBE_INTERVAL,
};
pub use future::ResponseFuture;
pub use handle::HealthHandle;
pub use layer::{HealthBuilder, HealthLayer};
#[cfg(feature = "grpc")]
pub use probe::GrpcProbe;
pub use probe::{HttpProbe, LineProbe, TcpConnectProbe};
pub use report::{CheckResult, CheckRound, HealthReport, Status};
pub use service::Health;
