//! The active prober: one task per endpoint.

use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

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

/// The probe loop: a round starts every `interval` (jittered), counted from the start
/// of the round before; a round still running when the next is due delays it to its
/// own end, so rounds never overlap (see [`ActiveConfig`] for the bound this gives).
async fn run(
    shared: Arc<Shared>,
    clones: Weak<Clones>,
    gone: Arc<Notify>,
    cfg: ActiveConfig,
    round: ProbeRound,
) {
    // The first round starts at once.
    let mut due = Instant::now();
    loop {
        if Instant::now() < due {
            tokio::select! {
                _ = tokio::time::sleep_until(due) => {}
                _ = gone.notified() => {}
            }
        }
        if clones.strong_count() == 0 {
            return;
        }
        let started = Instant::now();
        due = after(started, jittered(cfg.interval, cfg.jitter));
        // Each round runs in a task of its own, so a probe that panics fails its round
        // instead of ending the prober; the timeout is kept here, outside that task, so
        // even a probe that blocks its thread cannot stall the prober.
        let timeout = cfg.timeout;
        let start = shared.probe_started();
        let mut task = tokio::spawn(round());
        let mut timed_out = false;
        let result = match tokio::time::timeout(timeout, &mut task).await {
            Ok(Ok(Ok(rt))) => Ok(rt),
            Ok(Ok(Err(e))) => Err(e.to_string()),
            Ok(Err(e)) if e.is_panic() => Err("probe panicked".to_string()),
            Ok(Err(_)) => Err("probe cancelled".to_string()),
            Err(_) => {
                task.abort();
                timed_out = true;
                Err(format!("timed out after {timeout:?}"))
            }
        };
        shared.record_probe(
            result,
            start,
            cfg.healthy_threshold,
            cfg.unhealthy_threshold,
        );
        if timed_out {
            // No overlap: the next round waits until this one is gone. An aborted
            // round ends at its next await point, at once; one that blocks its thread
            // cannot be stopped, and is left behind after a further `timeout`.
            let _ = tokio::time::timeout(timeout, &mut task).await;
        }
    }
}

/// `start + wait`, or about 30 years on for a wait past what an `Instant` holds.
fn after(start: Instant, wait: Duration) -> Instant {
    start
        .checked_add(wait)
        .unwrap_or_else(|| start + Duration::from_secs(30 * 365 * 86_400))
}

/// `interval` moved early or late by a random share of up to `jitter` (at most 0.5,
/// checked at build; clamped here all the same).
fn jittered(interval: Duration, jitter: f64) -> Duration {
    let jitter = jitter.clamp(0.0, 1.0) * (fastrand::f64() * 2.0 - 1.0);
    Duration::try_from_secs_f64(interval.as_secs_f64() * (1.0 + jitter).max(0.0))
        .unwrap_or(interval)
}
