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

pub(crate) mod activity_log;
pub(crate) mod control_records;
mod dirty;
mod encoder;
mod intake;
mod io_counts;
mod journal_writer;
mod lag_histogram;
pub(crate) mod lease;
mod mode;
mod pool;
mod primary;
mod range_lock;
pub(crate) mod restart;
mod resync;
// pub: a namespace (`resync_requests::watch`); hoisted, `watch` would not say what it watches.
pub mod resync_requests;
mod shared;
mod status;

pub use activity_log::default_path as default_activity_log_path;
pub use control_records::{
    DemoteArgs, DemoteDone, MarkArgs, MarkDone, RegionList, ResyncArgs, ResyncDone, ServeControl,
    VerifyArgs, VerifyDone,
};
pub use io_counts::{DeviceIoStatus, IoStatus};
pub use journal_writer::WriterConfig;
pub use lag_histogram::{LagBuckets, LagSummary};
pub use lease::LeaseKeeper;
pub use mode::{AckMode, MaxLag, Mode};
pub use pool::MIN_POOL_SIZE;
pub use primary::{
    CatchUp, CoreError, Demoted, HookError, JournalSetup, Labels, OnFence, PrimaryCore, Promotion,
    ShutdownReport,
};
pub use restart::{marker_path as clean_marker_path, take_marker as take_clean_marker};
#[cfg(test)]
pub(crate) use status::tests::sample as sample_status;
pub use status::StatusSnapshot;
