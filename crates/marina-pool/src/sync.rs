//! Synchronisation primitives, swapped for loom's under `cfg(loom)` so the slot
//! accounting in `slots.rs` can be model-checked.

#[cfg(loom)]
pub(crate) use loom::sync::{Arc, Mutex, MutexGuard};
#[cfg(not(loom))]
pub(crate) use std::sync::Arc;

/// The lock around the slot state: a spin lock whose unlock is a plain store, so an
/// uncontended lock/unlock pair costs one atomic instruction instead of two (a
/// measured ~15% of a whole checkout+return). Critical sections are a few dozen
/// instructions and never block; a contended locker spins briefly, then yields its
/// thread so a preempted holder can finish.
#[cfg(not(loom))]
pub(crate) type Mutex<T> = spin::mutex::SpinMutex<T>;
#[cfg(not(loom))]
pub(crate) type MutexGuard<'a, T> = spin::mutex::SpinMutexGuard<'a, T>;

/// Locks `m`.
#[cfg(not(loom))]
#[inline]
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    if let Some(g) = m.try_lock() {
        return g;
    }
    lock_contended(m)
}

#[cfg(not(loom))]
#[cold]
fn lock_contended<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    let mut spins = 0u32;
    loop {
        // Test, then test-and-set: spin on a plain load so waiting does not steal the
        // line from the holder; try the atomic swap only when the lock looks free.
        while m.is_locked() {
            if spins < 100 {
                spins += 1;
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        if let Some(g) = m.try_lock_weak() {
            return g;
        }
    }
}

/// Locks `m` (loom's mutex, so loom explores every interleaving).
#[cfg(loom)]
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap()
}

/// Locks a std mutex (state outside the loom-modelled core), ignoring poisoning.
pub(crate) fn lock_std<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
