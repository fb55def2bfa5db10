//! The layer's metrics (the `metrics` feature): handles registered once, when the layer
//! is built, and bumped from here. Without the feature every method is empty and the
//! struct has no fields.
//!
//! No label: a session key is never a label value (one series per session would grow
//! without bound).

#[cfg(feature = "metrics")]
use metrics::{Counter, Gauge, Unit};

/// The metric names, one place.
#[cfg(feature = "metrics")]
mod names {
    pub(super) const SESSIONS: &str = "marina_affinity_sessions";
    pub(super) const CREATED: &str = "marina_affinity_sessions_created_total";
    pub(super) const REPINNED: &str = "marina_affinity_sessions_repinned_total";
    pub(super) const EXPIRED: &str = "marina_affinity_sessions_expired_total";
    pub(super) const PURGED: &str = "marina_affinity_sessions_purged_total";
    pub(super) const TABLE_FULL: &str = "marina_affinity_table_full_total";
    pub(super) const REJECTED_TOKENS: &str = "marina_affinity_rejected_tokens_total";
    pub(super) const UNROUTED: &str = "marina_affinity_unrouted_requests_total";
    pub(super) const MISWIRED: &str = "marina_affinity_miswired_layers";
}

/// An affinity layer's metric handles.
#[derive(Debug)]
pub(crate) struct Metrics {
    #[cfg(feature = "metrics")]
    sessions: Gauge,
    #[cfg(feature = "metrics")]
    created: Counter,
    #[cfg(feature = "metrics")]
    repinned: Counter,
    #[cfg(feature = "metrics")]
    expired: Counter,
    #[cfg(feature = "metrics")]
    purged: Counter,
    #[cfg(feature = "metrics")]
    table_full: Counter,
    #[cfg(feature = "metrics")]
    rejected_tokens: Counter,
    #[cfg(feature = "metrics")]
    unrouted: Counter,
    #[cfg(feature = "metrics")]
    miswired: Gauge,
}

impl Default for Metrics {
    /// Registers (and describes) every metric with the recorder installed now.
    fn default() -> Self {
        #[cfg(feature = "metrics")]
        {
            use names::*;
            metrics::describe_gauge!(SESSIONS, Unit::Count, "Sessions in sticky tables now.");
            metrics::describe_counter!(
                CREATED,
                Unit::Count,
                "Sessions created: pinned for the first time, or issued a first token."
            );
            metrics::describe_counter!(
                REPINNED,
                Unit::Count,
                "Sessions moved to another endpoint because theirs was unavailable."
            );
            metrics::describe_counter!(
                EXPIRED,
                Unit::Count,
                "Sessions forgotten after their idle timeout."
            );
            metrics::describe_counter!(
                PURGED,
                Unit::Count,
                "Sessions forgotten to make room for new ones (table full, purge oldest)."
            );
            metrics::describe_counter!(
                TABLE_FULL,
                Unit::Count,
                "New sessions refused because the sticky table was full (set to refuse)."
            );
            metrics::describe_counter!(
                REJECTED_TOKENS,
                Unit::Count,
                "Session tokens that did not check out (forged, expired, garbled)."
            );
            metrics::describe_counter!(
                UNROUTED,
                Unit::Count,
                "Requests whose route hint no balancer read (the session was not pinned)."
            );
            metrics::describe_gauge!(
                MISWIRED,
                Unit::Count,
                "Affinity layers whose route hints no balancer reads (1 or more: add \
                 .route_hints_from_extensions() to the balancer)."
            );
            Metrics {
                sessions: metrics::gauge!(SESSIONS),
                created: metrics::counter!(CREATED),
                repinned: metrics::counter!(REPINNED),
                expired: metrics::counter!(EXPIRED),
                purged: metrics::counter!(PURGED),
                table_full: metrics::counter!(TABLE_FULL),
                rejected_tokens: metrics::counter!(REJECTED_TOKENS),
                unrouted: metrics::counter!(UNROUTED),
                miswired: metrics::gauge!(MISWIRED),
            }
        }
        #[cfg(not(feature = "metrics"))]
        Metrics {}
    }
}

impl Metrics {
    /// A session entered a sticky table.
    #[inline]
    pub(crate) fn session_added(&self) {
        #[cfg(feature = "metrics")]
        self.sessions.increment(1.0);
    }

    /// `n` sessions left a sticky table (expired, purged, ended).
    #[inline]
    pub(crate) fn sessions_removed(&self, n: usize) {
        #[cfg(feature = "metrics")]
        self.sessions.decrement(n as f64);
        #[cfg(not(feature = "metrics"))]
        let _ = n;
    }

    #[inline]
    pub(crate) fn created(&self) {
        #[cfg(feature = "metrics")]
        self.created.increment(1);
    }

    #[inline]
    pub(crate) fn repinned(&self) {
        #[cfg(feature = "metrics")]
        self.repinned.increment(1);
    }

    #[inline]
    pub(crate) fn expired(&self, n: u64) {
        #[cfg(feature = "metrics")]
        self.expired.increment(n);
        #[cfg(not(feature = "metrics"))]
        let _ = n;
    }

    #[inline]
    pub(crate) fn purged(&self) {
        #[cfg(feature = "metrics")]
        self.purged.increment(1);
    }

    #[inline]
    pub(crate) fn refused(&self) {
        #[cfg(feature = "metrics")]
        self.table_full.increment(1);
    }

    #[inline]
    pub(crate) fn rejected_token(&self) {
        #[cfg(feature = "metrics")]
        self.rejected_tokens.increment(1);
    }

    #[inline]
    pub(crate) fn unrouted(&self) {
        #[cfg(feature = "metrics")]
        self.unrouted.increment(1);
    }

    /// The layer turned mis-wired (`true`) or a balancer read a hint after all.
    #[inline]
    pub(crate) fn miswired(&self, now: bool) {
        #[cfg(feature = "metrics")]
        if now {
            self.miswired.increment(1.0);
        } else {
            self.miswired.decrement(1.0);
        }
        #[cfg(not(feature = "metrics"))]
        let _ = now;
    }
}
