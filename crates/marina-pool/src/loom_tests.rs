//! Loom models of the slot accounting in `slots.rs`.
//!
//! Run with:
//! `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test -p marina-pool --lib --release loom`
//!
//! Each model checks, over every interleaving loom explores: no over-subscription
//! (never more connections out than slots), no lost wake-up (a queued waiter always
//! completes once a connection or slot is freed, else `block_on` deadlocks and loom
//! fails), and no double return or loss (every item ends idle exactly once).

use std::future::poll_fn;

use loom::sync::Arc;
use loom::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use loom::thread;

use crate::slots::{Grant, NEVER, Slots, WaitError};

/// Acquire, waiting if needed; a `Create` grant becomes a new item `fresh`.
fn acquire(s: &Slots<u32>, fresh: u32) -> Result<u32, WaitError> {
    let g = match s.acquire_or_wait(NEVER).map_err(|_| WaitError::Closed)? {
        Ok(g) => g,
        Err(q) => loom::future::block_on(poll_fn(|cx| s.poll_waiter(&q.waiter, cx)))?,
    };
    Ok(match g {
        Grant::Idle(e) => e,
        Grant::Create => fresh,
    })
}

#[test]
fn loom_two_acquirers_one_slot() {
    loom::model(|| {
        let slots = Arc::new(Slots::<u32>::new(1, true));
        let out = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..2)
            .map(|i| {
                let (s, out) = (slots.clone(), out.clone());
                thread::spawn(move || {
                    let item = acquire(&s, i).unwrap();
                    assert_eq!(out.fetch_add(1, SeqCst), 0, "oversubscribed");
                    out.fetch_sub(1, SeqCst);
                    assert!(s.put(item).is_none());
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let snap = slots.snapshot();
        assert_eq!((snap.open, snap.idle, snap.waiting), (1, 1, 0));
    });
}

#[test]
fn loom_cancel_races_put() {
    loom::model(|| {
        let slots = Arc::new(Slots::<u32>::new(1, false));
        let held = match slots.try_acquire().unwrap() {
            Some(Grant::Create) => 7,
            other => panic!("unexpected {other:?}"),
        };
        let w = match slots.acquire_or_wait(NEVER).unwrap() {
            Err(q) => q.waiter,
            Ok(g) => panic!("should have queued, got {g:?}"),
        };
        let s = slots.clone();
        let returner = thread::spawn(move || assert!(s.put(held).is_none()));
        // The waiter gives up, possibly after the connection was handed to it: the
        // connection must then go back to the idle queue, not vanish.
        assert!(slots.cancel(&w).is_none());
        returner.join().unwrap();
        let snap = slots.snapshot();
        assert_eq!((snap.open, snap.idle, snap.waiting), (1, 1, 0));
        assert_eq!(
            slots
                .try_acquire()
                .unwrap()
                .map(|g| matches!(g, Grant::Idle(7))),
            Some(true)
        );
    });
}

#[test]
fn loom_release_grants_slot_to_waiter() {
    loom::model(|| {
        let slots = Arc::new(Slots::<u32>::new(1, true));
        assert!(matches!(slots.try_acquire().unwrap(), Some(Grant::Create)));
        let s = slots.clone();
        let waiter = thread::spawn(move || {
            let item = acquire(&s, 9).unwrap();
            assert!(s.put(item).is_none());
        });
        // The connect failed: the slot must reach the waiter as a `Create` grant.
        slots.release();
        waiter.join().unwrap();
        let snap = slots.snapshot();
        assert_eq!((snap.open, snap.idle, snap.waiting), (1, 1, 0));
    });
}

#[test]
fn loom_deadline_races_put() {
    loom::model(|| {
        let slots = Arc::new(Slots::<u32>::new(1, true));
        assert!(matches!(slots.try_acquire().unwrap(), Some(Grant::Create)));
        let q = match slots.acquire_or_wait(5).unwrap() {
            Err(q) => q,
            Ok(g) => panic!("should have queued, got {g:?}"),
        };
        let s = slots.clone();
        let returner = thread::spawn(move || assert!(s.put(1).is_none()));
        slots.expire(5);
        returner.join().unwrap();
        // Either the waiter timed out and the connection is idle, or it got the
        // connection: never both, never neither.
        match loom::future::block_on(poll_fn(|cx| slots.poll_waiter(&q.waiter, cx))) {
            Ok(Grant::Idle(1)) => assert_eq!(slots.snapshot().idle, 0),
            Err(WaitError::TimedOut) => assert_eq!(slots.snapshot().idle, 1),
            other => panic!("{other:?}"),
        }
        assert_eq!(slots.snapshot().waiting, 0);
    });
}

#[test]
fn loom_close_wakes_waiter_and_rejects_returns() {
    loom::model(|| {
        let slots = Arc::new(Slots::<u32>::new(1, true));
        assert!(matches!(slots.try_acquire().unwrap(), Some(Grant::Create)));
        let s = slots.clone();
        let waiter = thread::spawn(move || match acquire(&s, 3) {
            Ok(item) => s.put(item),
            Err(WaitError::Closed) => None,
            Err(e) => panic!("{e:?}"),
        });
        let closer = {
            let s = slots.clone();
            thread::spawn(move || s.close())
        };
        // Returned after close (or handed to the waiter first): never kept idle.
        let back = slots.put(1);
        let idle_at_close = closer.join().unwrap();
        let from_waiter = waiter.join().unwrap();
        let destroyed =
            back.is_some() as usize + idle_at_close.len() + from_waiter.is_some() as usize;
        assert_eq!(
            destroyed, 1,
            "the one connection must be destroyed exactly once"
        );
        let snap = slots.snapshot();
        assert_eq!((snap.open, snap.idle, snap.waiting), (0, 0, 0));
    });
}
