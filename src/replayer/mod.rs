//! The replay agent: follows a journal onto a replica image, optionally hours behind, and
//! keeps the pre-images (undo log) that let crash recovery and time travel walk it back.
//!
//! - [`agent`]: waiting out the delay, batching and committing;
//! - `fetcher`: reading the journal ahead of the agent (through `journal::reader::ReadAhead`);
//! - [`apply`]: what each record kind does to the replica;
//! - [`overlay`]: the net effect of a batch, applied in offset order;
//! - [`preimage`]: reading what a batch is about to overwrite;
//! - [`undo`]: the undo log (its manifest and segments, in the journal's segment codec);
//! - [`generation`]: the file a local undo log's writer bumps per durable segment, so a mount
//!   beside it probes the store only when something was written;
//! - [`recovery`]: undoing what a crash left past the last consistent commit;
//! - [`rejoin`]: what an old primary's image diverged in since the fork, and where it starts;
//! - [`replica`]: the replica file or block device;
//! - [`group_replica`]: a consistency group's replica set (one image per device) as one target;
//! - `uring`: reading a batch's pre-images with io_uring (or `pread`, the fallback);
//! - [`status`]: what the agent reports on its control socket;
//! - [`timing`]: the timer the agent and fetcher sleep on, and how often they poll.
//!
//! Must never: touch the replica before the undo record of the change is durable; commit a
//! position the replica has not fsync'd; apply a record from a segment that failed
//! verification (CRC, UUID, seq, LSN) or before its `timestamp + delay`; leave the replica,
//! after recovery, in a state the primary never had.

pub(crate) mod agent;
pub(crate) mod apply;
pub(crate) mod error;
mod fetcher;
pub(crate) mod generation;
pub(crate) mod group_replica;
pub(crate) mod overlay;
pub(crate) mod preimage;
pub(crate) mod recovery;
// pub: a namespace (`rejoin::plan`); hoisted, `plan` would not say what it plans.
pub mod rejoin;
pub(crate) mod replica;
pub(crate) mod seed;
pub(crate) mod status;
pub(crate) mod timing;
pub(crate) mod undo;
mod uring;
pub(crate) mod verify;

pub use agent::{Agent, AgentConfig, BatchLimits, Outcome};
pub use error::ReplayError;
pub use group_replica::GroupReplica;
pub use recovery::{wind_back, CannotWindBack, RecoveryReport, WindBackReport, WindTarget};
pub use replica::{ReplicaFile, ReplicaTarget};
pub use seed::{SeedChoice, SeedStamp};
pub use status::{render_text, AgentState, ReplicaStatus, StatusBoard, StatusHandler};
pub use timing::{PollPolicy, Timer, TokioTimer};
pub use undo::UndoLog;

#[cfg(test)]
mod tests;
