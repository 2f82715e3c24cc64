//! Reading segment indexes ahead of trim's walk, in parallel, by predicted seq: the walk
//! reads one index per segment, so against S3 it is bound by round trips, not bandwidth.
//!
//! The window of reads in flight grows with the walk (half the indexes taken so far, up to
//! [`MAX_AHEAD`]), so a trim that stops early has read at most about half as many indexes
//! again as it used, and never one at or past the limit it was given.
//!
//! Not [`crate::journal::reader::ReadAhead`]: that one fetches and decodes whole segments
//! checked against a cursor; trim needs only each segment's index (a ranged read of its
//! tail), for the journal and for undo logs alike, and a window that grows with the walk.
//!
//! Must never: read an index the walk could not use (at or past `limit`), or hand out an
//! index for another seq than the one asked for.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::journal::segment::{read_index, Expected, SegmentIndex};
use crate::store::ObjectStore;

use super::{TrimError, TrimResult};

/// Most index reads in flight.
pub(crate) const MAX_AHEAD: u64 = 32;

type Read = JoinHandle<TrimResult<Option<SegmentIndex>>>;

/// Index reads of segments `seq, seq + 1, …` in flight. See the module documentation.
pub(crate) struct ReadAhead {
    store: Arc<dyn ObjectStore>,
    uuid: Uuid,
    key: Arc<dyn Fn(u64) -> String + Send + Sync>,
    /// Seqs at or past this are never read ahead (only when asked for).
    limit: u64,
    pending: BTreeMap<u64, Read>,
    /// Next seq to start a read of.
    next: u64,
    taken: u64,
}

impl ReadAhead {
    pub(crate) fn new(
        store: Arc<dyn ObjectStore>,
        uuid: Uuid,
        key: Arc<dyn Fn(u64) -> String + Send + Sync>,
        limit: u64,
    ) -> Self {
        ReadAhead {
            store,
            uuid,
            key,
            limit,
            pending: BTreeMap::new(),
            next: 0,
            taken: 0,
        }
    }

    fn start(&mut self, seq: u64) {
        let (store, key) = (self.store.clone(), (self.key)(seq));
        let expected = Expected {
            uuid: self.uuid,
            seq,
            first_lsn: None,
        };
        let read = tokio::spawn(async move {
            match read_index(store.as_ref(), &key, &expected).await {
                Ok(i) => Ok(Some(i)),
                Err(e) if e.is_not_found() => Ok(None),
                Err(e) => Err(TrimError::from(e)),
            }
        });
        self.pending.insert(seq, read);
    }

    /// The index of segment `seq` (`None` when it does not exist). Reads of seqs below `seq`
    /// still in flight (skipped by a plug) are dropped; reads after it are started.
    pub(crate) async fn get(&mut self, seq: u64) -> TrimResult<Option<SegmentIndex>> {
        let stale: Vec<u64> = self.pending.range(..seq).map(|(s, _)| *s).collect();
        for s in stale {
            if let Some(read) = self.pending.remove(&s) {
                read.abort();
            }
        }
        self.next = self.next.max(seq);
        if !self.pending.contains_key(&seq) {
            self.start(seq);
            self.next = seq + 1;
        }
        let window = (self.taken / 2).clamp(1, MAX_AHEAD);
        while self.next <= seq.saturating_add(window) && self.next < self.limit {
            let next = self.next;
            self.start(next);
            self.next += 1;
        }
        let read = self.pending.remove(&seq).expect("started above");
        self.taken += 1;
        match read.await {
            Ok(result) => result,
            Err(e) => Err(TrimError::Task(e.to_string())),
        }
    }
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        for read in self.pending.values() {
            read.abort();
        }
    }
}
