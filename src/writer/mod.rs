//! Writer: the primary side of replication. The primary core ([`primary::PrimaryCore`])
//! applies client I/O to the primary disk under a range lock, charges each acknowledged
//! change to the memory pool and hands it, in LSN order, to the journal writer, which cuts
//! segments and uploads them with W in flight. What cannot be journaled is tracked as dirty
//! regions and reported by the mode.
//!
//! ```text
//! frontend ─► primary core ─► range lock ─► primary disk
//!                  │ pool permit, LSN + timestamp (intake mutex)
//!                  ▼
//!               intake ══ batches ══► encoder thread ── closed segments ──► upload
//!                                     (SegmentBuilder,                    coordinator
//!                                      linger, zstd)                      (≤ W PUTs, durable
//!                                                                          prefix, fencing)
//! ```
//!
//! Locks: the range lock's mutex and the intake's mutex are never held together (the core
//! queues the record while holding the *range* only as a lease, not its mutex); no lock is
//! held across an await. Threads: the async runtime (I/O path, coordinator, uploads) and
//! one encoder thread.
//!
//! Must never: block or fail the primary's I/O because of the journal (in async mode a write
//! that cannot be journaled still completes; it is marked dirty); let the journal's order
//! differ from the disk's; let pool memory pass its cap (one `RESYNC_BEGIN` aside).

pub mod control_records;
pub mod dirty;
pub mod encoder;
pub mod intake;
pub mod journal_writer;
pub mod lag_histogram;
pub mod lease;
pub mod mode;
pub mod pool;
pub mod primary;
pub mod range_lock;
pub mod restart;
pub mod status;
