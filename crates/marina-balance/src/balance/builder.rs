//! Building a `Balance`: its constructor and options.

use super::*;

impl<D: Discover, Req> Balance<D, Req> {
    /// A balancer over `discover`'s endpoints, choosing with `picker`; fail-fast after
    /// 10 s with nothing ready.
    pub fn new(discover: D, picker: impl Pick) -> Self {
        Balance {
            discover,
            slots: Vec::new(),
            free: Vec::new(),
            by_id: IdIndex::default(),
            id_clashes: 0,
            ready: Vec::new(),
            pending: Vec::new(),
            candidate: None,
            just_called: None,
            sweep: 0,
            generation: 0,
            common: Common::new(picker.reads_total_load()),
            picker: Box::new(picker),
            failfast: Duration::from_secs(10),
            failfast_sleep: None,
            failing: false,
            discover_done: false,
            handle: BalanceHandle::default(),
            hint: None,
            weigh: None,
            weigh_service: None,
            failover: None,
            idempotent: None,
            slow_start: None,
            slow: Vec::new(),
            started: false,
            gate: None,
            panic_threshold: 0.5,
            panicking: false,
            gate_changes: 0,
            wakes: Arc::default(),
            task: None,
            to_poll: Vec::new(),
            #[cfg(feature = "metrics")]
            gauges: crate::metrics::SetGauges::new(),
            _req: PhantomData,
        }
    }

    /// Links the balancer to its endpoints' health checks through `gate` (give the same
    /// gate to each endpoint's `marina_health::HealthLayer::ejection_gate`), enabling
    /// the [panic threshold](Self::panic_threshold): a change of the gate wakes the
    /// balancer, which compares the healthy share to the threshold (O(1)). An endpoint
    /// ejected while in the ready set — by an active probe, not a request this balancer
    /// sent — gets no request, gate or not: every endpoint is polled before it is sent
    /// a request, and the ejected one leaves the ready set then (or sooner, when polled
    /// in turn after a request). The balancer does not poll its other endpoints on an
    /// ejection, so one costs the same with 8 endpoints or 4,096.
    pub fn ejection_gate(mut self, gate: EjectionGate) -> Self {
        self.gate = Some(gate);
        self
    }

    /// The panic threshold (default 0.5): when the share of endpoints not ejected by
    /// their health checks falls below it, the balancer opens its
    /// [`EjectionGate`](Self::ejection_gate) and routes over every endpoint, ejected or
    /// not, until the share recovers (Envoy's panic mode). 0 turns it off. Without a
    /// gate, nothing reports ejections and the threshold has no effect.
    ///
    /// # Panics
    ///
    /// If `healthy_share` is not within `0.0..=1.0` (a share, not a percentage: 0.5
    /// for 50%) or is NaN. `marina::Stack`'s builder reports the same mistake as an
    /// error at build, under the path `health.panic_threshold`.
    pub fn panic_threshold(mut self, healthy_share: f64) -> Self {
        assert!(
            (0.0..=1.0).contains(&healthy_share),
            "panic_threshold: must be within 0.0..=1.0 (a share, not a percentage), got {healthy_share}"
        );
        self.panic_threshold = healthy_share;
        self
    }

    /// Gives each endpoint a weight read from its service, for example from a
    /// [`Weighted`](crate::Weighted) wrapper with
    /// `.service_weights(Weighted::weight)`. Applies to endpoints discovered from now
    /// on; a weight from [`weights`](Self::weights) wins over this one.
    pub fn service_weights(
        mut self,
        weigh: impl Fn(&D::Service) -> u32 + Send + Sync + 'static,
    ) -> Self {
        self.weigh_service = Some(Box::new(weigh));
        self
    }

    /// How long nothing may be ready before calls fail with [`NoReadyEndpoints`].
    pub fn failfast_timeout(mut self, timeout: Duration) -> Self {
        self.failfast = timeout;
        self
    }

