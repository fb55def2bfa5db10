//! The active prober: one task per endpoint.

use std::sync::{Arc, Weak};
use std::time::Duration;

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
            let wait =
                Duration::try_from_secs_f64(cfg.interval.as_secs_f64() * (1.0 + jitter).max(0.0))
                    .unwrap_or(cfg.interval);
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
        // instead of ending the prober; the timeout is kept here, outside that task, so
        // even a probe that blocks its thread cannot stall the prober (the round task
        // is aborted and left behind).
        let timeout = cfg.timeout;
        let start = shared.probe_started();
        let mut task = tokio::spawn(round());
        let result = match tokio::time::timeout(timeout, &mut task).await {
            Ok(Ok(Ok(rt))) => Ok(rt),
            Ok(Ok(Err(e))) => Err(e.to_string()),
            Ok(Err(e)) if e.is_panic() => Err("probe panicked".to_string()),
            Ok(Err(_)) => Err("probe cancelled".to_string()),
            Err(_) => {
                task.abort();
                Err(format!("timed out after {timeout:?}"))
            }
        };
        shared.record_probe(
            result,
            start,
            cfg.healthy_threshold,
            cfg.unhealthy_threshold,
        );
    }
}
