//! Every way the object replica fails; each message names the object or the point.
//!
//! Must never: carry a credential or payload bytes in a message.

use crate::journal::JournalError;
use crate::replayer::apply::ApplyError;
use crate::replayer::replica::ReplicaError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ObjrepError {
    /// A layer or manifest whose bytes are not what its key and format promise.
    #[error("object {key} in {store} is corrupt: {reason}")]
    Corrupt {
        store: String,
        key: String,
        reason: String,
    },
    /// A sealed layer that did not open: its key is not in the keyring, or it was tampered
    /// with or moved.
    #[error("object {key} in {store}: {error}")]
    Sealed {
        store: String,
        key: String,
        error: crate::crypto::OpenError,
    },
    /// An object a manifest names is missing.
    #[error("object {key} named by manifest {manifest} is missing from {store}")]
    Missing {
        store: String,
        key: String,
        manifest: String,
    },
    /// The replica root belongs to another journal or consumer.
    #[error("object replica {store} {reason}")]
    Foreign { store: String, reason: String },
    /// Another agent committed the manifest generation this one was about to.
    #[error(
        "object replica {store}: manifest generation {gen} was created by another agent; \
         one agent writes an object replica (stop the other one)"
    )]
    Raced { store: String, gen: u64 },
    /// The replica has no checkpoint yet.
    #[error("object replica {store} has no checkpoint yet (run `tinylag replay --replica {store}` until it commits one)")]
    NoCheckpoint { store: String },
    /// What is asked cannot be done, and why (a point outside the window, a trimmed journal).
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error(transparent)]
    Replica(#[from] ReplicaError),
}

pub(crate) type ObjrepResult<T> = Result<T, ObjrepError>;