    /// Reads each request's [`RouteHint`] with `hint` (for example from its extensions,
    /// where marina-affinity puts it), passes it to the picker, and reports the chosen
    /// endpoint back through the hint. A hint naming an endpoint that is ready is
    /// honoured whatever the picker. With failover, the endpoint of the attempt that
    /// answered is reported too; a request that fails over after its endpoint gave it
    /// back ([`failover_unsent`](Self::failover_unsent),
    /// [`failover_copy_idempotent`](Self::failover_copy_idempotent)) has its hint read
    /// again from the request given back, so read the hint from the request itself
    /// (its extensions, a field) rather than make a new one on each call.
    ///
    /// ```
    /// use marina_balance::{Balance, ConsistentHash};
    /// use marina_core::RouteHint;
    /// use tower::discover::ServiceList;
    /// use tower::{Service, ServiceExt, service_fn};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), marina_core::BoxError> {
    /// let endpoints = (0..4).map(|n| service_fn(move |_: (u64, RouteHint)| async move { Ok::<_, std::io::Error>(n) }));
    /// let mut lb = Balance::new(ServiceList::new(endpoints), ConsistentHash::new())
    ///     .route_hint(|req: &(u64, RouteHint)| Some(req.1.clone()));
    /// // The same key reaches the same endpoint.
    /// let a = lb.ready().await?.call((1, RouteHint::hash(42))).await?;
    /// let b = lb.ready().await?.call((2, RouteHint::hash(42))).await?;
    /// assert_eq!(a, b);
    /// # Ok(()) }
    /// ```
    pub fn route_hint(
        mut self,
        hint: impl Fn(&Req) -> Option<RouteHint> + Send + Sync + 'static,
    ) -> Self {
        let hint: HintFn<Req> = Arc::new(hint);
        if let Some(f) = &self.failover {
            *f.lock_hint() = Some(hint.clone());
        }
        self.hint = Some(hint);
        self
    }

    /// Gives each endpoint a weight from its discovery key (discovery metadata usually
    /// travels in the key), for [`WeightedRoundRobin`](crate::WeightedRoundRobin) and
    /// any picker that reads weights. Weights below 1 count as 1; applies to endpoints
    /// discovered from now on.
    ///
    /// ```
    /// use marina_balance::{Balance, WeightedRoundRobin};
    /// use tower::discover::ServiceList;
    /// use tower::{Service, ServiceExt, service_fn};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), marina_core::BoxError> {
    /// let endpoints = (0..2).map(|n| service_fn(move |_: ()| async move { Ok::<_, std::io::Error>(n) }));
    /// // ServiceList keys endpoints by position: give the second three times the weight.
    /// let mut lb = Balance::new(ServiceList::new(endpoints), WeightedRoundRobin::new())
    ///     .weights(|index: &usize| if *index == 1 { 3 } else { 1 });
    /// let mut seen = [0; 2];
    /// for _ in 0..8 {
    ///     seen[lb.ready().await?.call(()).await?] += 1;
    /// }
    /// assert_eq!(seen, [2, 6]);
    /// # Ok(()) }
    /// ```
    pub fn weights(mut self, weigh: impl Fn(&D::Key) -> u32 + Send + Sync + 'static) -> Self {
        self.weigh = Some(Box::new(weigh));
        self
    }

    /// Reads each request's [`RouteHint`] from its extensions, where marina-affinity
    /// puts it: [`route_hint`](Self::route_hint) for `http::Request`s and
    /// `marina_core::Request`s.
    pub fn route_hints_from_extensions(self) -> Self
    where
        Req: HasExtensions,
    {
        self.route_hint(|req: &Req| req.extensions().get::<RouteHint>().cloned())
    }

