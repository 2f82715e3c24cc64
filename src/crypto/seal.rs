//! Sealing one unit (a record's stored payload, or a segment's index) with
//! XChaCha20-Poly1305.
//!
//! # Sealed unit layout
//! ```text
//! offset      size  field
//!      0        24  nonce       random (OS-seeded CSPRNG), fresh for every unit
//!     24         n  ciphertext  of the n stored bytes (zstd frame or raw payload; index)
//!   24+n        16  tag         Poly1305
//! ```
//! Nonce construction: random 192-bit nonces, so none repeats for a key however often an
//! object is encoded again (an undo segment rewritten after a crash gets new nonces; a
//! retried upload sends the same bytes), up to ~2^80 units per key with a negligible chance.
//!
//! # Additional data (what a unit is bound to; 55 bytes)
//! ```text
//! "TLAGSEAL1" (9) | kind u8 | key id u32 | uuid (16) | epoch u64 | seq u64 | part u8 | lsn u64
//! ```
//! little-endian; the index's lsn is `u64::MAX` and its epoch 0 (a tail read knows the
//! expected uuid and seq but not the epoch; the epoch is inside the sealed index). A unit
//! moved to another object, kind, journal, seq, record or key fails to open.
//!
//! Must never: open with a key other than the scope's; return bytes whose tag failed.

use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{Tag, XNonce};
use rand::RngCore;
use uuid::Uuid;

use super::key::{Key, KeyId};

pub(crate) const NONCE_LEN: usize = 24;
pub(crate) const TAG_LEN: usize = 16;
/// Bytes sealing adds to a unit.
pub const SEAL_OVERHEAD: usize = NONCE_LEN + TAG_LEN;
const AAD_MAGIC: &[u8; 9] = b"TLAGSEAL1";
const AAD_LEN: usize = 9 + 1 + 4 + 16 + 8 + 8 + 1 + 8;

/// Which kind of object a unit lives in; read from the key an object is read at
/// ([`ObjectKind::of_key`]), never from the object itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ObjectKind {
    JournalSegment = 1,
    UndoSegment = 2,
    ReplicaObject = 3,
}

impl ObjectKind {
    /// The kind of the object at store key `key`.
    pub fn of_key(key: &str) -> ObjectKind {
        if key.starts_with(crate::journal::paths::UNDO_PREFIX) {
            ObjectKind::UndoSegment
        } else {
            ObjectKind::JournalSegment
        }
    }
}

/// Which part of a segment a unit is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Part {
    Payload = 0,
    Index = 1,
}

/// Where a unit belongs: everything its additional data binds but the part and the LSN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SealScope {
    pub kind: ObjectKind,
    pub key_id: KeyId,
    pub uuid: Uuid,
    pub epoch: u64,
    pub seq: u64,
}

/// Why a unit did not open.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// The key the object names is not in the keyring.
    #[error("encrypted with key id {0}, which the keyring (--encryption-key) does not hold")]
    MissingKey(KeyId),
    /// Shorter than a nonce and a tag.
    #[error("sealed {part:?} is {len} bytes, shorter than nonce and tag")]
    Short { part: Part, len: usize },
    /// The tag did not verify: tampered, moved, or sealed with another key of the same id.
    #[error("authentication failed (tampered, moved from another object, or another key)")]
    Auth,
}

impl SealScope {
    fn aad(&self, part: Part, lsn: u64) -> [u8; AAD_LEN] {
        let mut a = [0u8; AAD_LEN];
        a[0..9].copy_from_slice(AAD_MAGIC);
        a[9] = self.kind as u8;
        a[10..14].copy_from_slice(&self.key_id.0.to_le_bytes());
        a[14..30].copy_from_slice(self.uuid.as_bytes());
        a[30..38].copy_from_slice(&self.epoch.to_le_bytes());
        a[38..46].copy_from_slice(&self.seq.to_le_bytes());
        a[46] = part as u8;
        a[46 + 1..].copy_from_slice(&lsn.to_le_bytes());
        a
    }

    /// Seals `unit[NONCE_LEN..]` in place: `unit` is a nonce placeholder followed by the
    /// plaintext; the tag is returned for the caller to append.
    pub fn seal_in_place(&self, key: &Key, part: Part, lsn: u64, unit: &mut [u8]) -> [u8; TAG_LEN] {
        debug_assert_eq!(key.id(), self.key_id);
        let (nonce, data) = unit.split_at_mut(NONCE_LEN);
        rand::thread_rng().fill_bytes(nonce);
        let nonce = XNonce::clone_from_slice(nonce);
        let tag = key
            .cipher()
            .encrypt_in_place_detached(&nonce, &self.aad(part, lsn), data)
            // Only a plaintext longer than 256 GiB fails; units are at most 64 MiB.
            .expect("XChaCha20-Poly1305 seals any unit under 256 GiB");
        tag.into()
    }

