//! Synchronisation primitives, swapped for loom's under `cfg(loom)` so the slot
//! accounting in `slots.rs` can be model-checked.

#[cfg(loom)]
pub(crate) use loom::sync::{Arc, Mutex, MutexGuard};
#[cfg(not(loom))]
pub(crate) use std::sync::Arc;

/// The lock around the slot state: std's mutex (a futex on Linux). Critical sections
/// are a few dozen instructions and never block, so it is rarely contended; when it
/// is, a locker spins a bounded moment (std: 100 iterations of a load) and then sleeps
/// in the kernel until the holder unlocks and wakes it. So a worker whose lock holder
/// was preempted neither spins on until the holder runs again nor calls
/// `thread::yield_now` in a loop (the spin lock this replaced did both). An uncontended
/// lock and unlock are an atomic compare-and-swap and an atomic swap.
#[cfg(not(loom))]
pub(crate) type Mutex<T> = std::sync::Mutex<T>;
#[cfg(not(loom))]
pub(crate) type MutexGuard<'a, T> = std::sync::MutexGuard<'a, T>;

/// Locks `m`, ignoring poisoning (as the spin lock did): no critical section runs user
/// code.
#[cfg(not(loom))]
#[inline]
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
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
