//! The object replica: a replica kept as immutable objects in a store (`replay --replica
//! s3://…`), with no disk and no undo log — its layers are its history (docs/DESIGN.md,
//! "Object replica").
//!
//! [`layer`] encodes the net effect of a run of records (a delta layer, and in the same
//! format an image part), [`manifest`] the replica's identity and its manifest generations
//! (live layers, images and checkpoints; [`ReplicaManifest::sources`], what holds a point),
//! [`agent`] follows the journal and commits checkpoints, [`restore`] writes the image as of
//! a point ([`materialize`]: onto the local file or device a `promote` makes the primary),
//! [`view`] serves a point lazily (`mount --replica URI`) through the bounded local
//! [`cache`], [`image`] builds an image window by window, [`compact`] and [`trim`] are the
//! `tinylag replica` jobs that fold layers into images and delete what no retained point
//! needs.
//!
//! Must never: rewrite an object (every key is created once, by conditional create); commit
//! a manifest before every layer it names is durable, or a consumer position before the
//! manifest that holds it; cut a checkpoint inside a resync span; read a layer without
//! checking its magic, UUID, LSN range and CRCs; delete an object the current or the
//! previous manifest generation names.

pub(crate) mod agent;
pub(crate) mod cache;
pub(crate) mod compact;
pub(crate) mod error;
pub(crate) mod image;
pub(crate) mod layer;
// pub: a namespace (`manifest::load_latest`); hoisted, it would read as the journal manifest's.
pub mod manifest;
pub(crate) mod materialize;
pub(crate) mod restore;
pub(crate) mod trim;
pub(crate) mod view;

pub use agent::{ObjectAgent, ObjectAgentConfig};
pub use cache::DiskCache;
pub use compact::{compact, CompactConfig, CompactReport};
pub use error::ObjrepError;
pub use image::ImageStats;
pub use manifest::{Checkpoint, ImagePart, ImageRef, LayerRef, ReplicaIdentity, ReplicaManifest};
pub use materialize::{MaterializeTarget, Materialized};
pub use restore::{ObjPoint, ObjSources};
pub use trim::{trim, TrimConfig, TrimReport};
pub use view::{MountPoint, ObjView, ObjViewSummary};
