//! The active prober: one task per endpoint.

use std::sync::{Arc, Weak};

use tokio::sync::Notify;

use crate::config::ActiveConfig;
use crate::service::{Clones, ProbeRound};
use crate::shared::Shared;

/// Starts the probe task (now if inside a tokio runtime; without one there is nothing to
/// run it, and the endpoint is checked passively only).
pub(crate) fn start(
    shared: Arc<Shared>,
    clones: Weak<Clones>,
    gone: Arc<Notify>,
    cfg: ActiveConfig,
    round: ProbeRound,
) {
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => {
            rt.spawn(run(shared, clones, gone, cfg, round));
        }
        Err(_) => tracing::warn!(
            endpoint = %shared.key,
            "no tokio runtime: active health checks are off for this endpoint"
        ),
    }
}

async fn run(
    shared: Arc<Shared>,
    clones: Weak<Clones>,
    gone: Arc<Notify>,
    cfg: ActiveConfig,
    round: ProbeRound,
) {
    let mut first = true;
    loop {
        if !first {
            let jitter = cfg.jitter.clamp(0.0, 1.0) * (fastrand::f64() * 2.0 - 1.0);
            let wait = cfg.interval.mul_f64((1.0 + jitter).max(0.0));
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = gone.notified() => {}
            }
        }
        first = false;
        if clones.strong_count() == 0 {
            return;
        }
        // Each round runs in a task of its own, so a probe that panics fails its round
        // instead of ending the prober; the timeout bounds one that hangs.
        let probe = round();
        let timeout = cfg.timeout;
        let outcome = tokio::spawn(async move { tokio::time::timeout(timeout, probe).await }).await;
        let result = match outcome {
            Ok(Ok(Ok(rt))) => Ok(rt),
            Ok(Ok(Err(e))) => Err(e.to_string()),
            Ok(Err(_)) => Err(format!("timed out after {timeout:?}")),
            Err(e) if e.is_panic() => Err("probe panicked".to_string()),
            Err(_) => Err("probe cancelled".to_string()),
        };
        shared.record_probe(result, cfg.healthy_threshold, cfg.unhealthy_threshold);
    }
}
