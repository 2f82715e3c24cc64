//! Time travel: the disk as it was at any point inside the restorable window, which runs
//! from the oldest undo record to the journal's head (with holes inside unfinished resync
//! spans, states the primary never had).
//!
//! - [`sources`]: the journal, the replica's consumer position and its undo log; the window;
//!   turning `--at TIME` / `--mark NAME` into a point (an LSN);
//! - [`restore`]: a new image file as of a point (sparse copy, then undo or journal);
//! - [`timeline`]: the window, its holes, the marks and where the replica stands;
//! - [`view`]: `mount --at`: a read-only (or copy-on-write) block device as of a point,
//!   served by the NBD server without a full copy;
//! - [`extents`]: the extent map `view` reads through;
//! - [`diff`]: the extents changed between two points, from segment indexes alone;
//! - [`rbd_diff`]: Ceph's "rbd diff v1" stream (`export-diff`, `import-diff`);
//! - `copy`: the sparse copy.
//!
//! Must never: write to the replica, the undo log or the journal; produce or serve a state
//! that is not exactly the one the primary had at the point; read a whole journal, undo log
//! or image into memory.

mod copy;
pub(crate) mod diff;
pub(crate) mod error;
pub(crate) mod extents;
// pub: a namespace (`rbd_diff::parse`, `rbd_diff::Writer`); hoisted, the names say nothing.
pub mod rbd_diff;
// pub: a namespace (`restore::plan`); hoisted, `plan` would not say what it plans.
pub mod restore;
pub(crate) mod sources;
pub(crate) mod timeline;
pub(crate) mod view;

pub use diff::{changed_extents, diff_between, ChangedExtent, Diff, LiveRange, READ_AHEAD};
pub use error::{TimeTravelError, TimeTravelResult};
pub use sources::{Point, Sources, Target, Window};
pub use timeline::{gather as gather_timeline, At, HoleAt, MarkAt, Timeline};
pub use view::{TimeView, ViewSummary};
