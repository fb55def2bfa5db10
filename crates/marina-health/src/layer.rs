//! `HealthLayer`: builds `Health<S>` for each endpoint.

use std::fmt;
use std::sync::Arc;

use marina_core::{EjectionGate, Probe};
use tower_layer::Layer;

use crate::classify::ErrorsOnly;
use crate::config::{ActiveConfig, HealthConfig, InvalidHealthConfig};
use crate::service::{Health, ProbeRound, probe_round};

/// A [`Layer`] that wraps a service in [`Health`].
///
/// Passive checks apply to every service it wraps. Active probing needs a target per
/// endpoint: give one with [`probe`](Self::probe) when the layer wraps a single endpoint,
/// or build each endpoint with [`Health::builder`].
///
/// With the `metrics` feature, each service it wraps registers its endpoint's metrics
/// when [`layer`](Layer::layer) wraps it, labelled with the layer's
/// [`name`](Self::name): install the recorder before that (see the
/// [crate docs](crate#metrics)).
///
/// ```
/// use marina_health::{HealthConfig, HealthLayer};
/// use tower::{ServiceBuilder, service_fn};
///
/// let svc = ServiceBuilder::new()
///     .layer(HealthLayer::new(HealthConfig::default()).name("backend-a"))
///     .service(service_fn(|req: u32| async move { Ok::<_, std::io::Error>(req) }));
/// assert!(svc.handle().status().is_ready());
/// ```
pub struct HealthLayer<K = ErrorsOnly> {
    config: HealthConfig,
    name: Arc<str>,
    classify: Arc<K>,
    active: Option<(ActiveConfig, ProbeRound)>,
    gate: Option<EjectionGate>,
}

impl HealthLayer {
    /// Passive checks with `config`; every `Err` counts as a failure.
    ///
    /// # Panics
    ///
    /// If `config` is out of range ([`HealthConfig::validate`]), with the
    /// [`InvalidHealthConfig`] message listing every problem. Use
    /// [`try_new`](Self::try_new) for configurations read at run time.
    #[track_caller]
    pub fn new(config: HealthConfig) -> Self {
        match Self::try_new(config) {
            Ok(v) => v,
            Err(e) => panic!("{e}"),
        }
    }

    /// Passive checks with `config`, or every problem with it.
    ///
    /// ```
    /// use marina_health::{FailureRate, HealthConfig, HealthLayer};
    ///
    /// let config = HealthConfig {
    ///     failure_rate: Some(FailureRate { threshold: 50.0, ..FailureRate::default() }),
    ///     ..HealthConfig::default()
    /// };
    /// let err = HealthLayer::try_new(config).unwrap_err();
    /// assert_eq!(
    ///     err.to_string(),
    ///     "invalid health configuration:\n  failure_rate.threshold: \
    ///      must be within 0.0..1.0 (a share, not a percentage), got 50.0",
    /// );
    /// ```
    pub fn try_new(config: HealthConfig) -> Result<Self, InvalidHealthConfig> {
        config.validate()?;
        Ok(Self::unchecked(config))
    }

    /// A layer with `config` as it is (checked later, by a builder).
    fn unchecked(config: HealthConfig) -> Self {
        HealthLayer {
            config,
            name: "endpoint".into(),
            classify: Arc::new(ErrorsOnly),
            active: None,
            gate: None,
        }
    }
}

