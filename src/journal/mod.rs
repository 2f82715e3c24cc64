//! Journal: records, the segment codec, keys, manifest, epochs, consumers, reading.
//!
//! - `record`: the record kinds (DESIGN.md, "Record kinds"); `segment`: the codec, its byte
//!   layout documented on the types; `paths`: every object key (nowhere else builds one);
//! - `manifest`, `epoch`, `chain` (the epoch chain, branches), `lease`, `mark`, `consumer`
//!   (commit positions and the trim pointer), `seed`, `resync_request`, `layout` (a
//!   consistency group's devices in one address space);
//! - `head`: where the log ends, by O(log n) HEAD probes, and whether a missing seq is a hole
//!   or the end (the known end); `head::gallop_end` is the one end-of-log search, for the
//!   journal and the undo logs alike;
//! - `reader`: ordered reading by predicted key, and `ReadAhead`, several segment reads in
//!   flight (the replay agent, restore and `mount --at` read through it);
//! - `verify`, `info`, `divergence`: `journal verify`, `journal info` and rejoin's fork.
//!
//! A writer claims `epochs/<n+1>` by conditional create, asks `head::plan_restart` where to
//! continue, and plugs the holes a dead writer left (empty segments whose `next_seq` sends
//! readers over orphans); an upload is its conditional create and nothing else, so a refused
//! create means the writer has been fenced.
//!
//! Must never: overwrite a segment or the manifest; accept an object whose UUID, seq, LSN
//! range or checksums are not the ones expected; build an object key outside [`paths`].

pub mod chain;
pub mod consumer;
pub(crate) mod divergence;
pub mod epoch;
pub(crate) mod error;
pub mod head;
pub mod info;
pub mod layout;
pub mod lease;
pub(crate) mod manifest;
pub mod mark;
pub mod paths;
pub mod reader;
pub(crate) mod record;
pub mod resync_request;
pub mod seed;
pub mod segment;
pub(crate) mod verify;

pub use divergence::DivergenceError;
pub use error::{JournalError, JournalResult};
pub use manifest::{valid_device_name, DeviceSpec, Manifest, ManifestParams};
pub use record::{Op, Record, RecordKind, VerifyChecksum};
pub use verify::verify_journal;
