//! One memory bound for everything NBD clients can make the server hold: read replies
//! waiting to be sent, write payloads in flight, and each connection's socket and TLS
//! buffers, summed over all connections and capped by `--max-buffered`.
//!
//! Each connection is a [`Holder`]; before the server reads a request's payload or runs a
//! read, it [`Holder::acquire`]s that many bytes, and the [`Held`] guard travels with the
//! reply and gives them back once the reply is sent. A connection that cannot have its
//! bytes waits, and while it waits the server reads no further request from it: a client
//! that never reads its replies stops being read from, and holds no more than it already
//! has.
//!
//! Who waits: the cap is split in two. The last [`RESERVE_FRACTION`] of it, the reserve, is
//! only for light holders (a connection that would hold at most [`Limits::light`] bytes
//! after the grant, i.e. one doing small I/O or just connecting); everyone else shares the
//! rest. So connections pipelining large reads they never collect fill the shared part and
//! wait there, and a bystander doing ordinary I/O still gets its bytes from the reserve.
//! When bytes come back, the waiters are served lightest holder first (the heaviest holder
//! waits first), and a heavy waiter that would fit is held back while a lighter one before
//! it does not, so small requests cannot starve a large one forever.
//!
//! Requests larger than the cap: the cap is at least [`MIN_MAX_BUFFERED`] (two maximum NBD
//! payloads), so the shared part always fits the largest request the protocol layer
//! accepts (larger ones are refused with `EINVAL` before they get here). Should anything
//! ask for more than the shared part, it is granted once nothing else is held, so it makes
//! progress without a second one beside it.
//!
//! Must never: grant bytes beyond the cap (except that one lone oversized grant); lose a
//! grant when a waiting request is cancelled (a connection that closes gives back all it
//! holds); wake a waiter by time rather than by bytes coming back.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;
use tokio::sync::oneshot;

use super::protocol::MAX_PAYLOAD;

/// `--max-buffered` unless configured.
pub const DEFAULT_MAX_BUFFERED: u64 = 256 << 20;
/// The smallest `--max-buffered` accepted: room for two maximum-size requests, so the
/// shared part (three quarters) always fits one.
pub const MIN_MAX_BUFFERED: u64 = 2 * MAX_PAYLOAD as u64;
/// The reserve is this fraction (1/N) of the cap.
const RESERVE_FRACTION: u64 = 4;
/// A holder is light while it holds at most the reserve divided by this: that many light
/// connections fit in the reserve alone.
const LIGHT_PER_RESERVE: u64 = 16;

/// Every way configuring the budget fails.
#[derive(Debug, thiserror::Error)]
pub enum BudgetError {
    /// The cap is below [`MIN_MAX_BUFFERED`].
    #[error("--max-buffered {cap} is too small: use at least {MIN_MAX_BUFFERED} bytes (64M, two maximum NBD requests)")]
    TooSmall { cap: u64 },
}

/// The numbers the admission rule uses, derived from the cap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Limits {
    cap: u64,
    /// What heavy holders may fill: the cap minus the reserve.
    shared: u64,
    /// Most a light holder holds.
    light: u64,
}

impl Limits {
    fn new(cap: u64) -> Limits {
        let reserve = cap / RESERVE_FRACTION;
        Limits {
            cap,
            shared: cap - reserve,
            light: reserve / LIGHT_PER_RESERVE,
        }
    }
}

/// What the budget holds now, for `status` and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct BudgetStatus {
    /// `--max-buffered`.
    pub cap: u64,
    /// Bytes held now by every connection together.
    pub held: u64,
    /// The most held at once since start.
    pub peak: u64,
    /// Connections waiting for bytes now (the server is not reading their requests).
    pub throttled: u64,
    /// Times a connection had to wait, since start.
    pub throttled_total: u64,
}

/// One connection waiting for bytes.
struct Waiter {
    holder: Arc<AtomicU64>,
    want: u64,
    /// Order of arrival, to break ties between equally heavy holders.
    ticket: u64,
    grant: oneshot::Sender<Held>,
}

/// # Invariants
/// `used` is the sum of the bytes of every live [`Held`] of this budget (granted ones
/// waiting in a channel included), and of every holder's count; `used <= cap` unless one
/// oversized grant is all that is held.
struct State {
    used: u64,
    peak: u64,
    waiters: Vec<Waiter>,
    next_ticket: u64,
    throttled_total: u64,
}

struct Inner {
    limits: Limits,
    state: Mutex<State>,
}

