//! Intake: the hand-off from the I/O path to the segment encoder. One mutex assigns the LSN,
//! builds the record (with its acknowledgement timestamp) and queues it, so queue order is
//! LSN order; the encoder takes whole batches.
//!
//! Waking a thread costs more than journaling a 4 KiB record, so the encoder is not woken
//! per record: it sleeps until its segment's linger deadline, and a producer wakes it only
//! when it sleeps without a deadline (nothing is open), when a journal-mode writer waits
//! (urgent), or once [`WAKE_BYTES`] have piled up.
//!
//! Must never: block a producer for longer than the queue push (no I/O, no waiting under
//! the lock); hand out an LSN twice or skip one while open; queue after [`Intake::close`].

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Instant;

use super::pool::Permit;
use super::shared::Pending;
use crate::journal::Record;

/// Queued payload bytes that wake a sleeping encoder early.
pub(super) const WAKE_BYTES: u64 = 1 << 20;

#[derive(Debug)]
struct State {
    next_lsn: u64,
    queue: Vec<Pending>,
    queued_bytes: u64,
    closed: bool,
    /// Someone waits for the encoder (a journal-mode writer, a freed upload slot).
    urgent: bool,
    /// The encoder waits on the condvar.
    sleeping: bool,
    /// ... and has no deadline: only a producer can wake it.
    idle: bool,
}

/// See the module documentation.
#[derive(Debug)]
pub(crate) struct Intake {
    state: Mutex<State>,
    wake: Condvar,
}

/// What the encoder gets from [`Intake::next_batch`].
#[derive(Debug, Default)]
pub(crate) struct Batch {
    /// Records in LSN order (possibly none: the deadline passed or someone poked).
    pub records: Vec<Pending>,
    /// Intake is closed and this is the last batch.
    pub closed: bool,
}

impl State {
    /// Gives the record `make` builds the next LSN and queues it: the one step `append` and
    /// `append_last` share. `None` once closed (nothing queued, no LSN used).
    fn push(&mut self, make: impl FnOnce(u64) -> Record, permit: Permit) -> Option<u64> {
        if self.closed {
            return None;
        }
        let lsn = self.next_lsn;
        let record = make(lsn);
        self.next_lsn += 1;
        self.queued_bytes += permit.bytes();
        self.queue.push(Pending { record, permit });
        Some(lsn)
    }
}