impl<K> HealthLayer<K> {
    /// Names the endpoint in events and reports, and gives the `endpoint` label of its
    /// metrics (feature `metrics`); default `"endpoint"`. Use the endpoint's address
    /// (`addr.to_string()`) or another name from a small fixed set: never a value per
    /// request or per user. Endpoints built with one name share their metrics series.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into().into();
        self
    }

    /// Replaces the classifier (which outcomes are failures).
    pub fn classify<K2>(self, classify: K2) -> HealthLayer<K2> {
        HealthLayer {
            config: self.config,
            name: self.name,
            classify: Arc::new(classify),
            active: self.active,
            gate: self.gate,
        }
    }

    /// Joins each wrapped endpoint to a balancer's [`EjectionGate`] (its panic
    /// threshold): the gate counts ejected endpoints, and while the balancer holds it
    /// open, ejected endpoints take traffic again. Use one gate per balancer.
    pub fn ejection_gate(mut self, gate: EjectionGate) -> Self {
        self.gate = Some(gate);
        self
    }

    /// Adds active checks: `probe` against `target` every `active.interval` (hybrid mode:
    /// passive and active at once). Each wrapped service gets its own probe task.
    ///
    /// # Panics
    ///
    /// If `active` is out of range ([`ActiveConfig::validate`]; a zero `interval`, for
    /// one, would probe the backend as fast as it answers), with the
    /// [`InvalidHealthConfig`] message. Use [`try_probe`](Self::try_probe) for settings
    /// read at run time.
    #[track_caller]
    pub fn probe<P, T>(self, active: ActiveConfig, probe: P, target: T) -> Self
    where
        P: Probe<T>,
        T: Clone + Send + Sync + 'static,
    {
        match self.try_probe(active, probe, target) {
            Ok(v) => v,
            Err(e) => panic!("{e}"),
        }
    }

    /// Adds active checks like [`probe`](Self::probe), or returns every problem with
    /// `active` (paths `active.interval`, `active.jitter`, …).
    pub fn try_probe<P, T>(
        self,
        active: ActiveConfig,
        probe: P,
        target: T,
    ) -> Result<Self, InvalidHealthConfig>
    where
        P: Probe<T>,
        T: Clone + Send + Sync + 'static,
    {
        let mut problems = Vec::new();
        active.check("active.", &mut problems);
        InvalidHealthConfig::result(problems)?;
        Ok(self.probe_unchecked(active, probe, target))
    }

    fn probe_unchecked<P, T>(mut self, active: ActiveConfig, probe: P, target: T) -> Self
    where
        P: Probe<T>,
        T: Clone + Send + Sync + 'static,
    {
        self.active = Some((active, probe_round(probe, target)));
        self
    }

    /// Every problem with the layer's settings: the passive ones, then the active ones
    /// under `active.`.
    fn check(&self) -> Result<(), InvalidHealthConfig> {
        let mut problems = Vec::new();
        self.config.check("", &mut problems);
        if let Some((active, _)) = &self.active {
            active.check("active.", &mut problems);
        }
        InvalidHealthConfig::result(problems)
    }
}

impl<S, K> Layer<S> for HealthLayer<K> {
    type Service = Health<S, K>;

    fn layer(&self, inner: S) -> Self::Service {
        Health::with_parts(
            inner,
            self.name.clone(),
            self.config.clone(),
            self.classify.clone(),
            self.active.clone(),
            self.gate.as_ref().map(EjectionGate::join),
        )
    }
}

impl<K> Clone for HealthLayer<K> {
    fn clone(&self) -> Self {
        HealthLayer {
            config: self.config.clone(),
            name: self.name.clone(),
            classify: self.classify.clone(),
            active: self.active.clone(),
            gate: self.gate.clone(),
        }
    }
}

impl<K> fmt::Debug for HealthLayer<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HealthLayer")
            .field("config", &self.config)
            .field("name", &self.name)
            .field("active", &self.active.as_ref().map(|a| a.0))
            .finish()
    }
}

/// Builds one endpoint's [`Health`] service; see [`Health::builder`].
pub struct HealthBuilder<S, K = ErrorsOnly> {
    inner: S,
    layer: HealthLayer<K>,
}

