//! Putting the stack together: one backend's endpoint, the balancer, the layers above.

use super::*;

use tower::util::Either;

use super::transport::TransportConnector;

/// A builder whose requests are converted before they reach a client.
pub(super) struct MappedBuilder<T, T2> {
    pub(super) inner: StackBuilder<T>,
    pub(super) f: Arc<dyn Fn(T) -> T2 + Send + Sync>,
    /// Refuses bad requests at the top of the stack.
    pub(super) validate: Option<ValidateFn<T>>,
}

pub(super) type ValidateFn<T> = Arc<dyn Fn(&T) -> Result<(), BoxError> + Send + Sync>;

impl<T, T2> MappedBuilder<T, T2>
where
    T: Clone + Send + Sync + 'static,
    T2: Send + 'static,
{
    pub(super) fn build<U, C>(
        self,
        protocol: impl Fn(Conn) -> BoxFuture<'static, io::Result<C>> + Send + Sync + 'static,
        check: Option<CheckFn<C>>,
    ) -> Result<(StackService<T, U>, StackHandle), BoxError>
    where
        C: Service<T2, Response = U> + Send + 'static,
        C::Error: Into<BoxError>,
        C::Future: Send + 'static,
        U: Send + 'static,
    {
        let b = self.inner;
        let body = self.f;
        let problems = b.validate();
        if !problems.is_empty() {
            return Err(crate::InvalidConfig(problems).into());
        }
        let proto: ProtoFn<C> = Arc::new(protocol);
        let mut tcp = BandwidthLimit::new(
            TransportConnector::new(
                TcpConnector::new().connect_timeout(Some(b.connect_timeout)),
                #[cfg(feature = "tls")]
                b.tls.clone(),
            )
            .custom(b.connector.clone(), b.connect_timeout),
        );
        if let Some((rate, burst)) = b.bandwidth {
            tcp = tcp.shared_write(rate, burst);
        }
        let bandwidth = tcp.write_bucket().cloned();
        let connector = ProtocolConnector {
            tcp,
            proto,
            body: body.clone(),
        };
        let gate = EjectionGate::new();
        let state = Arc::new(ShutdownState::default());
        let state_for_add = state.clone();
        let (changes, discover) = marina_balance::ChangeStream::channel();
        let changes_for_remove = changes.clone();
        // Makes one backend's endpoint (pool, health) and registers it with the
        // balancer; kept in the handle to add backends at run time.
        let registry = Arc::new(Registry::default());
        // The runtime the stack was built on: backends added or removed from any thread
        // (inside a runtime or not) get their tasks there.
        let rt = tokio::runtime::Handle::try_current().map_err(
            |_| "building a stack needs a tokio runtime (its pools and health checks run tasks)",
        )?;
        // With a fleet (Redis): its layers, made before any backend (fleet.rs).
        #[cfg(feature = "redis")]
        let fleet = b.fleet_layers()?;
        let add: AddFn = {
            let rt = rt.clone();
            // One connect timeout: the builder's (the pool's own would cap it).
            // Warm connections within the stack's budget across its backends.
            let per_backend = b.warm_budget / b.endpoints.len().max(1);
            let pool_config = Config {
                connect_timeout: Some(b.connect_timeout),
                min_idle: b.pool.min_idle.min(per_backend),
                ..b.pool.clone()
            };
            let state = state_for_add.clone();
            let health_config = b.health.clone();
            let probe = b.probe.clone();
            let request_timeout = b.request_timeout;
            let endpoint_layers = b.endpoint_layers.clone();
            let registry = registry.clone();
            let gate = gate.clone();
            Arc::new(move |addr: SocketAddr| -> Result<(), BoxError> {
                let _runtime = rt.enter();
                if state.closed.load(Acquire) {
                    return Err(ShuttingDown.into());
                }
                if registry.lock().iter().any(|p| p.addr == addr && p.active) {
                    return Err(format!("backend {addr} is in the stack already").into());
                }
                let mut builder = Pool::builder().config(pool_config.clone());
                if let Some(check) = &check {
                    let check = check.clone();
                    builder =
                        builder.check(move |c: &mut BodyClient<C, T, T2>| check(&mut c.client));
                }
                let pool = builder.build(connector.clone(), addr)?;
                let endpoint = RequestTimeoutService::new(
                    PoolService::new(pool.clone()).map_response(Response::new),
                    request_timeout,
                )
                .endpoint(addr.to_string());
                // Concrete types all the way down (no boxed future per request below
                // the balancer), except under the user's own endpoint layers. The default
                // (health checks, no endpoint layers) is the first `Either` arm: one
                // match per call and poll on the request path.
                let mut health = None;
                let health_layer = health_config.as_ref().map(|cfg| {
                    let mut layer = HealthLayer::new(cfg.clone())
                        .name(addr.to_string())
                        .ejection_gate(gate.clone());
                    if let Some(probe) = &probe {
                        layer = probe(layer, addr);
                    }
                    layer
                });
                let endpoint = match (health_layer, endpoint_layers.is_empty()) {
                    (Some(layer), true) => {
                        let h = layer.layer(endpoint);
                        health = Some(h.handle());
                        Either::Left(h)
                    }
                    (None, true) => Either::Right(Either::Left(endpoint)),
                    (Some(layer), false) => {
                        let h = layer.layer(with_endpoint_layers(endpoint, &endpoint_layers));
                        health = Some(h.handle());
                        Either::Right(Either::Right(Either::Left(h)))
                    }
                    (None, false) => Either::Right(Either::Right(Either::Right(
                        with_endpoint_layers(endpoint, &endpoint_layers),
                    ))),
                };
                changes
                    .send(Change::Insert(addr, endpoint))
                    .map_err(|_| "the stack's balancer is gone")?;
                let stats_pool = pool.clone();
                registry.lock().push(PoolEntry {
                    addr,
                    active: true,
                    stats: Box::new(move || stats_pool.stats()),
                    close: Box::new(move || {
                        let p = pool.clone();
                        Box::pin(async move { p.close().await })
                    }),
                    health,
                });
                Ok(())
            })
        };
        let remove: RemoveFn = {
            let changes = changes_for_remove;
            let registry = registry.clone();
            Arc::new(move |addr: SocketAddr| {
                let close = {
                    let mut entries = registry.lock();
                    let Some(entry) = entries.iter_mut().find(|p| p.addr == addr && p.active)
                    else {
                        return false;
                    };
                    entry.active = false;
                    (entry.close)()
                };
                let _ = changes.send(Change::Remove(addr));
                // The pool drains (requests in flight finish), closes, and leaves the
                // registry.
                let registry = registry.clone();
                rt.spawn(async move {
                    close.await;
                    registry.lock().retain(|p| p.active || p.addr != addr);
                });
                true
            })
        };
        for &addr in &b.endpoints {
            add(addr)?;
        }
        // Hash affinity routes by the key's hash, which only a consistent-hash picker
        // reads: it is the default then.
        let picker: Box<dyn Pick> = match (&b.picker, &b.affinity) {
            (Some(make), _) => make(),
            (None, Some(AffinityMode::Hash(_))) => Box::new(ConsistentHash::new()),
            (None, _) => Box::new(RoundRobin::new()),
        };
        let mut balance = Balance::new(discover, BoxedPick(picker))
            .failfast_timeout(b.failfast)
            .ejection_gate(gate)
            .panic_threshold(b.panic_threshold)
            .route_hints_from_extensions();
        if let Some(window) = b.slow_start {
            balance = balance.slow_start(window);
        }
        // Failover, the deadline across attempts and hedging share one policy; with
        // failover off, a deadline alone is one attempt with a time limit.
        let policy = match (b.failover, b.deadline) {
            (Some(f), _) => Some(f),
            (None, Some(_)) => Some(Failover::new().max_attempts(1)),
            (None, None) => None,
        };
        if let Some(mut f) = policy {
            if let Some(d) = b.deadline {
                f = f.deadline(d);
            }
            if let Some(h) = b.hedge {
                f = f.hedge(h);
            }
            // The pools give requests they could not send back: only requests marked
            // idempotent are copied (to be sent again after they may have been sent),
            // unless the policy retries any request after sending (`retry_if`).
            balance = if f.retries_sent_requests() {
                balance.failover(f)
            } else {
                balance.failover_copy_idempotent(f)
            }
            .idempotent_from_extensions();
        }
        let balance_handle = balance.handle();
        let shared = Shared::new(balance);
        // With a fleet, its layers stand above the balancer in place of the local ones.
        #[cfg(feature = "redis")]
        if let Some(fleet) = fleet {
            let (svc, redis) = fleet.layer(shared, state.clone(), self.validate.clone());
            let handle = StackHandle {
                inner: Arc::new(HandleInner {
                    registry,
                    add,
                    remove,
                    balance: balance_handle,
                    affinity: redis.affinity.clone(),
                    rate: None,
                    rate_per_key: None,
                    concurrency: Vec::new(),
                    bandwidth,
                    state,
                    redis: Some(redis),
                }),
            };
            return Ok((svc, handle));
        }
        // The layers above the balancer, each there or not: composed statically (one
        // boxed future for the whole stack, at its edge), not boxed per layer.
        let mut affinity = None;
        let affinity_layer = match &b.affinity {
            Some(AffinityMode::Sticky(key, table)) => {
                Some(AffinityLayer::sticky(key.extractor(), *table))
            }
            Some(AffinityMode::Hash(key)) => Some(AffinityLayer::hash(key.extractor())),
            None => None,
        };
        if let Some(layer) = &affinity_layer {
            affinity = Some(layer.handle());
        }
        let keyed = b
            .rate_per_key
            .as_ref()
            .map(|(key, r)| RateLimitLayer::keyed(key.extractor(), *r).without_key(b.without_key));
        let rate_per_key = keyed.as_ref().map(RateLimitLayer::handle);
        let global = b.rate.map(RateLimitLayer::global);
        let rate = global.as_ref().map(RateLimitLayer::handle);
        let mut concurrency = Vec::new();
        let svc: StackService<T, U> = if affinity_layer.is_none()
            && b.concurrency.is_empty()
            && keyed.is_none()
            && global.is_none()
        {
            // No layer above the balancer (the default stack): the guard right over it,
            // without the four `Either`s that would each pass every call and poll on.
            BoxCloneSyncService::new(Guarded {
                inner: shared,
                state: state.clone(),
                validate: self.validate.clone(),
            })
        } else {
            let svc = either_layer(affinity_layer, shared);
            // Per-key concurrency limits: any number of them (boxed when there are some).
            let svc = if b.concurrency.is_empty() {
                Either::Right(svc)
            } else {
                let mut boxed: StackService<T, U> = BoxCloneSyncService::new(svc);
                for (key, limit) in &b.concurrency {
                    let layer = ConcurrencyPerKeyLayer::new(key.extractor(), *limit)
                        .without_key(b.without_key);
                    concurrency.push(layer.handle());
                    boxed = BoxCloneSyncService::new(layer.layer(boxed));
                }
                Either::Left(boxed)
            };
            let svc = either_layer(keyed, svc);
            let svc = either_layer(global, svc);
            BoxCloneSyncService::new(Guarded {
                inner: svc,
                state: state.clone(),
                validate: self.validate.clone(),
            })
        };
        let handle = StackHandle {
            inner: Arc::new(HandleInner {
                registry,
                add,
                remove,
                balance: balance_handle,
                affinity,
                rate,
                rate_per_key,
                concurrency,
                bandwidth,
                state,
                #[cfg(feature = "redis")]
                redis: None,
            }),
        };
        Ok((svc, handle))
    }
}