    /// Seals `plain` into a new buffer (`nonce | ciphertext | tag`).
    pub fn seal(&self, key: &Key, part: Part, lsn: u64, plain: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(plain.len() + SEAL_OVERHEAD);
        out.extend_from_slice(&[0; NONCE_LEN]);
        out.extend_from_slice(plain);
        let tag = self.seal_in_place(key, part, lsn, &mut out);
        out.extend_from_slice(&tag);
        out
    }

    /// Opens a sealed unit with the process keyring's key of this scope's id.
    pub fn open(&self, part: Part, lsn: u64, sealed: &[u8]) -> Result<Vec<u8>, OpenError> {
        let key = super::lookup(self.key_id).ok_or(OpenError::MissingKey(self.key_id))?;
        self.open_with(&key, part, lsn, sealed)
    }

    /// Opens a sealed unit with `key`.
    pub fn open_with(
        &self,
        key: &Key,
        part: Part,
        lsn: u64,
        sealed: &[u8],
    ) -> Result<Vec<u8>, OpenError> {
        if key.id() != self.key_id {
            return Err(OpenError::MissingKey(self.key_id));
        }
        if sealed.len() < SEAL_OVERHEAD {
            return Err(OpenError::Short {
                part,
                len: sealed.len(),
            });
        }
        let (nonce, rest) = sealed.split_at(NONCE_LEN);
        let (ct, tag) = rest.split_at(rest.len() - TAG_LEN);
        let mut out = ct.to_vec();
        key.cipher()
            .decrypt_in_place_detached(
                XNonce::from_slice(nonce),
                &self.aad(part, lsn),
                &mut out,
                Tag::from_slice(tag),
            )
            .map_err(|_| OpenError::Auth)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope(key: &Key) -> SealScope {
        SealScope {
            kind: ObjectKind::JournalSegment,
            key_id: key.id(),
            uuid: Uuid::from_u128(7),
            epoch: 3,
            seq: 11,
        }
    }

    #[test]
    fn a_unit_opens_only_where_it_was_sealed() {
        let key = Key::from_bytes(&[1; 32]);
        let s = scope(&key);
        let sealed = s.seal(&key, Part::Payload, 42, b"hello block");
        assert_eq!(sealed.len(), 11 + SEAL_OVERHEAD);
        assert!(!sealed.windows(5).any(|w| w == b"hello"));
        assert_eq!(
            s.open_with(&key, Part::Payload, 42, &sealed).unwrap(),
            b"hello block"
        );
        // Every bound field, changed, fails.
        let moved = [
            SealScope { seq: 12, ..s },
            SealScope { epoch: 4, ..s },
            SealScope {
                uuid: Uuid::from_u128(8),
                ..s
            },
            SealScope {
                kind: ObjectKind::UndoSegment,
                ..s
            },
        ];
        for m in moved {
            assert_eq!(
                m.open_with(&key, Part::Payload, 42, &sealed),
                Err(OpenError::Auth)
            );
        }
        assert_eq!(
            s.open_with(&key, Part::Payload, 43, &sealed),
            Err(OpenError::Auth)
        );
        assert_eq!(
            s.open_with(&key, Part::Index, 42, &sealed),
            Err(OpenError::Auth)
        );
        for i in 0..sealed.len() {
            let mut t = sealed.clone();
            t[i] ^= 0x10;
            assert_eq!(
                s.open_with(&key, Part::Payload, 42, &t),
                Err(OpenError::Auth),
                "byte {i}"
            );
        }
        let other = Key::from_bytes(&[2; 32]);
        assert_eq!(
            s.open_with(&other, Part::Payload, 42, &sealed),
            Err(OpenError::MissingKey(key.id()))
        );
    }

    #[test]
    fn sealing_the_same_unit_twice_uses_fresh_nonces() {
        let key = Key::from_bytes(&[1; 32]);
        let s = scope(&key);
        let a = s.seal(&key, Part::Index, u64::MAX, &[0; 64]);
        let b = s.seal(&key, Part::Index, u64::MAX, &[0; 64]);
        assert_ne!(a[..NONCE_LEN], b[..NONCE_LEN]);
        assert_ne!(a, b);
    }

    #[test]
    fn a_key_not_in_the_process_keyring_is_named() {
        let key = Key::from_bytes(&[0x5a; 32]);
        let s = scope(&key);
        let sealed = s.seal(&key, Part::Payload, 1, b"x");
        assert_eq!(
            s.open(Part::Payload, 1, &sealed),
            Err(OpenError::MissingKey(key.id()))
        );
        crate::crypto::register(&key);
        assert_eq!(s.open(Part::Payload, 1, &sealed).unwrap(), b"x");
    }
}
