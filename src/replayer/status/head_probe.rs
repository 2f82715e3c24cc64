//! The journal head as a status request sees it: known from the segments the agent fetched,
//! and while the agent is behind, probed for newer segments (O(log n) HEADs, cached for a
//! few seconds) with the stored bytes of what is left to apply.
//!
//! Must never: block the agent (it runs on the status request), or wait on a store that is
//! down for longer than `PROBE_TIMEOUT`.

use std::time::Duration;

use super::{raise, AgentState, KnownHead, StatusBoard};
use crate::journal::consumer::ConsumerState;
use crate::journal::head::{prefix_index, probe_end};

/// How long a probed head stays fresh.
const HEAD_CACHE_NS: u64 = 2_000_000_000;

/// How long a status request (or a metrics scrape) waits for the journal store before it
/// answers with what the agent already knows: a store that is down must not hang `status`.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Segments whose sizes a status request reads with HEAD; beyond, lag bytes are estimated.
const LAG_SIZE_SAMPLE: u64 = 32;

/// Stored bytes of the segments the agent has not applied yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct LagBytes {
    pub(super) bytes: u64,
    /// Extrapolated from a sample of segment sizes.
    pub(super) estimated: bool,
}

/// A probed head, when it was probed, and the lag bytes found with it.
pub(super) type HeadCache = (u64, KnownHead, Option<LagBytes>);

impl StatusBoard {
    /// The newest head: the one seen, or a fresh probe when the agent is behind. Also the
    /// unapplied bytes `(bytes, estimated)` when probed.
    pub(super) async fn head(&self, position: &ConsumerState) -> (KnownHead, Option<LagBytes>) {
        let now = self.clock.now_ns();
        let (seen, idle, cached) = {
            let b = self.lock();
            (b.head, b.state == AgentState::Idle, b.head_cache)
        };
        if idle && seen.lsn <= position.applied_lsn {
            return (
                seen,
                Some(LagBytes {
                    bytes: 0,
                    estimated: false,
                }),
            );
        }
        if let Some((at, _, None)) = cached {
            // The last probe failed or timed out: do not make every status wait again.
            if now.saturating_sub(at) < HEAD_CACHE_NS {
                return (seen, None);
            }
        }
        if let Some((at, head, bytes)) = cached {
            // A cached head that is not past the applied LSN would say "nothing behind"
            // while the agent catches up: probe again instead.
            if now.saturating_sub(at) < HEAD_CACHE_NS
                && head.lsn >= seen.lsn
                && head.lsn > position.applied_lsn
            {
                return (head, bytes);
            }
        }
        let probed = tokio::time::timeout(PROBE_TIMEOUT, self.probe(seen, position)).await;
        let (head, bytes) = match probed {
            Ok(Ok(found)) => found,
            Ok(Err(e)) => {
                tracing::debug!("status head probe failed: {e}");
                (seen, None)
            }
            Err(_) => {
                tracing::debug!(
                    "status head probe: no answer from the store within {PROBE_TIMEOUT:?}"
                );
                (seen, None)
            }
        };
        self.lock().head_cache = Some((now, head, bytes));
        (head, bytes)
    }

    async fn probe(
        &self,
        seen: KnownHead,
        position: &ConsumerState,
    ) -> Result<(KnownHead, Option<LagBytes>), crate::journal::JournalError> {
        let store = self.reader.store().as_ref();
        let manifest = self.reader.manifest();
        let from = seen.next_seq.max(position.next_seq);
        let end = probe_end(store, manifest, from).await?;
        let mut head = seen;
        if end > from {
            let index = prefix_index(store, manifest, end - 1).await?;
            if let Some(last) = index.header.last_lsn() {
                raise(&mut head, last, index.last_timestamp().unwrap_or(0), end);
            }
            head.next_seq = end;
        }
        // Unapplied bytes: the segments from the consumer's next seq to the head.
        let first = position.next_seq;
        let count = head.next_seq.saturating_sub(first);
        let sampled = count.min(LAG_SIZE_SAMPLE);
        let mut bytes = 0u64;
        let mut found = 0u64;
        for seq in first..first + sampled {
            if let Ok(meta) = store.head(&manifest.segment_key(seq)).await {
                bytes += meta.size;
                found += 1;
            }
        }
        let estimate = if found > 0 && count > sampled {
            (bytes as f64 / found as f64 * count as f64) as u64
        } else {
            bytes
        };
        Ok((
            head,
            Some(LagBytes {
                bytes: estimate,
                estimated: count > sampled,
            }),
        ))
    }

    /// Timestamp of the first record after the applied LSN (one index read of the
    /// consumer's next segment, following plugs and empty segments a few steps), cached per
    /// applied LSN. `None` when it cannot be read.
    pub(super) async fn oldest_unapplied(&self, position: &ConsumerState) -> Option<u64> {
        if let Some((lsn, ts)) = self.lock().oldest_unapplied {
            if lsn == position.applied_lsn {
                return Some(ts);
            }
        }
        let mut seq = position.next_seq;
        for _ in 0..8 {
            let index = match tokio::time::timeout(PROBE_TIMEOUT, self.reader.index(seq)).await {
                Ok(Ok(Some(index))) => index,
                Ok(Ok(None)) => return None,
                Ok(Err(e)) => {
                    tracing::debug!("status: reading the index of segment {seq}: {e}");
                    return None;
                }
                Err(_) => {
                    tracing::debug!("status: no index of segment {seq} within {PROBE_TIMEOUT:?}");
                    return None;
                }
            };
            if let Some(e) = index.entries.iter().find(|e| e.lsn > position.applied_lsn) {
                self.lock().oldest_unapplied = Some((position.applied_lsn, e.timestamp_ns));
                return Some(e.timestamp_ns);
            }
            seq = index.header.next_seq;
        }
        None
    }
}