/// The shared cap (see the module documentation). Cheap to clone: clones share it.
#[derive(Clone)]
pub struct BufferBudget {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for BufferBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BufferBudget")
            .field("status", &self.status())
            .finish()
    }
}

impl Default for BufferBudget {
    fn default() -> Self {
        BufferBudget::new(DEFAULT_MAX_BUFFERED).expect("the default cap is above the minimum")
    }
}

impl BufferBudget {
    /// A budget of `cap` bytes (at least [`MIN_MAX_BUFFERED`]).
    pub fn new(cap: u64) -> Result<BufferBudget, BudgetError> {
        if cap < MIN_MAX_BUFFERED {
            return Err(BudgetError::TooSmall { cap });
        }
        Ok(BufferBudget {
            inner: Arc::new(Inner {
                limits: Limits::new(cap),
                state: Mutex::new(State {
                    used: 0,
                    peak: 0,
                    waiters: Vec::new(),
                    next_ticket: 0,
                    throttled_total: 0,
                }),
            }),
        })
    }

    /// A new account for one connection, holding nothing.
    pub(crate) fn holder(&self) -> Holder {
        Holder {
            budget: self.clone(),
            held: Arc::new(AtomicU64::new(0)),
        }
    }

    pub fn status(&self) -> BudgetStatus {
        let state = self.inner.lock();
        BudgetStatus {
            cap: self.inner.limits.cap,
            held: state.used,
            peak: state.peak,
            throttled: state
                .waiters
                .iter()
                .filter(|w| !w.grant.is_closed())
                .count() as u64,
            throttled_total: state.throttled_total,
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update under the lock leaves the state whole; a panic elsewhere does not
        // make it wrong.
        crate::sync::lock(&self.state)
    }

    /// Whether a holder holding `held` may have `want` more bytes now, with `pending` bytes
    /// promised to lighter heavy waiters that did not fit.
    fn fits(&self, used: u64, pending: u64, held: u64, want: u64) -> bool {
        let limits = self.limits;
        if held.saturating_add(want) <= limits.light {
            return used.saturating_add(want) <= limits.cap;
        }
        if want > limits.shared {
            // Larger than anything the shared part can hold: alone, or never.
            return used == 0 && pending == 0;
        }
        used.saturating_add(pending).saturating_add(want) <= limits.shared
    }

    /// Grants what now fits to the waiters, lightest holder first. Grants whose waiter
    /// has gone are returned, to be dropped once the lock is released.
    fn dispatch(self: &Arc<Self>, state: &mut State) -> Vec<Held> {
        let mut orphans = Vec::new();
        state.waiters.retain(|w| !w.grant.is_closed());
        if state.waiters.is_empty() {
            return orphans;
        }
        state
            .waiters
            .sort_by_key(|w| (w.holder.load(Ordering::Relaxed), w.ticket));
        let mut pending = 0u64;
        let mut still_waiting = Vec::with_capacity(state.waiters.len());
        for waiter in std::mem::take(&mut state.waiters) {
            let held = waiter.holder.load(Ordering::Relaxed);
            if !self.fits(state.used, pending, held, waiter.want) {
                if held.saturating_add(waiter.want) > self.limits.light {
                    pending = pending.saturating_add(waiter.want);
                }
                still_waiting.push(waiter);
                continue;
            }
            let held = self.grant(state, &waiter.holder, waiter.want);
            if let Err(held) = waiter.grant.send(held) {
                orphans.push(held);
            }
        }
        state.waiters = still_waiting;
        orphans
    }

    fn grant(self: &Arc<Self>, state: &mut State, holder: &Arc<AtomicU64>, bytes: u64) -> Held {
        state.used += bytes;
        state.peak = state.peak.max(state.used);
        holder.fetch_add(bytes, Ordering::Relaxed);
        Held {
            inner: Arc::clone(self),
            holder: Arc::clone(holder),
            bytes,
        }
    }
}

/// One connection's account in a [`BufferBudget`].
pub(crate) struct Holder {
    budget: BufferBudget,
    /// Bytes this connection holds; changed only under the budget's lock.
    held: Arc<AtomicU64>,
}

impl Holder {
    /// Waits until `bytes` fit in the budget and holds them until the guard is dropped.
    /// Cancel-safe: dropping the future gives back whatever it was granted.
    pub(crate) async fn acquire(&self, bytes: u64) -> Held {
        let inner = &self.budget.inner;
        let granted = {
            let mut state = inner.lock();
            let held = self.held.load(Ordering::Relaxed);
            // Served at once only if no lighter holder is waiting for room.
            let lighter_waiting = state
                .waiters
                .iter()
                .any(|w| w.holder.load(Ordering::Relaxed) < held && !w.grant.is_closed());
            if !lighter_waiting && inner.fits(state.used, 0, held, bytes) {
                return inner.grant(&mut state, &self.held, bytes);
            }
            let (tx, rx) = oneshot::channel();
            let ticket = state.next_ticket;
            state.next_ticket += 1;
            state.throttled_total += 1;
            state.waiters.push(Waiter {
                holder: Arc::clone(&self.held),
                want: bytes,
                ticket,
                grant: tx,
            });
            let orphans = inner.dispatch(&mut state);
            drop(state);
            drop(orphans);
            rx
        };
        match granted.await {
            Ok(held) => held,
            // The sender stays in the waiter list until it is used to grant, and the list
            // lives as long as the budget, which this holder keeps alive.
            Err(_) => unreachable!("a waiter is dropped only once granted"),
        }
    }

