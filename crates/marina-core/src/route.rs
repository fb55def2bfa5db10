use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

/// A stable 64-bit id of an endpoint, hashed from its discovery key with a fixed-key
/// SipHash-1-3, so every client instance (every process, every version of marina)
/// computes the same id for the same key.
///
/// ```
/// use marina_core::EndpointId;
/// let a = EndpointId::of("10.0.0.1:7000");
/// assert_eq!(a, EndpointId::of("10.0.0.1:7000"));
/// assert_ne!(a, EndpointId::of("10.0.0.2:7000"));
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointId(pub u64);

impl EndpointId {
    /// The id of `key`.
    pub fn of<K: Hash + ?Sized>(key: &K) -> Self {
        EndpointId(stable_hash(key))
    }
}

impl fmt::Debug for EndpointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EndpointId({:016x})", self.0)
    }
}

/// Hashes `value` with a fixed-key SipHash-1-3: the same on every machine. Not for maps
/// keyed by client-controlled data (use a randomly seeded hasher there).
pub fn stable_hash<K: Hash + ?Sized>(value: &K) -> u64 {
    let mut h =
        siphasher::sip::SipHasher13::new_with_keys(0x6d61_7269_6e61_2d31, 0x726f_7574_652d_6964);
    value.hash(&mut h);
    h.finish()
}

/// Where a request would like to go: written by the affinity layer, read by the
/// balancer's picker.
///
/// It also carries a slot through which the balancer reports the endpoint it chose, so
/// the layer that set the hint learns where a new session landed (or that it was moved)
/// without reading responses. Clones share the slot.
///
/// ```
/// use marina_core::{EndpointId, RouteHint};
/// let hint = RouteHint::hash(42);
/// let seen_by_balancer = hint.clone();
/// seen_by_balancer.report_chosen(EndpointId(7));
/// assert_eq!(hint.chosen(), Some(EndpointId(7)));
/// ```
#[derive(Clone)]
pub struct RouteHint {
    target: HintTarget,
    strict: bool,
    failover_key: Option<u64>,
    chosen: Arc<Mutex<Option<EndpointId>>>,
}

/// What a [`RouteHint`] asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HintTarget {
    /// This endpoint, if it is ready.
    Endpoint(EndpointId),
    /// Whichever endpoint a consistent hash of this value picks.
    Hash(u64),
    /// No preference: the balancer picks as usual and reports its choice (a new
    /// session learning where it landed).
    Any,
}

impl RouteHint {
    /// Prefer `endpoint`.
    pub fn endpoint(endpoint: EndpointId) -> Self {
        RouteHint {
            target: HintTarget::Endpoint(endpoint),
            strict: false,
            failover_key: None,
            chosen: Arc::default(),
        }
    }

    /// No preference; only learn the balancer's choice.
    pub fn any() -> Self {
        RouteHint {
            target: HintTarget::Any,
            strict: false,
            failover_key: None,
            chosen: Arc::default(),
        }
    }

    /// Makes an [`endpoint`](Self::endpoint) hint binding: when that endpoint is not
    /// ready (or gone), the balancer fails the request with
    /// [`PinnedEndpointUnavailable`] instead of choosing another.
    pub fn strict(mut self) -> Self {
        self.strict = true;
        self
    }

    /// Whether the hint is [`strict`](Self::strict).
    pub fn is_strict(&self) -> bool {
        self.strict
    }

    /// Route by consistent hash of `hash` (e.g. [`stable_hash`] of a client IP).
    pub fn hash(hash: u64) -> Self {
        RouteHint {
            target: HintTarget::Hash(hash),
            strict: false,
            failover_key: None,
            chosen: Arc::default(),
        }
    }

    /// What the hint asks for.
    pub fn target(&self) -> HintTarget {
        self.target
    }

    /// Gives the hint a failover key: when the request's endpoint fails and a
    /// balancer with failover sends it elsewhere, it goes to the endpoint this key
    /// ranks first among those left (rendezvous hashing), not to the least loaded one.
    /// Requests sharing a key (a session's concurrent requests, pinned to one endpoint
    /// that dies) then fail over together to one endpoint, while different keys spread
    /// over the survivors. A [`hash`](Self::hash) hint's key is its hash unless set;
    /// marina-balance ranks with its `ConsistentHash` picker's rendezvous scores, so a
    /// hashed key fails over to the endpoint that picker gives it once the failed one
    /// has left.
    ///
    /// ```
    /// use marina_core::{EndpointId, RouteHint};
    /// let hint = RouteHint::endpoint(EndpointId(7)).with_failover_key(42);
    /// assert_eq!(hint.failover_key(), Some(42));
    /// assert_eq!(RouteHint::hash(9).failover_key(), Some(9));
    /// assert_eq!(RouteHint::any().failover_key(), None);
    /// ```
    pub fn with_failover_key(mut self, key: u64) -> Self {
        self.failover_key = Some(key);
        self
    }

    /// The key that orders the endpoints a failover may go to (see
    /// [`with_failover_key`](Self::with_failover_key)); `None`: the least loaded.
    pub fn failover_key(&self) -> Option<u64> {
        match (self.failover_key, self.target) {
            (Some(key), _) | (None, HintTarget::Hash(key)) => Some(key),
            (None, _) => None,
        }
    }

    /// The balancer reports the endpoint it chose; a later report (a failover to
    /// another endpoint) replaces an earlier one.
    pub fn report_chosen(&self, endpoint: EndpointId) {
        *self
            .chosen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(endpoint);
    }

    /// The endpoint the balancer chose last, once it has.
    pub fn chosen(&self) -> Option<EndpointId> {
        *self
            .chosen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl fmt::Debug for RouteHint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RouteHint")
            .field("target", &self.target)
            .field("strict", &self.strict)
            .field("failover_key", &self.failover_key)
            .field("chosen", &self.chosen())
            .finish()
    }
}

/// A [`strict`](RouteHint::strict) hint named an endpoint that is not ready or gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PinnedEndpointUnavailable {
    /// The endpoint the request was pinned to.
    pub endpoint: EndpointId,
}

impl fmt::Display for PinnedEndpointUnavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pinned endpoint {:?} is unavailable", self.endpoint)
    }
}

impl std::error::Error for PinnedEndpointUnavailable {}