    /// Turns on failover: a request whose endpoint fails with an error the policy
    /// accepts (by default, [`never_sent`](crate::never_sent) errors: the request never
    /// reached the endpoint) is sent again to another ready endpoint, one not tried yet
    /// for it (the least loaded), up to the policy's attempts and within its
    /// [`RetryBudget`](crate::RetryBudget). A request whose route hint carries a
    /// failover key ([`RouteHint::with_failover_key`](marina_core::RouteHint::with_failover_key):
    /// a consistent-hash key, a session from marina-affinity) goes instead to the
    /// endpoint that key ranks first among those left (rendezvous hashing): the
    /// requests of one session or key that fail over together land on one endpoint,
    /// and different keys spread over the survivors.
    ///
    /// Needs `Req: Clone` (each request is copied before it is sent, so it can be sent
    /// again after a failure; for request types that are not `Clone`, see
    /// [`failover_unsent`](Self::failover_unsent); to copy only the idempotent ones and
    /// have the endpoint give the others back, see
    /// [`failover_copy_idempotent`](Self::failover_copy_idempotent)) and `Clone`
    /// endpoint services (an attempt goes through a copy of the endpoint, readied in
    /// the response future). Each request's copy is kept in a failover state of its
    /// own, one heap allocation per request beside what the copy itself allocates.
    /// Counts:
    /// [`BalanceTotals::retries`] and [`retries_refused`](BalanceTotals::retries_refused).
    ///
    /// ```
    /// use marina_balance::{Balance, Failover, RoundRobin};
    /// use marina_core::NotSent;
    /// use tower::discover::ServiceList;
    /// use tower::{Service, ServiceExt, service_fn};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), marina_core::BoxError> {
    /// // Endpoint 0 refuses every connection; endpoint 1 answers.
    /// let endpoints = (0..2).map(|n| service_fn(move |req: u32| async move {
    ///     if n == 0 {
    ///         Err(NotSent::new(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)))
    ///     } else {
    ///         Ok(req + 1)
    ///     }
    /// }));
    /// let mut lb = Balance::new(ServiceList::new(endpoints), RoundRobin::new())
    ///     .failover(Failover::new());
    /// for _ in 0..4 {
    ///     assert_eq!(lb.ready().await?.call(1).await?, 2); // never fails
    /// }
    /// assert_eq!(lb.handle().totals().retries, 2); // the two that went to endpoint 0
    /// # Ok(()) }
    /// ```
    pub fn failover(self, policy: Failover) -> Self
    where
        Req: Clone,
        D::Service: Clone,
    {
        self.failover_with(policy, Some(Req::clone), false, None, D::Service::clone)
    }

    pub(crate) fn failover_with(
        mut self,
        policy: Failover,
        clone_req: Option<fn(&Req) -> Req>,
        copy_idempotent_only: bool,
        take_req: Option<TakeUnsent<Req>>,
        clone_svc: fn(&D::Service) -> D::Service,
    ) -> Self {
        let shared = FailoverShared {
            policy,
            clone_req,
            copy_idempotent_only,
            take_req,
            hint: Mutex::new(self.hint.clone()),
            clone_svc,
            peers: Mutex::new(Vec::new()),
            totals: self.handle.totals.clone(),
        };
        {
            let mut peers = shared.peers();
            peers.extend(self.slots.iter().map(|ep| {
                ep.as_ref().map(|ep| Peer {
                    id: ep.id(),
                    stats: ep.stats.clone(),
                    svc: clone_svc(&ep.svc),
                })
            }));
        }
        self.failover = Some(Arc::new(shared));
        self
    }