/// `svc` under `layer`, if there is one.
fn either_layer<L: Layer<S>, S>(layer: Option<L>, svc: S) -> Either<L::Service, S> {
    match layer {
        Some(l) => Either::Left(l.layer(svc)),
        None => Either::Right(svc),
    }
}

/// `endpoint` under the user's endpoint layers: replies type-erased on the way through
/// them, restored above.
pub(super) fn with_endpoint_layers<T, U, S>(
    endpoint: S,
    layers: &[EndpointLayerFn<T>],
) -> StackService<T, U>
where
    T: Send + 'static,
    U: Send + 'static,
    S: Service<Request<T>, Response = Response<U>, Error = BoxError>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    let erased: EndpointService<T> =
        BoxCloneSyncService::new(endpoint.map_response(|r: Response<U>| Response {
            body: Reply(Box::new(r.body)),
            extensions: r.extensions,
        }));
    let layered = layers.iter().fold(erased, |svc, layer| layer(svc));
    BoxCloneSyncService::new(layered.and_then(|r: Response<Reply>| async move {
        match r.body.0.downcast::<U>() {
            Ok(body) => Ok(Response {
                body: *body,
                extensions: r.extensions,
            }),
            Err(_) => Err(BoxError::from(
                "an endpoint layer replaced the reply with a value of another type",
            )),
        }
    }))
}

