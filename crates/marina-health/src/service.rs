//! `Health<S>`: the readiness gate around one endpoint's service.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use marina_core::{BoxError, BoxFuture, GateMember, Probe};
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};
use tower_service::Service;

use crate::classify::{Classify, ErrorsOnly};
use crate::config::{ActiveConfig, HealthConfig, InvalidHealthConfig};
use crate::future::ResponseFuture;
use crate::handle::HealthHandle;
use crate::shared::{Gate, Shared};

/// One probe round, ready to run: made from a [`Probe`] and its target.
pub(crate) type ProbeRound =
    Arc<dyn Fn() -> BoxFuture<'static, Result<Duration, BoxError>> + Send + Sync>;

/// Makes a [`ProbeRound`] from a probe and its target (cloned for each round).
pub(crate) fn probe_round<P, T>(probe: P, target: T) -> ProbeRound
where
    P: Probe<T>,
    T: Clone + Send + Sync + 'static,
{
    let probe = Arc::new(probe);
    Arc::new(move || {
        let (probe, mut target) = (probe.clone(), target.clone());
        Box::pin(async move { probe.probe(&mut target).await })
    })
}

/// Alive while any clone of the service is: the probe task ends when it goes.
pub(crate) struct Clones {
    pub(crate) gone: Arc<Notify>,
}

impl Drop for Clones {
    fn drop(&mut self) {
        self.gone.notify_one();
    }
}

/// Wraps one endpoint's service: counts its failures (passive), optionally probes it
/// (active), and closes its readiness while it is ejected.
///
/// While ejected, `poll_ready` returns `Pending` and wakes the task when the ejection
/// ends — never `Err`, because tower's balancers drop endpoints that error. After a
/// timed ejection the endpoint is half-open: one caller gets readiness for one trial
/// request, whose outcome brings the endpoint back or ejects it again for longer.
/// With an active probe, `healthy_threshold` passing rounds end a passive ejection
/// before its time: the endpoint serves again straight away and every waiting task is
/// woken (see [`HealthConfig::uneject_on_probe_success`]).
///
/// Errors of the inner service pass through unchanged. Without a tokio runtime at
/// construction, active checks are off (a warning is logged) and a passive ejection
/// ends when the service is next polled.
///
/// # Sharing
///
/// `Clone` when the inner service is. Clones share the endpoint's health: one set of
/// failure counts, one ejection, one half-open trial, one active probe task (it stops
/// when the last clone is dropped) and one [`HealthHandle`]; each clone calls its own
/// clone of the inner service. Clone it into each task that sends; when the inner
/// service is not `Clone`, put the `Health` behind tower's `Buffer`. Usually a
/// balancer owns the endpoint, and it is the balancer that is shared. A clone that got
/// readiness while the endpoint is half-open holds the one trial until it calls (and
/// the call completes) or is dropped: do not keep a ready clone idle.
///
/// See the [crate docs](crate) for an example.
pub struct Health<S, K = ErrorsOnly> {
    inner: S,
    shared: Arc<Shared>,
    classify: Arc<K>,
    clones: Arc<Clones>,
    sleep: Option<Pin<Box<Sleep>>>,
    sleeping_until: Option<Instant>,
    /// This clone's claim on the half-open trial (the period's number).
    trial: Option<u64>,
}

impl<S> Health<S> {
    /// Wraps `inner` with passive checks only, classifying every `Err` as a failure.
    ///
    /// # Panics
    ///
    /// If `config` is out of range ([`HealthConfig::validate`]), with the
    /// [`InvalidHealthConfig`] message listing every problem; see
    /// [`try_new`](Self::try_new).
    #[track_caller]
    pub fn new(inner: S, config: HealthConfig) -> Self {
        match Self::try_new(inner, config) {
            Ok(v) => v,
            Err(e) => panic!("{e}"),
        }
    }

    /// Wraps `inner` like [`new`](Self::new), or returns every problem with `config`.
    pub fn try_new(inner: S, config: HealthConfig) -> Result<Self, InvalidHealthConfig> {
        config.validate()?;
        Ok(Health::with_parts(
            inner,
            "endpoint".into(),
            config,
            Arc::new(ErrorsOnly),
            None,
            None,
        ))
    }
}

impl<S, K> Health<S, K> {
    pub(crate) fn with_parts(
        inner: S,
        key: Arc<str>,
        config: HealthConfig,
        classify: Arc<K>,
        active: Option<(ActiveConfig, ProbeRound)>,
        member: Option<GateMember>,
    ) -> Self {
        let shared = Shared::new(key, config);
        shared.set_member(member);
        let clones = Arc::new(Clones {
            gone: Arc::new(Notify::new()),
        });
        if let Some((cfg, round)) = active {
            crate::active::start(
                shared.clone(),
                Arc::downgrade(&clones),
                clones.gone.clone(),
                cfg,
                round,
            );
        }
        Health {
            inner,
            shared,
            classify,
            clones,
            sleep: None,
            sleeping_until: None,
            trial: None,
        }
    }

    /// The handle to this endpoint's health: status, report, status changes.
    pub fn handle(&self) -> HealthHandle {
        HealthHandle::new(self.shared.clone())
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }
}

impl<S: Clone, K> Clone for Health<S, K> {
    fn clone(&self) -> Self {
        Health {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
            classify: self.classify.clone(),
            clones: self.clones.clone(),
            sleep: None,
            sleeping_until: None,
            trial: None,
        }
    }
}

impl<S, K> Drop for Health<S, K> {
    fn drop(&mut self) {
        if let Some(claim) = self.trial {
            self.shared.release_trial(claim);
        }
    }
}

impl<S: fmt::Debug, K> fmt::Debug for Health<S, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Health")
            .field("inner", &self.inner)
            .field("endpoint", &self.shared.key)
            .field("status", &self.shared.status())
            .finish()
    }
}

impl<S, K, Req> Service<Req> for Health<S, K>
where
    S: Service<Req>,
    K: Classify<S::Response, S::Error>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, K>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        loop {
            match self.shared.gate(cx.waker(), &mut self.trial) {
                Gate::Open => break,
                Gate::Wait => return Poll::Pending,
                Gate::Until(until) => {
                    if self.sleeping_until != Some(until) {
                        match self.sleep.as_mut() {
                            Some(s) => s.as_mut().reset(until),
                            None => self.sleep = Some(Box::pin(tokio::time::sleep_until(until))),
                        }
                        self.sleeping_until = Some(until);
                    }
                    let sleep = self.sleep.as_mut().expect("set above");
                    if sleep.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    // The ejection is over: look again (half-open now).
                    self.sleeping_until = None;
                }
            }
        }
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let trial = std::mem::take(&mut self.trial);
        ResponseFuture::new(
            self.inner.call(req),
            self.shared.clone(),
            self.classify.clone(),
            trial,
        )
    }
}