    /// Bytes this connection holds now.
    #[cfg(test)]
    fn held(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }
}

/// Bytes held in the budget; given back (and waiters served) on drop.
pub(crate) struct Held {
    inner: Arc<Inner>,
    holder: Arc<AtomicU64>,
    bytes: u64,
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Held").field("bytes", &self.bytes).finish()
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let orphans = {
            let mut state = self.inner.lock();
            state.used -= self.bytes;
            self.holder.fetch_sub(self.bytes, Ordering::Relaxed);
            self.inner.dispatch(&mut state)
        };
        drop(orphans);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    const MIB: u64 = 1 << 20;

    /// Polls once: `Some` if the future finished without waiting.
    fn now<F: Future>(f: &mut std::pin::Pin<&mut F>) -> Option<F::Output> {
        match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(v) => Some(v),
            Poll::Pending => None,
        }
    }

    fn budget(cap: u64) -> BufferBudget {
        BufferBudget::new(cap).unwrap()
    }

    #[test]
    fn the_limits_follow_the_cap() {
        let limits = Limits::new(256 * MIB);
        assert_eq!(limits.shared, 192 * MIB);
        assert_eq!(limits.light, 4 * MIB);
        let smallest = Limits::new(MIN_MAX_BUFFERED);
        assert!(smallest.shared >= u64::from(MAX_PAYLOAD));
        assert!(matches!(
            BufferBudget::new(MIN_MAX_BUFFERED - 1),
            Err(BudgetError::TooSmall { .. })
        ));
    }

    #[test]
    fn bytes_are_held_until_the_guard_is_dropped() {
        let budget = budget(256 * MIB);
        let a = budget.holder();
        let b = budget.holder();
        let x = now(&mut pin!(a.acquire(100 * MIB))).unwrap();
        let y = now(&mut pin!(b.acquire(50 * MIB))).unwrap();
        assert_eq!((a.held(), b.held()), (100 * MIB, 50 * MIB));
        assert_eq!(budget.status().held, 150 * MIB);
        drop(x);
        assert_eq!((a.held(), budget.status().held), (0, 50 * MIB));
        drop(y);
        let status = budget.status();
        assert_eq!((status.held, status.peak), (0, 150 * MIB));
    }

    #[test]
    fn heavy_holders_stop_at_the_shared_part_and_light_ones_use_the_reserve() {
        let budget = budget(256 * MIB);
        let hog = budget.holder();
        let mut hogged = Vec::new();
        for _ in 0..6 {
            hogged.push(now(&mut pin!(hog.acquire(32 * MIB))).unwrap());
        }
        // 192 MiB: the shared part is full; the hog's next request waits.
        let mut next = pin!(hog.acquire(32 * MIB));
        assert!(now(&mut next).is_none());
        // So does a fresh connection's large request.
        let other = budget.holder();
        assert!(now(&mut pin!(other.acquire(32 * MIB))).is_none());
        // A bystander doing small I/O is served from the reserve, up to its light share.
        let bystander = budget.holder();
        let small = now(&mut pin!(bystander.acquire(MIB))).unwrap();
        let more = now(&mut pin!(bystander.acquire(3 * MIB))).unwrap();
        assert!(now(&mut pin!(bystander.acquire(1))).is_none());
        assert_eq!(budget.status().throttled, 1, "only the hog's request waits");
        assert_eq!(budget.status().held, 196 * MIB);
        drop((small, more));
        // One of the hog's buffers sent: its waiting request takes the room.
        hogged.pop();
        let granted = now(&mut next).expect("the freed bytes go to the waiter");
        assert_eq!(hog.held(), 192 * MIB);
        drop(granted);
    }

