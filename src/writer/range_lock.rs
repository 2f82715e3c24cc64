//! Range lock: serializes overlapping I/O on the primary so that the journal's order is the
//! disk's order.
//!
//! A request takes the lock for its byte range; it waits for every *earlier* request (held
//! or still waiting) whose range overlaps its own, and for nothing else. So overlapping
//! requests run one after the other in arrival order, and requests that touch disjoint
//! ranges run in parallel.
//!
//! Must never: let two overlapping holders run at once; let a later request overtake an
//! earlier overlapping one; leak a waiter when a request is dropped half-way (a client that
//! disconnects mid-request): the guard is registered before the first await and removes
//! itself on drop, waking whoever waited on it.

use std::ops::Range;
use std::sync::{Mutex, MutexGuard};

use tokio::sync::oneshot;

/// One registered request.
///
/// # Invariants
/// `blockers` is the number of entries with a smaller ticket whose range overlaps this one;
/// the entry holds the lock exactly when it is zero. `wake` is `Some` only while its owner
/// awaits the grant.
#[derive(Debug)]
struct Entry {
    start: u64,
    end: u64,
    blockers: usize,
    wake: Option<oneshot::Sender<()>>,
}

impl Entry {
    /// Empty ranges overlap nothing.
    fn overlaps(&self, start: u64, end: u64) -> bool {
        self.start < end && start < self.end && start < end && self.start < self.end
    }
}

#[derive(Debug, Default)]
struct State {
    next_ticket: u64,
    /// Every registered request (holding or waiting) with its ticket, in ticket order
    /// (tickets only grow, so a new one goes at the end). A vector rather than a map: its
    /// capacity stays, where a map allocated a node whenever it went from empty to one
    /// entry, once per 4 KiB write (tests/request_allocations.rs).
    entries: Vec<(u64, Entry)>,
}

/// See the module documentation.
#[derive(Debug, Default)]
pub(super) struct RangeLock {
    state: Mutex<State>,
}

/// Holds (or, while its acquisition is pending, waits for) one range; releases on drop.
#[derive(Debug)]
pub(super) struct RangeGuard<'a> {
    lock: &'a RangeLock,
    ticket: u64,
}

