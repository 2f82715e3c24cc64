//! Encryption at rest: keys and keyrings ([`key`]), and the sealing of segment payloads and
//! indexes ([`seal`]) that the segment codec calls through narrow hooks. The format and the
//! construction are in DESIGN.md "Encryption at rest".
//!
//! The process keyring: a command that was given `--encryption-key` installs its keyring
//! once, before it touches a store ([`install`]); the codec looks keys up by the id an
//! object's header names and seals new objects with the newest key. One process serves one
//! operator's keyring, so a process-wide registry keeps the key out of the dozens of call
//! paths that read segments (and out of their signatures, logs and errors).
//!
//! Must never: log, print, store or put into an error a key's bytes (only its [`KeyId`]);
//! choose a key for reading other than the one an object names.

pub(crate) mod key;
pub(crate) mod seal;

use std::collections::HashMap;
use std::sync::{OnceLock, RwLock};

pub use key::{generate_key_file, Key, KeyError, KeyId, Keyring};
pub use seal::{ObjectKind, OpenError, Part, SealScope, SEAL_OVERHEAD};

#[derive(Default)]
struct Registry {
    keys: HashMap<KeyId, Key>,
    writing: Option<Key>,
}

fn registry() -> &'static RwLock<Registry> {
    static REGISTRY: OnceLock<RwLock<Registry>> = OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

/// Makes `keyring`'s keys readable by the codec and its newest key the one new objects are
/// sealed with.
pub fn install(keyring: &Keyring) {
    let mut r = crate::sync::write(registry());
    for key in keyring.keys() {
        r.keys.insert(key.id(), key.clone());
    }
    r.writing = Some(keyring.newest().clone());
}

/// Makes `key` readable without making it the writing key (unit tests, which share one
/// process and must not seal each other's plaintext segments).
pub fn register(key: &Key) {
    let mut r = crate::sync::write(registry());
    r.keys.insert(key.id(), key.clone());
}

/// The key with id `id`, if installed.
pub fn lookup(id: KeyId) -> Option<Key> {
    let r = crate::sync::read(registry());
    r.keys.get(&id).cloned()
}

/// The key new objects are sealed with; `None` when the process writes plaintext.
pub fn writing_key() -> Option<Key> {
    let r = crate::sync::read(registry());
    r.writing.clone()
}

/// Ids of every installed key (for messages; never the keys).
pub fn installed_ids() -> Vec<KeyId> {
    let r = crate::sync::read(registry());
    let mut ids: Vec<KeyId> = r.keys.keys().copied().collect();
    ids.sort();
    ids
}