    #[test]
    fn the_heaviest_holder_waits_first() {
        let budget = budget(256 * MIB);
        let heavy = budget.holder();
        let middle = budget.holder();
        let fresh = budget.holder();
        let h1 = now(&mut pin!(heavy.acquire(96 * MIB))).unwrap();
        let m1 = now(&mut pin!(middle.acquire(64 * MIB))).unwrap();
        let filler = budget.holder();
        let f1 = now(&mut pin!(filler.acquire(32 * MIB))).unwrap();
        // Shared part full (192 MiB). Three wait, the heaviest having asked first.
        let mut h2 = pin!(heavy.acquire(32 * MIB));
        let mut m2 = pin!(middle.acquire(32 * MIB));
        let mut n1 = pin!(fresh.acquire(32 * MIB));
        assert!(now(&mut h2).is_none() && now(&mut m2).is_none() && now(&mut n1).is_none());
        assert_eq!(budget.status().throttled, 3);
        // 32 MiB come back: the connection holding nothing gets it.
        drop(f1);
        assert!(now(&mut h2).is_none() && now(&mut m2).is_none());
        let n1 = now(&mut n1).expect("lightest first");
        // Then the middle one, and the heaviest last.
        drop(n1);
        assert!(now(&mut h2).is_none());
        let m2 = now(&mut m2).expect("middle second");
        drop(m2);
        let h2 = now(&mut h2).expect("heaviest last");
        assert_eq!(budget.status().throttled, 0);
        assert!(budget.status().throttled_total >= 3);
        drop((h1, m1, h2));
        assert_eq!(budget.status().held, 0);
    }

    #[test]
    fn a_large_waiter_is_not_starved_by_heavier_small_requests() {
        let budget = budget(256 * MIB);
        let big = budget.holder();
        let busy = budget.holder();
        let first = now(&mut pin!(busy.acquire(180 * MIB))).unwrap();
        // 12 MiB left in the shared part: the fresh connection's 32 MiB waits…
        let mut large = pin!(big.acquire(32 * MIB));
        assert!(now(&mut large).is_none());
        // …and the heavier connection may not take the room piece by piece meanwhile.
        assert!(now(&mut pin!(busy.acquire(8 * MIB))).is_none());
        drop(first);
        assert!(now(&mut large).is_some());
    }

    #[test]
    fn a_cancelled_wait_gives_back_what_it_was_granted() {
        let budget = budget(256 * MIB);
        let hog = budget.holder();
        let full = now(&mut pin!(hog.acquire(192 * MIB))).unwrap();
        let other = budget.holder();
        {
            let mut waiting = pin!(other.acquire(32 * MIB));
            assert!(now(&mut waiting).is_none());
            // Granted in the channel, then the connection goes away before taking it.
            drop(full);
            assert_eq!(budget.status().held, 32 * MIB);
        }
        assert_eq!((budget.status().held, other.held()), (0, 0));
        // A waiter dropped before any grant leaves nothing behind either.
        let full = now(&mut pin!(hog.acquire(192 * MIB))).unwrap();
        {
            let mut waiting = pin!(other.acquire(32 * MIB));
            assert!(now(&mut waiting).is_none());
        }
        drop(full);
        assert_eq!(
            budget.status(),
            BudgetStatus {
                cap: 256 * MIB,
                held: 0,
                peak: 192 * MIB,
                throttled: 0,
                throttled_total: 2,
            }
        );
    }

    #[test]
    fn an_oversized_request_goes_through_alone() {
        let budget = budget(MIN_MAX_BUFFERED);
        let a = budget.holder();
        let b = budget.holder();
        let small = now(&mut pin!(b.acquire(MIB))).unwrap();
        let mut huge = pin!(a.acquire(60 * MIB));
        assert!(
            now(&mut huge).is_none(),
            "waits while anything else is held"
        );
        drop(small);
        let huge = now(&mut huge).expect("alone, it goes through");
        assert_eq!(budget.status().held, 60 * MIB);
        drop(huge);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_holders_never_exceed_the_cap() {
        let budget = budget(64 * MIB);
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let holder = budget.holder();
                tokio::spawn(async move {
                    for round in 0..200u64 {
                        let size = MIB * (1 + (i + round) % 8);
                        let held = holder.acquire(size).await;
                        tokio::task::yield_now().await;
                        drop(held);
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        let status = budget.status();
        assert_eq!((status.held, status.throttled), (0, 0));
        assert!(status.peak <= 64 * MIB, "{status:?}");
    }
}