impl Intake {
    /// An open intake whose first record gets `next_lsn`.
    pub(crate) fn new(next_lsn: u64) -> Self {
        Intake {
            state: Mutex::new(State {
                next_lsn,
                queue: Vec::new(),
                queued_bytes: 0,
                closed: false,
                urgent: false,
                sleeping: false,
                idle: false,
            }),
            wake: Condvar::new(),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the state consistent before anything can panic (the
        // record builder runs before any field changes), so a poisoned lock is still valid.
        crate::sync::lock(&self.state)
    }

    /// Assigns the next LSN to the record `make` builds and queues it, in one critical
    /// section. `urgent` wakes the encoder at once. `None` once intake is closed (nothing
    /// was queued and no LSN used).
    pub(crate) fn append(
        &self,
        make: impl FnOnce(u64) -> Record,
        permit: Permit,
        urgent: bool,
    ) -> Option<u64> {
        let mut s = self.state();
        let lsn = s.push(make, permit)?;
        s.urgent |= urgent;
        let wake = s.sleeping && (s.idle || urgent || s.queued_bytes >= WAKE_BYTES);
        drop(s);
        if wake {
            self.wake.notify_one();
        }
        Some(lsn)
    }

    /// Wakes the encoder now (e.g. an upload slot freed while journal-mode writers wait).
    pub(crate) fn poke(&self) {
        let mut s = self.state();
        s.urgent = true;
        let wake = s.sleeping;
        drop(s);
        if wake {
            self.wake.notify_one();
        }
    }

    /// Appends the writer's last record and closes the intake in one step, so that nothing
    /// can be queued after it (`DEMOTE`). `None` when already closed.
    pub(crate) fn append_last(
        &self,
        make: impl FnOnce(u64) -> Record,
        permit: Permit,
    ) -> Option<u64> {
        let mut s = self.state();
        let lsn = s.push(make, permit)?;
        s.urgent = true;
        s.closed = true;
        drop(s);
        self.wake.notify_one();
        Some(lsn)
    }

    /// Closes intake and returns the last LSN assigned. The encoder drains what is queued.
    pub(crate) fn close(&self) -> u64 {
        let mut s = self.state();
        s.closed = true;
        let head = s.next_lsn - 1;
        drop(s);
        self.wake.notify_one();
        head
    }

    /// Whether [`Intake::close`] was called.
    pub(crate) fn is_closed(&self) -> bool {
        self.state().closed
    }

    /// The last LSN assigned.
    pub(crate) fn head_lsn(&self) -> u64 {
        self.state().next_lsn - 1
    }

    /// Encoder side: waits until there is something to do (a batch worth taking, an urgent
    /// poke, `deadline`, or the close) and returns the queued records.
    pub(crate) fn next_batch(&self, deadline: Option<Instant>) -> Batch {
        let mut s = self.state();
        loop {
            let due = deadline.is_some_and(|d| Instant::now() >= d);
            let full = s.queued_bytes >= WAKE_BYTES;
            // Without a deadline the first record is worth taking at once: it opens the
            // segment whose linger bounds everything queued after it.
            let first = deadline.is_none() && !s.queue.is_empty();
            if s.closed || s.urgent || due || full || first {
                s.urgent = false;
                s.queued_bytes = 0;
                return Batch {
                    records: std::mem::take(&mut s.queue),
                    closed: s.closed,
                };
            }
            s.sleeping = true;
            s.idle = deadline.is_none();
            s = match deadline {
                None => self.wake.wait(s).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let timeout = d.saturating_duration_since(Instant::now());
                    self.wake
                        .wait_timeout(s, timeout)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
            };
            s.sleeping = false;
            s.idle = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::Op;
    use crate::writer::pool::Pool;
    use std::sync::Arc;
    use std::time::Duration;

    fn flush(lsn: u64) -> Record {
        Record {
            lsn,
            timestamp_ns: lsn,
            dev: 0,
            op: Op::Flush,
        }
    }

    #[test]
    fn lsns_are_gap_free_in_queue_order_and_stop_at_close() {
        let pool = Pool::new(1 << 20).unwrap();
        let intake = Intake::new(7);
        for _ in 0..3 {
            intake.append(flush, pool.empty_permit(), false).unwrap();
        }
        let batch = intake.next_batch(None);
        let lsns: Vec<u64> = batch.records.iter().map(|p| p.record.lsn).collect();
        assert_eq!(lsns, vec![7, 8, 9]);
        assert_eq!(intake.close(), 9);
        assert!(intake.append(flush, pool.empty_permit(), false).is_none());
        assert!(
            intake
                .next_batch(Some(Instant::now() + Duration::from_secs(60)))
                .closed
        );
    }

    /// With a deadline, records wait for it (no wake per record); urgent ones do not.
    #[test]
    fn the_encoder_sleeps_until_its_deadline_unless_urgent() {
        let pool = Pool::new(1 << 20).unwrap();
        let intake = Arc::new(Intake::new(1));
        let consumer = {
            let intake = intake.clone();
            std::thread::spawn(move || {
                let start = Instant::now();
                let batch = intake.next_batch(Some(start + Duration::from_millis(200)));
                (start.elapsed(), batch.records.len())
            })
        };
        std::thread::sleep(Duration::from_millis(20));
        intake.append(flush, pool.empty_permit(), false).unwrap();
        let (waited, n) = consumer.join().unwrap();
        assert!(
            waited >= Duration::from_millis(190),
            "woke early: {waited:?}"
        );
        assert_eq!(n, 1);

        let consumer = {
            let intake = intake.clone();
            std::thread::spawn(move || {
                let start = Instant::now();
                intake.next_batch(Some(start + Duration::from_secs(30)));
                start.elapsed()
            })
        };
        std::thread::sleep(Duration::from_millis(20));
        intake.append(flush, pool.empty_permit(), true).unwrap();
        assert!(consumer.join().unwrap() < Duration::from_secs(5));
    }
}
