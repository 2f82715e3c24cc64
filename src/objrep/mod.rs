//! The object replica: a replica kept as immutable objects in a store (`replay --replica
//! s3://…`), with no disk and no undo log — its layers are its history (docs/DESIGN.md,
//! "Object replica").
//!
//! [`layer`] encodes the net effect of a run of records (a delta layer), [`manifest`] the
//! replica's identity and its manifest generations (live layers and checkpoints), [`agent`]
//! follows the journal and commits checkpoints, [`restore`] writes the image as of a point.
//!
//! Must never: rewrite an object (every key is created once, by conditional create); commit
//! a manifest before every layer it names is durable, or a consumer position before the
//! manifest that holds it; cut a checkpoint inside a resync span; read a layer without
//! checking its magic, UUID, LSN range and CRCs.

pub(crate) mod agent;
pub(crate) mod error;
pub(crate) mod layer;
pub mod manifest;
pub(crate) mod restore;

pub use agent::{ObjectAgent, ObjectAgentConfig};
pub use error::ObjrepError;
pub use manifest::{Checkpoint, LayerRef, ReplicaIdentity, ReplicaManifest};
pub use restore::{ObjPoint, ObjSources};