/// Boxes a picker made at run time.
pub(super) struct BoxedPick(pub(super) Box<dyn Pick>);

impl Pick for BoxedPick {
    fn pick(
        &mut self,
        endpoints: &dyn marina_balance::Endpoints,
        hint: Option<&marina_core::RouteHint>,
    ) -> usize {
        self.0.pick(endpoints, hint)
    }

    // Forwarded, so pickers follow the ready set change by change (no rebuild on the
    // pick path) and bounded load reads the running total.
    fn update(
        &mut self,
        endpoints: &dyn marina_balance::Endpoints,
        change: marina_balance::SetChange,
    ) {
        self.0.update(endpoints, change)
    }

    fn reads_total_load(&self) -> bool {
        self.0.reads_total_load()
    }
}

/// TCP or TLS (through the bandwidth limiter), then the protocol.
pub(super) struct ProtocolConnector<C, T, T2> {
    pub(super) tcp: BandwidthLimit<TransportConnector>,
    pub(super) proto: ProtoFn<C>,
    pub(super) body: Arc<dyn Fn(T) -> T2 + Send + Sync>,
}

impl<C, T, T2> Clone for ProtocolConnector<C, T, T2> {
    fn clone(&self) -> Self {
        ProtocolConnector {
            tcp: self.tcp.clone(),
            proto: self.proto.clone(),
            body: self.body.clone(),
        }
    }
}