impl RangeLock {
    pub(super) fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Every critical section below leaves the map consistent before anything can panic
        // (the only fallible calls are on the oneshot, which never panics), so a poisoned lock
        // still guards a consistent map.
        crate::sync::lock(&self.state)
    }

    /// Waits until `range` is free of every earlier overlapping request, then holds it until
    /// the guard drops. An empty range never waits and blocks nobody.
    pub(super) async fn lock(&self, range: Range<u64>) -> RangeGuard<'_> {
        let (guard, granted) = {
            let mut state = self.state();
            let ticket = state.next_ticket;
            state.next_ticket += 1;
            let blockers = state
                .entries
                .iter()
                .filter(|(_, e)| e.overlaps(range.start, range.end))
                .count();
            let (wake, granted) = if blockers == 0 {
                (None, None)
            } else {
                let (tx, rx) = oneshot::channel();
                (Some(tx), Some(rx))
            };
            state.entries.push((
                ticket,
                Entry {
                    start: range.start,
                    end: range.end,
                    blockers,
                    wake,
                },
            ));
            (RangeGuard { lock: self, ticket }, granted)
        };
        if let Some(granted) = granted {
            // The sender lives in our own entry, which only `release` removes (after
            // sending); an error here cannot happen while the guard is alive.
            let _ = granted.await;
        }
        guard
    }

    /// Requests registered (holding or waiting).
    #[cfg(test)]
    pub(super) fn registered(&self) -> usize {
        self.state().entries.len()
    }

    fn release(&self, ticket: u64) {
        let mut state = self.state();
        let Ok(at) = state.entries.binary_search_by_key(&ticket, |(t, _)| *t) else {
            return;
        };
        let (_, gone) = state.entries.remove(at);
        // Everything from `at` on came after the one that left.
        for entry in state.entries[at..].iter_mut().map(|(_, e)| e) {
            if entry.overlaps(gone.start, gone.end) {
                entry.blockers -= 1;
                if entry.blockers == 0 {
                    if let Some(wake) = entry.wake.take() {
                        // A dropped receiver means that waiter is being dropped too; its own
                        // guard removes its entry.
                        let _ = wake.send(());
                    }
                }
            }
        }
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        self.lock.release(self.ticket);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    async fn pending<F: std::future::Future>(f: F) -> bool {
        tokio::time::timeout(Duration::from_millis(50), f)
            .await
            .is_err()
    }

    #[tokio::test]
    async fn disjoint_ranges_do_not_wait() {
        let lock = RangeLock::new();
        let _a = lock.lock(0..4096).await;
        let _b = lock.lock(4096..8192).await;
        let _c = lock.lock(100..100).await;
        assert_eq!(lock.registered(), 3);
    }

    #[tokio::test]
    async fn overlapping_range_waits_for_release() {
        let lock = RangeLock::new();
        let a = lock.lock(0..4096).await;
        assert!(pending(lock.lock(4095..4097)).await);
        // The dropped attempt left nothing behind.
        assert_eq!(lock.registered(), 1);
        drop(a);
        let _b = lock.lock(4095..4097).await;
    }

    /// A later request waits for an earlier *waiting* one that overlaps it, even when the
    /// range actually held does not overlap the later one: arrival order is kept.
    #[tokio::test]
    async fn overlapping_waiters_are_served_in_arrival_order() {
        let lock = Arc::new(RangeLock::new());
        let order = Arc::new(Mutex::new(Vec::new()));
        let first = lock.lock(0..10).await;
        let mut tasks = Vec::new();
        // 1 waits for `first`; 2 overlaps only 1, so it waits for 1.
        for (i, range) in [(1, 5..15), (2, 12..20)] {
            let (lock, order) = (lock.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let _g = lock.lock(range).await;
                order.lock().unwrap().push(i);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(order.lock().unwrap().is_empty(), "both must wait");
        drop(first);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![1, 2]);
    }

    #[tokio::test]
    async fn cancelled_waiter_wakes_the_ones_behind_it() {
        let lock = RangeLock::new();
        let held = lock.lock(0..10).await;
        // `waiter` queues behind `held`; `later` queues behind both.
        let mut waiter = Box::pin(lock.lock(0..10));
        assert!(futures_poll_once(waiter.as_mut()).await.is_none());
        let mut later = Box::pin(lock.lock(5..6));
        assert!(futures_poll_once(later.as_mut()).await.is_none());
        drop(waiter); // the client went away while waiting
        drop(held);
        tokio::time::timeout(Duration::from_secs(1), later)
            .await
            .expect("the later request must be granted");
    }

    /// Polls a future once and returns its output if it was ready.
    async fn futures_poll_once<F: std::future::Future + Unpin>(f: F) -> Option<F::Output> {
        tokio::time::timeout(Duration::from_millis(20), f)
            .await
            .ok()
    }

    /// Many tasks hammer a few overlapping ranges: no two overlapping holders ever coexist.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn overlapping_holders_never_coexist() {
        let lock = Arc::new(RangeLock::new());
        let cells: Arc<Vec<AtomicUsize>> = Arc::new((0..16).map(|_| AtomicUsize::new(0)).collect());
        let mut tasks = Vec::new();
        for t in 0..32u64 {
            let (lock, cells) = (lock.clone(), cells.clone());
            tasks.push(tokio::spawn(async move {
                for i in 0..50u64 {
                    let start = (t * 7 + i * 3) % 12;
                    let len = 1 + (t + i) % 4;
                    let _g = lock.lock(start..start + len).await;
                    for c in start..start + len {
                        assert_eq!(cells[c as usize].fetch_add(1, Ordering::SeqCst), 0);
                    }
                    tokio::task::yield_now().await;
                    for c in start..start + len {
                        cells[c as usize].fetch_sub(1, Ordering::SeqCst);
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(lock.registered(), 0);
    }
}
