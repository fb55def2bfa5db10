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
//! | `metrics` | health status, ejections, readmissions, probe rounds and failures per endpoint through the [`metrics`](https://docs.rs/metrics) facade ([listed below](#metrics)) |
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
//!
//! # Cancel safety
//!
//! Dropping things early leaves no state behind and records nothing false:
//!
//! - **A response future** ([`ResponseFuture`]) dropped before it completes reports
//!   nothing: a cancelled request (a client timeout above, a `select!` that went the
//!   other way) says nothing about the endpoint, so it counts neither as a success nor
//!   as a failure. If it carried the half-open trial, the trial goes back and the next
//!   waiting caller is woken to take it.
//! - **A `poll_ready` left `Pending`** (a `ready()` future dropped while the endpoint
//!   is ejected) leaves at most a stale waker behind, in a bounded list; the endpoint's
//!   state is untouched. A [`Health`] clone dropped after it got readiness for the
//!   half-open trial, without calling, gives the trial back the same way.
//! - **A probe round** runs in a task of its own under the probe `timeout`. A round that
//!   times out is aborted (dropped at its next await point) and counts as a failing
//!   round; one that panics fails its round; neither stops the prober. When the last
//!   clone of the service is dropped, the probe task ends: a round under way finishes
//!   (within its timeout) and no further round starts. A [`HealthHandle`] does not keep
//!   the probe task alive.
//! - **An ejection's timer** holds only a weak reference: it ends with the endpoint.
//!
//! # Metrics
//!
//! With the `metrics` feature, each endpoint's [`Health`] registers its metrics through
//! the [`metrics`](https://docs.rs/metrics) facade once, when it is built
//! ([`HealthBuilder::build`], or [`HealthLayer`] wrapping the endpoint's service), every
//! label combination up front, so each series exists (at 0) from then on. Updates go
//! through the stored handles: nothing is formatted or looked up per request, and
//! without the feature nothing is compiled in.
//!
//! **Install the recorder (a Prometheus exporter, …) before building the layer or the
//! stack:** handles taken before a recorder is installed are no-ops, and stay so.
//!
//! The `endpoint` label is the endpoint's name, set with [`HealthLayer::name`] or
//! [`HealthBuilder::name`] (`"endpoint"` if unset; marina's `Stack` names each endpoint
//! by its address). Give each endpoint its own name: endpoints built with the same name
//! share their series.
//!
//! | name | type | labels | meaning |
//! |---|---|---|---|
//! | `marina_health_status` | gauge | `endpoint` | health now: `0` unknown, `1` healthy, `2` degraded (or half-open after an ejection), `3` ejected (by the passive detectors or by probes) |
//! | `marina_health_ejections_total` | counter | `endpoint`, `cause` = `passive` \| `active` | times the endpoint was taken out: `passive` by real traffic (the detectors, or a failed half-open trial request), `active` by probes (`unhealthy_threshold` failing rounds, or a failed half-open probe round) |
//! | `marina_health_readmissions_total` | counter | `endpoint` | times the endpoint went back to serving after being taken out (a half-open trial passed, or probes passed) |
//! | `marina_health_probes_total` | counter | `endpoint`, `outcome` = `pass` \| `fail` | active probe rounds, by outcome (a timeout or a panic is a `fail`) |
//! | `marina_health_probe_duration_seconds` | histogram | `endpoint` | response time of passing probe rounds, in seconds |
//! | `marina_health_failures_total` | counter | `endpoint` | requests on real traffic that the [`Classify`] counted as failures |
//!
//! A removed endpoint's series keep their last values (the facade cannot unregister).
//!
//! # Tracing
//!
//! Events at state changes, with the field `endpoint` (the name above):
//!
//! | level | message | fields |
//! |---|---|---|
//! | WARN | `endpoint ejected` | `cause` (`passive`, `active`), `reason`, and for a timed ejection `ejection` (its number since the endpoint was last healthy for `reset_after`, which sets its length) and `ejected_for`, or `failed_rounds` and `until = "probes pass"` when probes took it out |
//! | INFO | `endpoint readmitted` | `reason` |
//! | INFO | `health probe failing` | `error`, `unhealthy_threshold`: the first failing round after passing ones |
//! | INFO | `health probe passing again` | `failed_rounds`: the first passing round after failing ones |
//! | DEBUG | `health status changed` | `from`, `to`, `reason`: every status change |
//! | DEBUG | `health probe passed` / `health probe failed` | `response_time` / `error`: every probe round |
//! | WARN | `no tokio runtime: active health checks are off for this endpoint` | at build, without a runtime |
//!
//! Nothing is logged per request.
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod active;
mod classify;
mod config;
mod future;
mod handle;
mod layer;
mod meter;
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