/// A pooled protocol client that takes the stack's requests (`Request<T>`), converting
/// the body for the protocol (`T2`) only when it sends: a request the pool could not
/// send comes back whole (its route hint and markers with it) for failover.
pub(super) struct BodyClient<C, T, T2> {
    pub(super) client: C,
    body: Arc<dyn Fn(T) -> T2 + Send + Sync>,
}

impl<C, T, T2> Service<Request<T>> for BodyClient<C, T, T2>
where
    C: Service<T2>,
{
    type Response = C::Response;
    type Error = C::Error;
    type Future = C::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.client.poll_ready(cx)
    }

    fn call(&mut self, req: Request<T>) -> Self::Future {
        self.client.call((self.body)(req.into_body()))
    }
}

impl<C, T, T2> Service<SocketAddr> for ProtocolConnector<C, T, T2>
where
    C: Send + 'static,
    T: 'static,
    T2: 'static,
{
    type Response = BodyClient<C, T, T2>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<BodyClient<C, T, T2>, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Service::<SocketAddr>::poll_ready(&mut self.tcp, cx).map_err(Into::into)
    }

    fn call(&mut self, addr: SocketAddr) -> Self::Future {
        let connect = self.tcp.call(addr);
        let proto = self.proto.clone();
        let body = self.body.clone();
        Box::pin(async move {
            let conn = connect.await?;
            Ok(BodyClient {
                client: proto(conn).await?,
                body,
            })
        })
    }
}
