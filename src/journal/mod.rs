//! Journal: records, the segment codec, keys, manifest, epochs, consumers, reading.
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
