//! `HealthHandle`: read an endpoint's health and follow its changes.

use std::fmt;
use std::sync::Arc;

use tokio::sync::watch;

use crate::report::{HealthReport, Status};
use crate::shared::Shared;

/// A cheap, cloneable view of one endpoint's health, shared by every clone of its
/// [`Health`](crate::Health) service.
#[derive(Clone)]
pub struct HealthHandle {
    shared: Arc<Shared>,
}

impl HealthHandle {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        HealthHandle { shared }
    }

    /// The endpoint's name in events and reports, and its `endpoint` label in metrics
    /// (see [`HealthLayer::name`](crate::HealthLayer::name)).
    pub fn key(&self) -> &str {
        &self.shared.key
    }

    /// The status now.
    pub fn status(&self) -> Status {
        self.shared.status()
    }

    /// Status changes as they happen (a `tokio::sync::watch` receiver: it always holds
    /// the latest status), so a balancer or an app can react without polling.
    pub fn subscribe(&self) -> watch::Receiver<Status> {
        self.shared.subscribe()
    }

    /// Counters, the probe history's summary and the last probe round's checks.
    pub fn report(&self) -> HealthReport {
        self.shared.report()
    }
}

impl fmt::Display for HealthHandle {
    /// The endpoint's name and its status now: `10.0.0.7:6379: ejected, 12.0 s left`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.shared.key, self.shared.status())
    }
}

impl fmt::Debug for HealthHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HealthHandle")
            .field("endpoint", &self.shared.key)
            .field("status", &self.shared.status())
            .finish()
    }
}