impl<S> Health<S> {
    /// Starts building a `Health` around `inner`, with the default configuration.
    ///
    /// ```
    /// use std::time::Duration;
    /// use marina_health::{ActiveConfig, Health, HealthConfig, TcpConnectProbe};
    /// use tower::service_fn;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let addr: std::net::SocketAddr = "127.0.0.1:7000".parse().unwrap();
    /// let svc = Health::builder(service_fn(|req: u32| async move { Ok::<_, std::io::Error>(req) }))
    ///     .name("a")
    ///     .config(HealthConfig { consecutive_failures: 3, ..HealthConfig::default() })
    ///     .probe(ActiveConfig { interval: Duration::from_secs(5), ..ActiveConfig::default() }, TcpConnectProbe, addr)
    ///     .build();
    /// let status = svc.handle().subscribe(); // follow status changes
    /// # drop(status);
    /// # }
    /// ```
    pub fn builder(inner: S) -> HealthBuilder<S> {
        HealthBuilder {
            inner,
            layer: HealthLayer::unchecked(HealthConfig::default()),
        }
    }
}

impl<S, K> HealthBuilder<S, K> {
    /// Replaces the configuration (checked by [`build`](Self::build) and
    /// [`try_build`](Self::try_build)).
    pub fn config(mut self, config: HealthConfig) -> Self {
        self.layer.config = config;
        self
    }

    /// Names the endpoint in events, reports and the `endpoint` label of its metrics;
    /// see [`HealthLayer::name`].
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.layer = self.layer.name(name);
        self
    }

    /// Replaces the classifier; see [`HealthLayer::classify`].
    pub fn classify<K2>(self, classify: K2) -> HealthBuilder<S, K2> {
        HealthBuilder {
            inner: self.inner,
            layer: self.layer.classify(classify),
        }
    }

    /// Adds active checks; see [`HealthLayer::probe`]. `active` is checked by
    /// [`build`](Self::build) and [`try_build`](Self::try_build).
    pub fn probe<P, T>(mut self, active: ActiveConfig, probe: P, target: T) -> Self
    where
        P: Probe<T>,
        T: Clone + Send + Sync + 'static,
    {
        self.layer = self.layer.probe_unchecked(active, probe, target);
        self
    }

    /// Joins a balancer's [`EjectionGate`]; see [`HealthLayer::ejection_gate`].
    pub fn ejection_gate(mut self, gate: EjectionGate) -> Self {
        self.layer = self.layer.ejection_gate(gate);
        self
    }

    /// Builds the service (starting its probe task, if any, on the current runtime, and
    /// registering its metrics with the recorder installed now, with the `metrics`
    /// feature).
    ///
    /// # Panics
    ///
    /// If the configuration or the active one is out of range
    /// ([`HealthConfig::validate`], [`ActiveConfig::validate`]), with the
    /// [`InvalidHealthConfig`] message listing every problem. Use
    /// [`try_build`](Self::try_build) for settings read at run time.
    #[track_caller]
    pub fn build(self) -> Health<S, K> {
        match self.try_build() {
            Ok(v) => v,
            Err(e) => panic!("{e}"),
        }
    }

    /// Builds the service, or returns every problem with its settings: the
    /// configuration's (`base_ejection`, `failure_rate.threshold`, …), then the active
    /// configuration's (`active.interval`, …). Nothing is started on error.
    ///
    /// ```
    /// use std::time::Duration;
    /// use marina_core::probe_fn;
    /// use marina_health::{ActiveConfig, Health, HealthConfig};
    /// use tower::service_fn;
    ///
    /// let backend = service_fn(|req: u32| async move { Ok::<_, std::io::Error>(req) });
    /// let probe = probe_fn(|_: &mut ()| Box::pin(async { Ok(()) }));
    /// let err = Health::builder(backend)
    ///     .config(HealthConfig { base_ejection: Duration::ZERO, ..HealthConfig::default() })
    ///     .probe(ActiveConfig { interval: Duration::ZERO, ..ActiveConfig::default() }, probe, ())
    ///     .try_build()
    ///     .unwrap_err();
    /// assert!(err.has("base_ejection") && err.has("active.interval"));
    /// ```
    pub fn try_build(self) -> Result<Health<S, K>, InvalidHealthConfig> {
        self.layer.check()?;
        Ok(self.layer.layer(self.inner))
    }
}

impl<S: fmt::Debug, K> fmt::Debug for HealthBuilder<S, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HealthBuilder")
            .field("inner", &self.inner)
            .field("layer", &self.layer)
            .finish()
    }
}
