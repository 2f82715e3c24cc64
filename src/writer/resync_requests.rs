//! The writer's side of the resync requests (`journal::resync_request`): after every lease
//! renewal, one HEAD of the doorbell (`requests/resync.pending`); when it rings (and once at
//! the start, and after a request that must be tried again) the doorbell is silenced and
//! `requests/resync/` listed; each request not yet being handled is read (one GET), its
//! regions journaled as a resync span through the same path as the control socket's
//! `resync` ([`PrimaryCore::resync_regions`]), and the request deleted once that span's
//! `RESYNC_END` is durable. In the steady state (no request) this costs one HEAD a renewal
//! and no LIST.
//!
//! A request that cannot be read or names regions the device lacks is logged once and left
//! in place (an operator removes it; it changes nothing). One the writer cannot serve now
//! (fenced, stopping, pool full) is tried again at the next renewal. A request replaced
//! while its span was being journaled (a rejoin run again) is not deleted: the next renewal
//! handles the new one.
//!
//! Must never: change the primary (a span only reads it); delete a request before its span
//! is durable; make a request per renewal beyond the one HEAD when nothing is asked; silence
//! the doorbell after listing (a request made in between would wait for the next ring).

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

/// Runs until `shutdown` turns true: after each change of `renewed` (see
/// [`crate::writer::lease::LeaseKeeper::renewals`]) one look at the doorbell, and a LIST of
/// the requests when it rings (at once on start: requests made before this writer began).
pub async fn watch(
    store: Arc<dyn ObjectStore>,
    mut renewed: watch::Receiver<u64>,
    target: Arc<dyn ResyncTarget>,
    mut shutdown: watch::Receiver<bool>,
) {
    let handling: Arc<Mutex<HashSet<String>>> = Arc::default();
    let mut refused: HashSet<String> = HashSet::new();
    // Look at once (requests made before this writer began), then at each renewal; `retry`
    // lists again without a ring when a request could not be served or the list failed.
    let mut first = true;
    let mut retry = false;
    loop {
        if !first {
            tokio::select! {
                changed = renewed.changed() => if changed.is_err() { return },
                _ = shutdown.wait_for(|s| *s) => return,
            }
        }
        let rings = match resync_request::doorbell_rings(store.as_ref()).await {
            Ok(rings) => rings,
            Err(e) => {
                tracing::warn!(error = %e, "cannot look at the resync requests' doorbell; next renewal");
                continue;
            }
        };
        if !(rings || first || retry) {
            continue;
        }
        first = false;
        retry = false;
        if rings {
            if let Err(e) = resync_request::silence_doorbell(store.as_ref()).await {
                tracing::warn!(error = %e, "cannot silence the resync requests' doorbell; next renewal");
                continue;
            }
        }
        let names = match resync_request::list_names(store.as_ref()).await {
            Ok(names) => names,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the resync requests; next renewal");
                retry = true;
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
                retry = true;
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

// Poison is taken: see the critical sections of this file.
use crate::sync::lock;

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
    async fn each_renewal_looks_at_the_doorbell_and_a_request_is_deleted_after_its_span() {
        let counting = Arc::new(CountingStore::new(Arc::new(MemoryStore::new())));
        let store: Arc<dyn ObjectStore> = counting.clone();
        let stub = Arc::new(Stub::default());
        let (renew, renewed) = watch::channel(0u64);
        let (stop, shutdown) = watch::channel(false);
        let task = tokio::spawn(watch(store.clone(), renewed, stub.clone(), shutdown));

        // At the start: the doorbell and one LIST (requests made before this writer).
        until("the first LIST", || counting.counts().list == 1).await;
        // Steady state: one HEAD of the doorbell a renewal, no LIST, nothing else.
        for n in 1..=3 {
            renew.send_replace(n);
            until("the doorbell", || counting.counts().head == 1 + n).await;
        }
        let quiet = counting.counts();
        assert_eq!((quiet.list, quiet.total()), (1, 5), "{quiet:?}");

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
        assert_eq!(counting.counts().list, 2, "the ring made one LIST");
        // Not durable yet: the request stays, and the next renewal does not ask again (the
        // doorbell was silenced before the LIST: no second LIST).
        renew.send_replace(5);
        until("the doorbell", || counting.counts().head == 6).await;
        assert_eq!(counting.counts().list, 2);
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
