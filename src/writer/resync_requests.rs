//! The writer's side of the resync requests (`journal::resync_request`): after every lease
//! renewal, one LIST of `requests/resync/`; each request not yet being handled is read (one
//! GET), its regions journaled as a resync span through the same path as the control
//! socket's `resync` ([`PrimaryCore::resync_regions`]), and the request deleted once that
//! span's `RESYNC_END` is durable. In the steady state (no request) this costs one LIST a
//! renewal, nothing else.
//!
//! A request that cannot be read or names regions the device lacks is logged once and left
//! in place (an operator removes it; it changes nothing). One the writer cannot serve now
//! (fenced, stopping, pool full) is tried again at the next renewal. A request replaced
//! while its span was being journaled (a rejoin run again) is not deleted: the next renewal
//! handles the new one.
//!
//! Must never: change the primary (a span only reads it); delete a request before its span
//! is durable; make a request per renewal beyond the one LIST when nothing is asked.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;

use super::mode::Mode;
use super::primary::{HookError, PrimaryCore};
use crate::journal::resync_request;
use crate::store::ObjectStore;

/// What the watcher needs of the writer (the primary core; a stub in tests).
#[async_trait]
pub trait ResyncTarget: Send + Sync {
    /// Regions of the device.
    fn region_count(&self) -> u64;
    /// Marks `regions` for a resync span.
    fn resync_regions(&self, regions: &[u64]) -> Result<(), HookError>;
    /// Waits until every resync asked for so far is journaled and durable; false when the
    /// writer gave up (fenced, stopping).
    async fn resync_durable(&self) -> bool;
}

/// How often a span's end is looked for (the core has no signal for "mode is logging again").
const SPAN_POLL: Duration = Duration::from_millis(100);

#[async_trait]
impl ResyncTarget for PrimaryCore {
    fn region_count(&self) -> u64 {
        PrimaryCore::region_count(self)
    }

    fn resync_regions(&self, regions: &[u64]) -> Result<(), HookError> {
        PrimaryCore::resync_regions(self, regions)
    }

    async fn resync_durable(&self) -> bool {
        loop {
            match self.mode() {
                Mode::Fenced | Mode::NoJournal => return false,
                // The span ended: its RESYNC_END was queued before the mode left
                // forward-part, so it is at or below the head.
                Mode::Logging if self.dirty().count() == 0 => {
                    return self.wait_durable(self.head_lsn()).await
                }
                _ => tokio::time::sleep(SPAN_POLL).await,
            }
        }
    }
}

