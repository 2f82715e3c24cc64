//! In-band verify on the replica side: the checksum of a replica region, to compare with a
//! `VERIFY` record's (the primary's bytes at the same point of the order).
//!
//! Must never: hold more than [`CHUNK`] bytes of the replica in memory (a `VERIFY`'s range
//! comes from the journal and is only checked against the replica's size), or write to the
//! replica.

use std::io;

use sha2::Digest as _;

use super::replica::ReplicaTarget;
use crate::journal::record::VerifyChecksum;

/// Bytes read per step.
const CHUNK: u64 = 1 << 20;

/// Whether the replica's bytes `offset..offset + len` hash to `checksum` (SHA-256, as
/// [`VerifyChecksum::of`]).
pub(crate) fn region_matches(
    target: &dyn ReplicaTarget,
    offset: u64,
    len: u64,
    checksum: &VerifyChecksum,
) -> io::Result<bool> {
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; CHUNK.min(len) as usize];
    let mut at = offset;
    let end = offset + len;
    while at < end {
        let n = CHUNK.min(end - at) as usize;
        target.read_at(at, &mut buf[..n])?;
        hasher.update(&buf[..n]);
        at += n as u64;
    }
    let found: [u8; 32] = hasher.finalize().into();
    Ok(VerifyChecksum(found) == *checksum)
}
