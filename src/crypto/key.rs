//! Keys and keyring files.
//!
//! # Key file format
//! Text, one key a line: `tinylag-key-1:<64 hex digits>` (32 bytes); blank lines and lines
//! starting with `#` are ignored. Several lines make a keyring: the **last** is the newest
//! (it seals new objects), every line opens old ones. A file of exactly 32 bytes that is not
//! such text is one raw key. The file must not be readable by group or others (mode 0600):
//! such a file is refused, not warned about, since the key may already have leaked.
//!
//! A key's [`KeyId`] is the first 4 bytes of SHA-256(`"tinylag key id v1"` ‖ key), never 0:
//! stored in objects' headers and named in errors; the key is never.
//!
//! Must never: print a key's bytes (`Debug` shows the id only); accept a file others can
//! read; overwrite a key file.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chacha20poly1305::aead::KeyInit;
use chacha20poly1305::XChaCha20Poly1305;
use rand::RngCore;
use sha2::{Digest, Sha256};

/// Length of a key.
pub(crate) const KEY_LEN: usize = 32;
/// Prefix of a key line.
pub(crate) const KEY_LINE_PREFIX: &str = "tinylag-key-1:";

/// A key's public name: 4 bytes of a hash of it, never 0 (0 means "not encrypted" in the
/// segment format).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(pub u32);

impl std::fmt::Display for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:08x}", self.0)
    }
}

/// One key, ready to seal and open.
#[derive(Clone)]
pub struct Key {
    id: KeyId,
    cipher: Arc<XChaCha20Poly1305>,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Key({})", self.id)
    }
}

impl Key {
    pub fn from_bytes(bytes: &[u8; KEY_LEN]) -> Key {
        Key {
            id: key_id(bytes),
            cipher: Arc::new(XChaCha20Poly1305::new(bytes.into())),
        }
    }

    /// A new random key (from the operating system's generator) and its bytes.
    pub fn generate() -> ([u8; KEY_LEN], Key) {
        let mut bytes = [0u8; KEY_LEN];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        let key = Key::from_bytes(&bytes);
        (bytes, key)
    }

    pub fn id(&self) -> KeyId {
        self.id
    }

    pub(crate) fn cipher(&self) -> &XChaCha20Poly1305 {
        &self.cipher
    }
}

fn key_id(bytes: &[u8; KEY_LEN]) -> KeyId {
    let mut h = Sha256::new();
    h.update(b"tinylag key id v1");
    h.update(bytes);
    let d = h.finalize();
    let id = u32::from_le_bytes([d[0], d[1], d[2], d[3]]);
    KeyId(id.max(1))
}

/// The text line of a key (what `key generate` writes).
pub(crate) fn key_line(bytes: &[u8; KEY_LEN]) -> String {
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("{KEY_LINE_PREFIX}{hex}\n")
}

/// Every way loading or writing a key file fails. No variant holds key bytes.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file cannot be opened or read.
    #[error("encryption key file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Group or others have any access to the file.
    #[error(
        "encryption key file {path} is open to group or others (mode {mode:04o}); refusing \
         it: run `chmod 600 {path}` (and consider the key exposed)"
    )]
    TooOpen { path: PathBuf, mode: u32 },
    /// A line is not a key line.
    #[error(
        "encryption key file {path}, line {line}: not a key (expected `{KEY_LINE_PREFIX}` and \
         64 hex digits, as `tinylag key generate` writes)"
    )]
    BadLine { path: PathBuf, line: usize },
    /// No key in the file.
    #[error("encryption key file {path} holds no key")]
    Empty { path: PathBuf },
    /// `key generate` would overwrite a file.
    #[error(
        "{path} exists; refusing to overwrite a key file (use --append to add a key to a keyring)"
    )]
    Exists { path: PathBuf },
}

/// Several keys: the last is the newest and seals; all open.
///
/// # Invariants
/// Never empty; no id twice (a repeated line is kept once, at its last place).
#[derive(Clone, Debug)]
pub struct Keyring {
    keys: Vec<Key>,
}

impl Keyring {
    pub fn new(keys: Vec<Key>) -> Option<Keyring> {
        let mut out: Vec<Key> = Vec::with_capacity(keys.len());
        for k in keys {
            out.retain(|o| o.id() != k.id());
            out.push(k);
        }
        (!out.is_empty()).then_some(Keyring { keys: out })
    }

