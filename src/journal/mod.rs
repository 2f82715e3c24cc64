//! Journal: records, the segment codec, keys, manifest, epochs, consumers, reading.
//!
//! Must never: overwrite a segment or the manifest; accept an object whose UUID, seq, LSN
//! range or checksums are not the ones expected.

pub mod paths;
pub mod record;
pub mod segment;