/// Runs until `shutdown` turns true: one LIST of the requests after each change of
/// `renewed` (see [`crate::writer::lease::LeaseKeeper::renewals`]).
pub async fn watch(
    store: Arc<dyn ObjectStore>,
    mut renewed: watch::Receiver<u64>,
    target: Arc<dyn ResyncTarget>,
    mut shutdown: watch::Receiver<bool>,
) {
    let handling: Arc<Mutex<HashSet<String>>> = Arc::default();
    let mut refused: HashSet<String> = HashSet::new();
    loop {
        tokio::select! {
            changed = renewed.changed() => if changed.is_err() { return },
            _ = shutdown.wait_for(|s| *s) => return,
        }
        let names = match resync_request::list_names(store.as_ref()).await {
            Ok(names) => names,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the resync requests; next renewal");
                continue;
            }
        };
        refused.retain(|n| names.contains(n));
        for name in names {
            if refused.contains(&name) || lock(&handling).contains(&name) {
                continue;
            }
            let request = match resync_request::read(store.as_ref(), &name).await {
                Ok(Some(request)) => request,
                Ok(None) => continue,
                Err(e) => {
                    tracing::error!(request = %name, error = %e, "ignoring an unreadable resync request");
                    refused.insert(name);
                    continue;
                }
            };
            let regions = match request.region_set(target.region_count()) {
                Ok(set) => set.iter().collect::<Vec<_>>(),
                Err(e) => {
                    tracing::error!(request = %name, error = %e, "ignoring a resync request");
                    refused.insert(name);
                    continue;
                }
            };
            if let Err(e) = target.resync_regions(&regions) {
                tracing::warn!(request = %name, error = %e, "cannot serve the resync request now; next renewal");
                continue;
            }
            tracing::info!(
                request = %name,
                regions = regions.len(),
                fork_epoch = request.fork.epoch,
                fork_lsn = request.fork.lsn,
                "journaling the regions a rejoining replica asked for as a resync span"
            );
            lock(&handling).insert(name.clone());
            let (store, target, handling) = (store.clone(), target.clone(), handling.clone());
            tokio::spawn(async move {
                if target.resync_durable().await {
                    // Replaced meanwhile (a rejoin run again): leave the new one.
                    match resync_request::read(store.as_ref(), &name).await {
                        Ok(Some(now)) if now == request => {
                            match resync_request::delete(store.as_ref(), &name).await {
                                Ok(()) => tracing::info!(request = %name, "resync request done"),
                                Err(e) => {
                                    tracing::warn!(request = %name, error = %e, "cannot delete the done resync request; it is journaled again")
                                }
                            }
                        }
                        _ => {}
                    }
                }
                lock(&handling).remove(&name);
            });
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;
    use crate::journal::epoch::Predecessor;
    use crate::journal::resync_request::ResyncRequest;
    use crate::store::counting::CountingStore;
    use crate::store::memory::MemoryStore;

    /// Records what was asked; its spans end when `done` is set.
    #[derive(Default)]
    struct Stub {
        asked: Mutex<Vec<Vec<u64>>>,
        done: AtomicBool,
        span_end: tokio::sync::Notify,
    }

    #[async_trait]
    impl ResyncTarget for Stub {
        fn region_count(&self) -> u64 {
            16
        }
        fn resync_regions(&self, regions: &[u64]) -> Result<(), HookError> {
            lock(&self.asked).push(regions.to_vec());
            Ok(())
        }
        async fn resync_durable(&self) -> bool {
            while !self.done.load(Ordering::Acquire) {
                self.span_end.notified().await;
            }
            true
        }
    }

    async fn until(what: &str, mut f: impl FnMut() -> bool) {
        for _ in 0..500 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out waiting for {what}");
    }

    #[tokio::test]
    async fn each_renewal_lists_once_and_a_request_is_deleted_after_its_span() {
        let counting = Arc::new(CountingStore::new(Arc::new(MemoryStore::new())));
        let store: Arc<dyn ObjectStore> = counting.clone();
        let stub = Arc::new(Stub::default());
        let (renew, renewed) = watch::channel(0u64);
        let (stop, shutdown) = watch::channel(false);
        let task = tokio::spawn(watch(store.clone(), renewed, stub.clone(), shutdown));

        // Steady state: one LIST a renewal, nothing else.
        for n in 1..=3 {
            renew.send_replace(n);
            until("the LIST", || counting.counts().list == n).await;
        }
        assert_eq!(counting.counts().total(), 3, "{:?}", counting.counts());

        let fork = Predecessor { epoch: 1, lsn: 9 };
        let request = ResyncRequest::new("sitea", &"2,5-6".parse().unwrap(), fork, 1);
        resync_request::create(store.as_ref(), &request)
            .await
            .unwrap();
        let bad = ResyncRequest::new("siteb", &"99".parse().unwrap(), fork, 1);
        resync_request::create(store.as_ref(), &bad).await.unwrap();
        renew.send_replace(4);
        until("the span", || !lock(&stub.asked).is_empty()).await;
        assert_eq!(*lock(&stub.asked), vec![vec![2, 5, 6]]);
        // Not durable yet: the request stays, and the next renewal does not ask again.
        renew.send_replace(5);
        until("the LIST", || counting.counts().list == 5).await;
        assert_eq!(lock(&stub.asked).len(), 1);
        assert!(resync_request::read(store.as_ref(), "sitea")
            .await
            .unwrap()
            .is_some());
        stub.done.store(true, Ordering::Release);
        stub.span_end.notify_waiters();
        let names = || async { resync_request::list_names(store.as_ref()).await.unwrap() };
        for _ in 0..500 {
            if names().await == vec!["siteb".to_string()] {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            names().await,
            vec!["siteb".to_string()],
            "the bad one is left alone"
        );
        assert_eq!(
            lock(&stub.asked).len(),
            1,
            "a region past the device is never asked"
        );
        stop.send_replace(true);
        task.await.unwrap();
    }
}