    /// Reads a key file (format in the module's doc), refusing one others can read.
    pub fn load(path: &Path) -> Result<Keyring, KeyError> {
        let io = |source| KeyError::Io {
            path: path.to_path_buf(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(io)?;
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(KeyError::TooOpen {
                path: path.to_path_buf(),
                mode,
            });
        }
        let data = std::fs::read(path).map_err(io)?;
        Self::parse(path, &data)
    }

    fn parse(path: &Path, data: &[u8]) -> Result<Keyring, KeyError> {
        let text = std::str::from_utf8(data).ok();
        let looks_text = text.is_some_and(|t| {
            t.trim_start().starts_with(KEY_LINE_PREFIX) || t.trim_start().starts_with('#')
        });
        if !looks_text {
            if let Ok(raw) = <[u8; KEY_LEN]>::try_from(data) {
                return Ok(Keyring {
                    keys: vec![Key::from_bytes(&raw)],
                });
            }
        }
        let bad = |line| KeyError::BadLine {
            path: path.to_path_buf(),
            line,
        };
        let text = text.ok_or_else(|| bad(1))?;
        let mut keys = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let hex = line
                .strip_prefix(KEY_LINE_PREFIX)
                .ok_or_else(|| bad(n + 1))?;
            keys.push(Key::from_bytes(&parse_hex(hex).ok_or_else(|| bad(n + 1))?));
        }
        Keyring::new(keys).ok_or_else(|| KeyError::Empty {
            path: path.to_path_buf(),
        })
    }

    pub fn keys(&self) -> &[Key] {
        &self.keys
    }

    /// The key new objects are sealed with.
    pub fn newest(&self) -> &Key {
        // Never empty (invariant).
        &self.keys[self.keys.len() - 1]
    }

    pub fn get(&self, id: KeyId) -> Option<&Key> {
        self.keys.iter().find(|k| k.id() == id)
    }
}

fn parse_hex(hex: &str) -> Option<[u8; KEY_LEN]> {
    if hex.len() != KEY_LEN * 2 || !hex.is_ascii() {
        return None;
    }
    let mut out = [0u8; KEY_LEN];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// Writes a new key to `path`: created with mode 0600, refusing an existing file unless
/// `append` (then the key is added as the newest line of a keyring, whose mode is checked
/// as a load would). Returns the new key's id.
pub fn generate_key_file(path: &Path, append: bool) -> Result<KeyId, KeyError> {
    let io = |source| KeyError::Io {
        path: path.to_path_buf(),
        source,
    };
    let (bytes, key) = Key::generate();
    let mut file = if append {
        // Refuse a keyring others can read before adding to it.
        Keyring::load(path)?;
        std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(io)?
    } else {
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(KeyError::Exists {
                    path: path.to_path_buf(),
                })
            }
            Err(e) => return Err(io(e)),
        }
    };
    // The umask may have narrowed 0600 further, never widened it; set it exactly anyway.
    if !append {
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(io)?;
    }
    file.write_all(key_line(&bytes).as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)?;
    Ok(key.id())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_mode(dir: &Path, name: &str, data: &[u8], mode: u32) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, data).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn generated_file_is_0600_refuses_overwrite_and_appends_a_newest_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        let first = generate_key_file(&p, false).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(
            generate_key_file(&p, false),
            Err(KeyError::Exists { .. })
        ));
        let second = generate_key_file(&p, true).unwrap();
        let ring = Keyring::load(&p).unwrap();
        assert_eq!(ring.keys().len(), 2);
        assert_eq!(ring.newest().id(), second);
        assert!(ring.get(first).is_some());
    }

    #[test]
    fn a_file_others_can_read_is_refused_naming_chmod() {
        let dir = tempfile::tempdir().unwrap();
        let line = key_line(&[7; KEY_LEN]);
        for mode in [0o644, 0o640, 0o604] {
            let p = write_mode(dir.path(), "k", line.as_bytes(), mode);
            let err = Keyring::load(&p).unwrap_err().to_string();
            assert!(err.contains("chmod 600"), "{err}");
            assert!(!err.contains("0707070707"), "the key leaked: {err}");
        }
        let p = write_mode(dir.path(), "k", line.as_bytes(), 0o600);
        assert!(Keyring::load(&p).is_ok());
    }

    #[test]
    fn raw_and_text_forms_give_the_same_key_and_bad_lines_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let raw = write_mode(dir.path(), "raw", &[9; KEY_LEN], 0o600);
        let text = write_mode(
            dir.path(),
            "text",
            format!("# comment\n{}", key_line(&[9; KEY_LEN])).as_bytes(),
            0o600,
        );
        let a = Keyring::load(&raw).unwrap().newest().id();
        let b = Keyring::load(&text).unwrap().newest().id();
        assert_eq!(a, b);
        assert_ne!(a.0, 0);
        let bad = write_mode(dir.path(), "bad", b"tinylag-key-1:zz\n", 0o600);
        let err = Keyring::load(&bad).unwrap_err().to_string();
        assert!(err.contains("line 1"), "{err}");
        let empty = write_mode(dir.path(), "empty", b"# nothing\n", 0o600);
        assert!(matches!(Keyring::load(&empty), Err(KeyError::Empty { .. })));
    }

    #[test]
    fn debug_never_shows_key_bytes() {
        let key = Key::from_bytes(&[0xab; KEY_LEN]);
        let shown = format!("{key:?} {:?}", Keyring::new(vec![key.clone()]).unwrap());
        assert!(
            !shown.contains("ab, ab") && !shown.contains("abab"),
            "{shown}"
        );
    }
}
