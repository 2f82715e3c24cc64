//! The crate's one way to take a lock and one way to run blocking work from async code.
//!
//! [`lock`], [`read`] and [`write`] take a lock even when an earlier holder panicked: for
//! data whose every critical section leaves it consistent at each point it can panic (a
//! single assignment, a single map call). Each caller says in a comment why that holds.
//! Data a panicking holder can leave half-updated goes through [`checked`] instead, which
//! turns the poison into an error for the caller to report.
//!
//! [`blocking`] runs a closure on tokio's blocking pool and maps a task that did not finish
//! (it panicked, or the runtime shut down) into the caller's own error type.
//!
//! Must never: hand out a poisoned lock's data through [`checked`]; panic on a poisoned lock;
//! block an async task on I/O (that is what [`blocking`] is for).

use std::sync::{LockResult, Mutex, MutexGuard, PoisonError, RwLock};
use std::sync::{RwLockReadGuard, RwLockWriteGuard};

use tokio::task::JoinError;

/// Locks `mutex`, taking the data even when a holder panicked (see the module documentation
/// for when that is sound).
pub(crate) fn lock<T: ?Sized>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Read-locks `lock`, taking the data even when a writer panicked (see [`lock`]).
pub(crate) fn read<T: ?Sized>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

/// Write-locks `lock`, taking the data even when a writer panicked (see [`lock`]).
pub(crate) fn write<T: ?Sized>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

/// A lock whose holder panicked while the data may have been half-updated.
#[derive(Debug, thiserror::Error)]
#[error("{what} is unusable: a thread panicked while updating it")]
pub(crate) struct Poisoned {
    /// What the lock guards, for the message.
    pub(crate) what: &'static str,
}

/// The guard of `result` (from `Mutex::lock`, `RwLock::read`/`write`), or [`Poisoned`] naming
/// `what` when a holder panicked.
pub(crate) fn checked<G>(result: LockResult<G>, what: &'static str) -> Result<G, Poisoned> {
    result.map_err(|_| Poisoned { what })
}

/// Runs `work` on tokio's blocking pool; a task that did not finish becomes `failed(join)`.
pub(crate) async fn blocking<T, E>(
    work: impl FnOnce() -> Result<T, E> + Send + 'static,
    failed: impl FnOnce(JoinError) -> E,
) -> Result<T, E>
where
    T: Send + 'static,
    E: Send + 'static,
{
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result,
        Err(join) => Err(failed(join)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn poison<T: Send + 'static>(m: Arc<Mutex<T>>) {
        let _ = std::thread::spawn(move || {
            let _guard = m.lock().unwrap();
            panic!("poisoning on purpose");
        })
        .join();
    }

    #[test]
    fn lock_takes_a_poisoned_mutex_and_checked_refuses_it() {
        let m = Arc::new(Mutex::new(7));
        poison(m.clone());
        assert!(m.is_poisoned());
        assert_eq!(*lock(&m), 7);
        let e = checked(m.lock(), "the test map").unwrap_err();
        assert!(e.to_string().contains("the test map"), "{e}");
    }

    #[tokio::test]
    async fn blocking_returns_the_work_or_the_mapped_failure() {
        let ok: Result<u32, String> = blocking(|| Ok(3), |j| j.to_string()).await;
        assert_eq!(ok, Ok(3));
        let failed: Result<u32, String> =
            blocking(|| panic!("on purpose"), |j| format!("task: {j}")).await;
        assert!(failed.unwrap_err().starts_with("task: "));
    }
}
