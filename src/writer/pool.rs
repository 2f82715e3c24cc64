//! Memory pool: a byte budget with a hard cap for records acknowledged but not yet durable.
//!
//! Every journaled record is charged to the pool (its payload plus [`RECORD_OVERHEAD`])
//! through a [`Permit`]; the permit travels with the record into its segment and is released
//! when that segment is durable. The payload buffer itself is the client's request buffer,
//! shared by reference, so the pool counts memory that exists once.
//!
//! A small slice of the cap, [`Pool::meta_allowance`], is kept for payload-free records
//! (FLUSH, DISCARD, WRITE_ZEROES): when data writes no longer fit, those still do for a while.
//! `RESYNC_BEGIN`, queued once per dirty episode, may overdraw the cap by its overhead (see
//! [`Pool::force_reserve`]) so the episode is always marked.
//!
//! Must never: wait. [`Pool::try_reserve`] answers at once; a write that does not fit is not
//! journaled (the caller marks it dirty), it is never blocked.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// What one record costs besides its payload: the queued record, its index entry in the
/// segment footer and bookkeeping. An estimate on the high side.
pub(super) const RECORD_OVERHEAD: u64 = 128;

/// The smallest cap accepted (`--pool-size`).
pub const MIN_POOL_SIZE: u64 = 1 << 20;

#[derive(Debug)]
struct Inner {
    cap: u64,
    meta_allowance: u64,
    used: AtomicU64,
    peak: AtomicU64,
}

/// See the module documentation. Cloning shares the budget.
#[derive(Clone, Debug)]
pub(crate) struct Pool {
    inner: Arc<Inner>,
}

/// Bytes held in the pool; released on drop.
#[derive(Debug)]
pub(crate) struct Permit {
    inner: Arc<Inner>,
    bytes: u64,
}

/// Every way building a pool fails.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// The cap is below [`MIN_POOL_SIZE`].
    #[error("--pool-size {cap} is too small: use at least {MIN_POOL_SIZE} bytes (1M)")]
    TooSmall { cap: u64 },
}

impl Pool {
    /// A pool of `cap` bytes; 1/64 of it (at most 1 MiB) is the metadata allowance.
    pub(crate) fn new(cap: u64) -> Result<Pool, PoolError> {
        if cap < MIN_POOL_SIZE {
            return Err(PoolError::TooSmall { cap });
        }
        Ok(Pool {
            inner: Arc::new(Inner {
                cap,
                meta_allowance: (cap / 64).min(1 << 20),
                used: AtomicU64::new(0),
                peak: AtomicU64::new(0),
            }),
        })
    }

    pub(crate) fn cap(&self) -> u64 {
        self.inner.cap
    }

    /// Bytes of the cap only payload-free records may use.
    #[cfg(test)]
    pub(crate) fn meta_allowance(&self) -> u64 {
        self.inner.meta_allowance
    }

    /// Bytes held now.
    pub(crate) fn used(&self) -> u64 {
        self.inner.used.load(Ordering::Acquire)
    }

    /// The most bytes ever held at once.
    pub(crate) fn peak(&self) -> u64 {
        self.inner.peak.load(Ordering::Acquire)
    }

    /// Reserves `bytes` for a record with a payload, if the pool (minus the metadata
    /// allowance) has room. Never waits.
    pub(crate) fn try_reserve(&self, bytes: u64) -> Option<Permit> {
        self.reserve_below(bytes, self.inner.cap - self.inner.meta_allowance)
    }

    /// Reserves `bytes` for a payload-free record, if the whole cap has room. Never waits.
    pub(crate) fn try_reserve_meta(&self, bytes: u64) -> Option<Permit> {
        self.reserve_below(bytes, self.inner.cap)
    }

    /// Reserves `bytes` whatever the pool holds. Only for the one `RESYNC_BEGIN` of a dirty
    /// episode, so the overdraft is bounded by one record.
    pub(crate) fn force_reserve(&self, bytes: u64) -> Permit {
        let now = self.inner.used.fetch_add(bytes, Ordering::AcqRel) + bytes;
        self.inner.peak.fetch_max(now, Ordering::AcqRel);
        self.permit(bytes)
    }

    /// A permit of zero bytes, to merge others into.
    pub(crate) fn empty_permit(&self) -> Permit {
        self.permit(0)
    }

    fn permit(&self, bytes: u64) -> Permit {
        Permit {
            inner: self.inner.clone(),
            bytes,
        }
    }

    fn reserve_below(&self, bytes: u64, limit: u64) -> Option<Permit> {
        let used = &self.inner.used;
        let mut current = used.load(Ordering::Acquire);
        loop {
            let next = current.checked_add(bytes).filter(|n| *n <= limit)?;
            match used.compare_exchange_weak(current, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    self.inner.peak.fetch_max(next, Ordering::AcqRel);
                    return Some(self.permit(bytes));
                }
                Err(actual) => current = actual,
            }
        }
    }
}

impl Permit {
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Takes over `other`'s bytes (one permit per segment instead of one per record).
    pub(crate) fn merge(&mut self, mut other: Permit) {
        debug_assert!(
            Arc::ptr_eq(&self.inner, &other.inner),
            "permits of different pools"
        );
        self.bytes += std::mem::take(&mut other.bytes);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.inner.used.fetch_sub(self.bytes, Ordering::AcqRel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_stop_at_the_cap_and_come_back_on_drop() {
        let pool = Pool::new(1 << 20).unwrap();
        let data_cap = pool.cap() - pool.meta_allowance();
        let a = pool.try_reserve(data_cap - 100).unwrap();
        assert!(
            pool.try_reserve(101).is_none(),
            "data stops below the allowance"
        );
        let b = pool.try_reserve(100).unwrap();
        assert_eq!(pool.used(), data_cap);
        let meta = pool.try_reserve_meta(pool.meta_allowance()).unwrap();
        assert!(pool.try_reserve_meta(1).is_none(), "the whole cap is used");
        drop(a);
        drop(b);
        drop(meta);
        assert_eq!(pool.used(), 0);
        assert_eq!(pool.peak(), 1 << 20);
    }

    #[test]
    fn merged_permits_release_together_and_force_may_overdraw() {
        let pool = Pool::new(1 << 20).unwrap();
        let mut seg = pool.empty_permit();
        for _ in 0..10 {
            seg.merge(pool.try_reserve(1000).unwrap());
        }
        assert_eq!((seg.bytes(), pool.used()), (10_000, 10_000));
        let full = pool.try_reserve_meta(pool.cap() - 10_000).unwrap();
        let forced = pool.force_reserve(RECORD_OVERHEAD);
        assert_eq!(pool.used(), pool.cap() + RECORD_OVERHEAD);
        drop((seg, full, forced));
        assert_eq!(pool.used(), 0);
    }

    #[test]
    fn concurrent_reservations_never_exceed_the_cap() {
        let pool = Pool::new(1 << 20).unwrap();
        let held: Vec<Permit> = std::thread::scope(|s| {
            let tasks: Vec<_> = (0..4)
                .map(|_| {
                    let pool = pool.clone();
                    s.spawn(move || {
                        (0..1000)
                            .filter_map(|_| pool.try_reserve(777))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            tasks.into_iter().flat_map(|t| t.join().unwrap()).collect()
        });
        let data_cap = pool.cap() - pool.meta_allowance();
        assert_eq!(held.len() as u64, data_cap / 777);
        assert!(pool.peak() <= data_cap);
    }

    #[test]
    fn tiny_pools_are_refused() {
        assert!(Pool::new(1000).is_err());
    }
}