    /// Failover for requests that are not `Clone` (an `http::Request` with a streaming
    /// body, a tonic request, a proxy's incoming request): nothing is copied; a request
    /// is sent again to another endpoint only when its endpoint gave it back with the
    /// error, through [`NotSent::with_request`](marina_core::NotSent::with_request) (marina-pool's `PoolService` does when
    /// a connection cannot be had; for hyper, wrap `SendRequest::try_send_request`'s
    /// `TrySendError::into_message()` the same way). Otherwise as
    /// [`failover`](Self::failover): the policy decides which errors, how many attempts,
    /// and the budget; the error returned when no attempt is left still carries the
    /// request, for the caller to take back with
    /// [`take_unsent_request`](marina_core::take_unsent_request).
    ///
    /// Needs `Clone` endpoint services (an attempt goes through a copy of the endpoint).
    ///
    /// ```
    /// use marina_balance::{Balance, Failover, RoundRobin};
    /// use marina_core::NotSent;
    /// use tower::{Service, ServiceExt, service_fn};
    ///
    /// struct Upload(Vec<u8>); // not Clone
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), marina_core::BoxError> {
    /// // Endpoint 0 cannot connect and gives each request back; endpoint 1 answers.
    /// let endpoints = (0..2).map(|n| service_fn(move |req: Upload| async move {
    ///     if n == 0 {
    ///         let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
    ///         Err(NotSent::with_request(refused, req))
    ///     } else {
    ///         Ok(req.0.len())
    ///     }
    /// }));
    /// let mut lb = Balance::from_services(endpoints, RoundRobin::new())
    ///     .failover_unsent(Failover::new());
    /// for _ in 0..4 {
    ///     assert_eq!(lb.ready().await?.call(Upload(vec![0; 3])).await?, 3);
    /// }
    /// assert_eq!(lb.handle().totals().retries, 2);
    /// # Ok(()) }
    /// ```
    pub fn failover_unsent(self, policy: Failover) -> Self
    where
        Req: 'static,
        D::Service: Clone,
    {
        self.failover_with(
            policy,
            None,
            false,
            Some(TakeUnsent::new()),
            D::Service::clone,
        )
    }

    /// Failover as with [`failover`](Self::failover), without a copy of every request:
    /// only the requests marked idempotent
    /// ([`idempotent_if`](Self::idempotent_if),
    /// [`idempotent_from_extensions`](Self::idempotent_from_extensions)) are copied
    /// before they are sent, for their retries after sending and their
    /// [hedges](crate::Failover::hedge); every other request fails over, as with
    /// [`failover_unsent`](Self::failover_unsent), only when its endpoint gave it back
    /// with its never-sent error through
    /// [`NotSent::with_request`](marina_core::NotSent::with_request). The policy decides
    /// the rest as with `failover`: which errors, how many attempts, the budget, the
    /// deadline.
    ///
    /// **Your endpoint must give requests back** with `NotSent::with_request`, as
    /// marina-pool's `PoolService` does when it cannot check out or connect a
    /// connection (for hyper, wrap `SendRequest::try_send_request`'s
    /// `TrySendError::into_message()` the same way). A never-sent error that did not
    /// bring its request back — a bare `NotSent::new`, a refused connect from a client
    /// that keeps the request — is not retried for a request that is not idempotent
    /// (`failover` would retry it from its copy): the error reaches the caller.
    ///
    /// What it saves: `failover` copies every request before sending it, and keeps the
    /// copy in the request's failover state, a heap allocation of its own, though
    /// almost no request ever fails over. Here a request that is not idempotent, under
    /// a policy without a [deadline](crate::Failover::deadline), costs the balancer no
    /// copy and no allocation: its failover state is built when an attempt fails with
    /// the request given back, not before. Idempotent requests cost what they cost with
    /// `failover`. The idempotent predicate is asked once per request (with
    /// `max_attempts` above 1 and no strict route hint). A request given back has its
    /// route hint read again from it (see [`route_hint`](Self::route_hint)).
    ///
    /// Needs `Req: Clone` (for the copies of idempotent requests) and `Clone` endpoint
    /// services (an attempt goes through a copy of the endpoint). Counts as
    /// `failover`: [`BalanceTotals::retries`], [`sent_retries`](BalanceTotals::sent_retries),
    /// [`retries_refused`](BalanceTotals::retries_refused).
    ///
    /// ```
    /// use marina_balance::{Balance, Failover, RoundRobin};
    /// use marina_core::{Idempotent, NotSent, Request};
    /// use tower::{Service, ServiceExt, service_fn};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), marina_core::BoxError> {
    /// // Endpoint 0 cannot connect and gives each request back (as marina-pool's
    /// // `PoolService` does); endpoint 1 answers.
    /// let endpoints = (0..2).map(|n| service_fn(move |req: Request<u32>| async move {
    ///     if n == 0 {
    ///         let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
    ///         return Err(NotSent::with_request(refused, req));
    ///     }
    ///     Ok(req.body)
    /// }));
    /// let mut lb = Balance::from_services(endpoints, RoundRobin::new())
    ///     .failover_copy_idempotent(Failover::new())
    ///     .idempotent_from_extensions();
    /// for n in 0..4 {
    ///     // Not copied: the two sent to endpoint 0 come back with its error and go to 1.
    ///     assert_eq!(lb.ready().await?.call(Request::new(n)).await?, n);
    /// }
    /// // Marked idempotent: copied before it is sent (and hedged if the policy hedges).
    /// let mut get = Request::new(7);
    /// Idempotent::mark(&mut get);
    /// assert_eq!(lb.ready().await?.call(get).await?, 7);
    /// assert_eq!(lb.handle().totals().retries, 3);
    /// # Ok(()) }
    /// ```
    pub fn failover_copy_idempotent(self, policy: Failover) -> Self
    where
        Req: Clone + 'static,
        D::Service: Clone,
    {
        self.failover_with(
            policy,
            Some(Req::clone),
            true,
            Some(TakeUnsent::new()),
            D::Service::clone,
        )
    }

    /// Says which requests are **idempotent** (safe to send twice): with
    /// [`failover`](Self::failover) or
    /// [`failover_copy_idempotent`](Self::failover_copy_idempotent) (which copies only
    /// these), such a request is also retried on another endpoint after an error that
    /// came after it may have been sent (a reset connection, a per-attempt timeout: see
    /// [`Failover::retry_idempotent_if`](crate::Failover::retry_idempotent_if)), and
    /// [hedged](crate::Failover::hedge) when the policy hedges. No request is
    /// idempotent unless a predicate says so; with several predicates (this one,
    /// [`idempotent_from_extensions`](Self::idempotent_from_extensions)), any one
    /// suffices. Asked once per request, only where failover may keep a copy (not with
    /// [`failover_unsent`](Self::failover_unsent), not with `max_attempts(1)`, not for
    /// a request with a strict route hint).
    ///
    /// ```
    /// use marina_balance::{Balance, Failover, RoundRobin};
    /// use std::sync::Arc;
    /// use std::sync::atomic::{AtomicUsize, Ordering};
    /// use tower::{Service, ServiceExt, service_fn};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), marina_core::BoxError> {
    /// // Endpoint 0 resets every connection after reading the request.
    /// let calls = Arc::new(AtomicUsize::new(0));
    /// let endpoints = (0..2).map(|n| {
    ///     let calls = calls.clone();
    ///     service_fn(move |req: &'static str| {
    ///         calls.fetch_add(1, Ordering::SeqCst);
    ///         async move {
    ///             if n == 0 {
    ///                 return Err(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
    ///             }
    ///             Ok(format!("{req}: ok"))
    ///         }
    ///     })
    /// });
    /// let mut lb = Balance::from_services(endpoints, RoundRobin::new())
    ///     .failover(Failover::new())
    ///     .idempotent_if(|req: &&str| req.starts_with("GET "));
    /// // A read goes to endpoint 0, fails after it was sent, and is retried on 1.
    /// assert_eq!(lb.ready().await?.call("GET /a").await?, "GET /a: ok");
    /// // A write is never sent twice: endpoint 0's error reaches the caller.
    /// assert_eq!(lb.ready().await?.call("POST /b").await?, "POST /b: ok"); // endpoint 1's turn
    /// assert!(lb.ready().await?.call("POST /c").await.is_err()); // endpoint 0's turn
    /// assert_eq!(calls.load(Ordering::SeqCst), 4);
    /// assert_eq!(lb.handle().totals().sent_retries, 1);
    /// # Ok(()) }
    /// ```
    pub fn idempotent_if(
        mut self,
        idempotent: impl Fn(&Req) -> bool + Send + Sync + 'static,
    ) -> Self
    where
        Req: 'static,
    {
        self.idempotent = Some(match self.idempotent.take() {
            None => Box::new(idempotent),
            Some(before) => Box::new(move |req: &Req| before(req) || idempotent(req)),
        });
        self
    }

    /// Counts a request as idempotent when it carries the
    /// [`Idempotent`](marina_core::Idempotent) marker in its extensions (for
    /// `http::Request`s and `marina_core::Request`s): see
    /// [`idempotent_if`](Self::idempotent_if).
    ///
    /// ```
    /// use marina_balance::{Balance, Failover, RoundRobin};
    /// use marina_core::{Idempotent, Request};
    /// use tower::{Service, ServiceExt, service_fn};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), marina_core::BoxError> {
    /// let endpoints = (0..2).map(|n| service_fn(move |req: Request<u32>| async move {
    ///     if n == 0 {
    ///         return Err(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
    ///     }
    ///     Ok(req.body)
    /// }));
    /// let mut lb = Balance::from_services(endpoints, RoundRobin::new())
    ///     .failover(Failover::new())
    ///     .idempotent_from_extensions();
    /// let mut get = Request::new(7);
    /// Idempotent::mark(&mut get);
    /// assert_eq!(lb.ready().await?.call(get).await?, 7); // retried on endpoint 1
    /// # Ok(()) }
    /// ```
    pub fn idempotent_from_extensions(self) -> Self
    where
        Req: HasExtensions + 'static,
    {
        self.idempotent_if(|req: &Req| Idempotent::is_marked(req))
    }

    /// Turns on **slow start** (Envoy's `slow_start_window`, HAProxy's `slowstart`;
    /// default off): an endpoint that comes back after being unready — its ejection by
    /// the health checks ended, it reconnected — or that discovery added after the
    /// balancer's first request gets a share of the picks that would go to it, growing
    /// linearly from 10% to all of them over `window`, so a cold or just-recovered
    /// backend is not flooded at once. Takes a window, or a [`SlowStart`] for the
    /// starting share and the shortest unready spell that counts (1 s by default, so
    /// an endpoint at its concurrency limit for a moment does not ramp).
    ///
    /// Works with every picker: when the picker chooses a ramping endpoint and the
    /// ramp turns the choice down, the picker chooses again (up to 4 choices in all),
    /// then the least loaded ready endpoint not ramping takes the request; when every
    /// ready endpoint ramps, the choice stands. Requests with a route hint (a pinned
    /// endpoint, a consistent-hash key) are not turned away: affinity wins. Failover
    /// attempts and hedges go to the least loaded endpoint (a keyed request's: the one
    /// its failover key ranks first), ramping or not.
    ///
    /// The endpoints there before the first request do not ramp (they all start
    /// cold together). Cost, only while on: a clock read when an endpoint enters or
    /// leaves the ready set, and one per request whose picker chooses a ramping
    /// endpoint.
    ///
    /// ```
    /// use marina_balance::{Balance, RoundRobin, SlowStart};
    /// use std::time::Duration;
    /// use tower::service_fn;
    ///
    /// let endpoints = (0..3).map(|n| service_fn(move |_: ()| async move { Ok::<_, std::io::Error>(n) }));
    /// let lb = Balance::from_services(endpoints, RoundRobin::new())
    ///     .slow_start(Duration::from_secs(30));
    /// # let _: Balance<_, ()> = lb;
    /// // Or with a starting share of 5%, ramping after any unready spell of 5 s or more:
    /// let slow = SlowStart::new(Duration::from_secs(30)).min_share(0.05).after_unready(Duration::from_secs(5));
    /// # drop(slow);
    /// ```
    pub fn slow_start(mut self, slow_start: impl Into<SlowStart>) -> Self {
        let config = slow_start.into();
        self.slow = (0..self.slots.len())
            .map(|_| SlowState::new(self.started))
            .collect();
        self.slow_start = Some(config);
        self
    }

    /// The handle to the per-endpoint statistics.
    pub fn handle(&self) -> BalanceHandle {
        self.handle.clone()
    }

    /// A `Clone` handle to this balancer for every task that sends requests: see
    /// [`Shared`](crate::Shared). `Balance` itself is not `Clone` (one ready set, one
    /// picker state); share it this way, or behind tower's `Buffer`.
    ///
    /// ```
    /// use marina_balance::{Balance, RoundRobin};
    /// use tower::{ServiceExt, service_fn};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), marina_core::BoxError> {
    /// let endpoints = (0..3).map(|n| service_fn(move |_: ()| async move { Ok::<_, std::io::Error>(n) }));
    /// let lb = Balance::from_services(endpoints, RoundRobin::new()).shared();
    /// let (a, b) = (lb.clone(), lb.clone());
    /// // One round robin for both: they get different endpoints.
    /// assert_ne!(a.oneshot(()).await?, b.oneshot(()).await?);
    /// # Ok(()) }
    /// ```
    pub fn shared(self) -> crate::Shared<Self> {
        crate::Shared::new(self)
    }
}
