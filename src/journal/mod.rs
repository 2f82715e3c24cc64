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

// pub: a namespace (`chain::load`); `load` also names consumer's and mark's.
pub mod chain;
// pub: a namespace (`consumer::load`, `consumer::list`); both collide with chain's and mark's.
pub mod consumer;
pub(crate) mod divergence;
// pub: a namespace (`epoch::claim_next`); hoisted, `claim_next` would not say what it claims.
pub mod epoch;
pub(crate) mod error;
pub(crate) mod head;
pub(crate) mod info;
pub(crate) mod layout;
// pub: a namespace (`lease::read`); `read` also names resync_request's.
pub mod lease;
pub(crate) mod manifest;
// pub: a namespace (`mark::create`, `::load`, `::list`); all three collide with others'.
pub mod mark;
// pub: every object key is built here, named `paths::*_key` (and `paths::objrep`) at call sites.
pub mod paths;
pub(crate) mod reader;
pub(crate) mod record;
// pub: a namespace (`resync_request::create`, `::read`); both collide with mark's and lease's.
pub mod resync_request;
pub(crate) mod seed;
// pub: the codec's constants (`segment::HEADER_LEN`) and decoders read as the segment's.
pub mod segment;
pub(crate) mod verify;

pub use divergence::DivergenceError;
pub use error::{JournalError, JournalResult};
pub use head::{
    check_end, plan_restart_from_trim_pointer, prefix_index, probe_end, KnownEnd, RestartPlan,
};
pub use info::{gather as gather_info, ConsumerLag, HeadInfo, JournalInfo};
pub use layout::{match_named_paths, DeviceLayout, LayoutError, Piece, PlacedDevice};
pub use manifest::{valid_device_name, DeviceSpec, Manifest, ManifestParams};
pub use reader::{Cursor, JournalReader, ReadAhead, Step};
pub use record::{Op, Record, RecordKind, VerifyChecksum};
pub use seed::{RegionRanges, Seed};
pub use verify::verify_journal;
