//! The manifest (`tinylag.json`): what a journal replicates and how it is laid out.
//!
//! A journal replicates one device or a consistency group of several (DESIGN.md,
//! "Consistency groups"). Devices named at `init` are in the manifest; a device added later
//! (`journal add-device`) is its own object `devices/<index>`, created once by conditional
//! create at the next free index, and [`Manifest::load`] appends those in index order. So a
//! device's index — the `dev` of its records — never changes.
//!
//! Must never: be written twice. It is created once by conditional create; every reader
//! checks the format version and refuses a newer one.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::error::{JournalError, JournalResult};
use super::paths;
use crate::store::ObjectStore;

/// The format version this build writes and reads.
pub(crate) const FORMAT_VERSION: u32 = 1;

/// Most devices one group journal may hold.
pub(crate) const MAX_DEVICES: usize = 64;

/// One device of the consistency group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceSpec {
    /// Name of the device (the NBD export name by default).
    pub name: String,
    /// Size in bytes; a multiple of the block size.
    pub size: u64,
}

/// The manifest, stored as pretty JSON so an operator can read it with `cat`:
///
/// ```json
/// { "format_version": 1, "uuid": "…", "devices": [{"name": "disk0", "size": 4294967296}],
///   "block_size": 4096, "region_size": 4194304, "splay_width": 4,
///   "segment_size": 8388608, "created_ns": 1795000000000000000 }
/// ```
///
/// # Invariants
/// - `block_size` is 512 or 4096; every device size is a non-zero multiple of it.
/// - `region_size` is a power of two and a multiple of `block_size`.
/// - `1 <= splay_width <= 256`; `64 KiB <= segment_size <= 1 GiB`.
/// - 1 to [`MAX_DEVICES`] devices, with distinct names.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    /// Device-group UUID; every segment carries it, and readers refuse any other.
    pub uuid: Uuid,
    pub devices: Vec<DeviceSpec>,
    pub block_size: u32,
    pub region_size: u64,
    pub splay_width: u32,
    pub segment_size: u64,
    /// Creation time, ns since the UNIX epoch.
    pub created_ns: u64,
    /// Present when the journal is encrypted at rest (chosen at `init`, for the journal's
    /// life): every segment is sealed, and a writer or reader without a key is refused at
    /// start. Absent (and not written) for a plaintext journal, whose manifest stays
    /// byte-for-byte what it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<ManifestEncryption>,
}

/// What an encrypted journal's manifest says about its keys: ids only, never a key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestEncryption {
    /// The id (8 hex digits) of the key that was newest at `init`: the one a command
    /// without a key is told it needs. Later segments may name newer keys of the keyring.
    pub since_key: String,
}

/// What `init` takes from the operator.
#[derive(Clone, Debug)]
pub struct ManifestParams {
    pub device_name: String,
    pub size: u64,
    pub block_size: u32,
    pub region_size: u64,
    pub splay_width: u32,
    pub segment_size: u64,
}

impl Manifest {
    /// Builds and validates a new manifest with a fresh UUID.
    pub fn new(params: &ManifestParams, created_ns: u64) -> JournalResult<Manifest> {
        let manifest = Manifest {
            format_version: FORMAT_VERSION,
            uuid: Uuid::new_v4(),
            devices: vec![DeviceSpec {
                name: params.device_name.clone(),
                size: params.size,
            }],
            block_size: params.block_size,
            region_size: params.region_size,
            splay_width: params.splay_width,
            segment_size: params.segment_size,
            created_ns,
            encryption: None,
        };
        manifest.validate()?;
        Ok(manifest)
    }

    /// A group journal of `devices` (index = order given), laid out as `params` says;
    /// `params.device_name` and `params.size` are not used. Names must be valid new device
    /// names ([`valid_device_name`]).
    pub fn new_group(
        params: &ManifestParams,
        devices: Vec<DeviceSpec>,
        created_ns: u64,
    ) -> JournalResult<Manifest> {
        for d in &devices {
            check_new_device_name(&d.name)?;
        }
        let manifest = Manifest {
            format_version: FORMAT_VERSION,
            uuid: Uuid::new_v4(),
            devices,
            block_size: params.block_size,
            region_size: params.region_size,
            splay_width: params.splay_width,
            segment_size: params.segment_size,
            created_ns,
            encryption: None,
        };
        manifest.validate()?;
        Ok(manifest)
    }

    /// Where each device lives in the group's address space.
    pub fn layout(&self) -> super::layout::DeviceLayout {
        super::layout::DeviceLayout::of(self)
    }

    /// Adds a device to the journal in `store` at the next free index and returns the
    /// manifest with it. Refused when the name is taken or invalid, the size is not a
    /// multiple of the block size, or the group is full; a concurrent add that took the
    /// index first makes this one fail (run it again), never renumbers anything.
    pub async fn add_device(
        store: &dyn ObjectStore,
        device: DeviceSpec,
    ) -> JournalResult<Manifest> {
        check_new_device_name(&device.name)?;
        let mut manifest = Manifest::load(store).await?;
        let index = manifest.devices.len();
        manifest.devices.push(device.clone());
        manifest.validate()?;
        let json = serde_json::to_vec_pretty(&device).expect("a device spec serializes");
        let key = paths::device_key(index);
        match store.put_if_absent(&key, Bytes::from(json)).await {
            Ok(()) => Ok(manifest),
            Err(e) if e.is_already_exists() => Err(JournalError::InvalidParameter {
                name: "device",
                reason: format!(
                    "another add-device took index {index} ({key}) at the same time; run the \
                     command again"
                ),
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// Checks the invariants.
    pub fn validate(&self) -> JournalResult<()> {
        let bad = |name, reason: String| Err(JournalError::InvalidParameter { name, reason });
        if self.block_size != 512 && self.block_size != 4096 {
            return bad(
                "block-size",
                format!("{} (use 512 or 4096)", self.block_size),
            );
        }
        if self.devices.is_empty() {
            return bad("devices", "a journal needs at least one device".into());
        }
        if self.devices.len() > MAX_DEVICES {
            return bad(
                "device",
                format!(
                    "{} devices (a group holds at most {MAX_DEVICES})",
                    self.devices.len()
                ),
            );
        }
        for (i, d) in self.devices.iter().enumerate() {
            if self.devices[..i].iter().any(|other| other.name == d.name) {
                return bad(
                    "device",
                    format!("the name {:?} is used by two devices", d.name),
                );
            }
            if d.size == 0 || d.size % u64::from(self.block_size) != 0 {
                return bad(
                    "size",
                    format!(
                        "{} bytes for device {:?} (must be a non-zero multiple of the block size {})",
                        d.size, d.name, self.block_size
                    ),
                );
            }
        }
        if !self.region_size.is_power_of_two() || self.region_size < u64::from(self.block_size) {
            return bad(
                "region-size",
                format!(
                    "{} (must be a power of two, at least the block size)",
                    self.region_size
                ),
            );
        }
        if !(1..=256).contains(&self.splay_width) {
            return bad("splay", format!("{} (use 1 to 256)", self.splay_width));
        }
        if !(64 << 10..=1 << 30).contains(&self.segment_size) {
            return bad(
                "segment-size",
                format!("{} bytes (use 64K to 1G)", self.segment_size),
            );
        }
        Ok(())
    }

    /// Size of device `dev`, if it exists.
    pub fn device_size(&self, dev: u32) -> Option<u64> {
        self.devices.get(dev as usize).map(|d| d.size)
    }

    /// Key of segment `seq` in this journal.
    pub fn segment_key(&self, seq: u64) -> String {
        paths::segment_key(seq, self.splay_width)
    }

    /// Writes the manifest with a conditional create; an existing journal is refused.
    pub async fn create(&self, store: &dyn ObjectStore) -> JournalResult<()> {
        self.validate()?;
        let json = serde_json::to_vec_pretty(self).map_err(|e| JournalError::Malformed {
            journal: store.describe(),
            key: paths::MANIFEST.into(),
            what: "manifest",
            reason: e.to_string(),
        })?;
        match store
            .put_if_absent(paths::MANIFEST, Bytes::from(json))
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if e.is_already_exists() => Err(JournalError::AlreadyInitialized {
                journal: store.describe(),
                key: paths::MANIFEST.into(),
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// Reads and checks the manifest of the journal in `store`.
    pub async fn load(store: &dyn ObjectStore) -> JournalResult<Manifest> {
        let data = match store.get(paths::MANIFEST).await {
            Ok(d) => d,
            Err(e) if e.is_not_found() => {
                return Err(JournalError::NotInitialized {
                    journal: store.describe(),
                    key: paths::MANIFEST.into(),
                })
            }
            Err(e) => return Err(e.into()),
        };
        let malformed = |reason: String| JournalError::Malformed {
            journal: store.describe(),
            key: paths::MANIFEST.into(),
            what: "manifest",
            reason,
        };
        // Check the version before the shape, so a newer format gets the clear message.
        let probe: serde_json::Value =
            serde_json::from_slice(&data).map_err(|e| malformed(e.to_string()))?;
        let version = probe
            .get("format_version")
            .and_then(|v| v.as_u64())
            .ok_or_else(|| malformed("no format_version".into()))?;
        if version != u64::from(FORMAT_VERSION) {
            return Err(JournalError::UnsupportedVersion {
                journal: store.describe(),
                found: version.min(u64::from(u32::MAX)) as u32,
                supported: FORMAT_VERSION,
            });
        }
        let mut manifest: Manifest =
            serde_json::from_value(probe).map_err(|e| malformed(e.to_string()))?;
        manifest.validate().map_err(|e| malformed(e.to_string()))?;
        manifest.load_added_devices(store).await?;
        Ok(manifest)
    }
}

impl Manifest {
    /// Marks a new manifest encrypted when the process holds a keyring (`--encryption-key`
    /// at `init`): the journal is encrypted for its whole life.
    pub fn encrypt_if_keyed(&mut self) {
        self.encryption = crate::crypto::writing_key().map(|k| ManifestEncryption {
            since_key: k.id().to_string(),
        });
    }

    /// For a command that reads payloads: an encrypted journal needs a key, refused at once
    /// (naming the key id) rather than at its first sealed object.
    pub fn check_key_for_reading(&self, journal: &str) -> JournalResult<()> {
        match &self.encryption {
            Some(e) if crate::crypto::writing_key().is_none() => Err(JournalError::KeyNeeded {
                journal: journal.to_string(),
                key_id: e.since_key.clone(),
            }),
            _ => Ok(()),
        }
    }

    /// For a writer: an encrypted journal needs a key, and a plaintext one must not get
    /// one (so no journal, and no epoch, mixes sealed and plaintext segments).
    pub fn check_key_for_writing(&self, journal: &str) -> JournalResult<()> {
        self.check_key_for_reading(journal)?;
        if self.encryption.is_none() && crate::crypto::writing_key().is_some() {
            return Err(JournalError::PlaintextJournalGivenKey {
                journal: journal.to_string(),
            });
        }
        Ok(())
    }
}

impl Manifest {
    /// Appends the devices `journal add-device` created, in index order: one GET per added
    /// device and one that finds the next index free.
    async fn load_added_devices(&mut self, store: &dyn ObjectStore) -> JournalResult<()> {
        loop {
            let key = paths::device_key(self.devices.len());
            let data = match store.get(&key).await {
                Ok(d) => d,
                Err(e) if e.is_not_found() => return Ok(()),
                Err(e) => return Err(e.into()),
            };
            let malformed = |reason: String| JournalError::Malformed {
                journal: store.describe(),
                key: key.clone(),
                what: "device",
                reason,
            };
            let device: DeviceSpec =
                serde_json::from_slice(&data).map_err(|e| malformed(e.to_string()))?;
            self.devices.push(device);
            self.validate().map_err(|e| malformed(e.to_string()))?;
        }
    }
}

/// Device names: what NBD clients ask for as the export name, and what `--primary
/// NAME=PATH` and `--replica NAME=PATH` match on. The consumer-name rule (1 to 64 of
/// `[A-Za-z0-9._-]`, not starting with `.`) keeps them safe in paths and on command lines.
pub fn valid_device_name(name: &str) -> bool {
    paths::valid_consumer_name(name)
}

fn check_new_device_name(name: &str) -> JournalResult<()> {
    if valid_device_name(name) {
        Ok(())
    } else {
        Err(JournalError::InvalidParameter {
            name: "device",
            reason: format!(
                "invalid device name {name:?}: use 1 to 64 of A-Z a-z 0-9 . _ - (not starting \
                 with .)"
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;

    fn params() -> ManifestParams {
        ManifestParams {
            device_name: "disk0".into(),
            size: 64 << 20,
            block_size: 4096,
            region_size: 4 << 20,
            splay_width: 4,
            segment_size: 8 << 20,
        }
    }

    #[tokio::test]
    async fn created_once_and_loaded_back() {
        let store = MemoryStore::new();
        let m = Manifest::new(&params(), 1).unwrap();
        m.create(&store).await.unwrap();
        assert_eq!(Manifest::load(&store).await.unwrap(), m);
        let again = Manifest::new(&params(), 2).unwrap();
        let err = again.create(&store).await.unwrap_err();
        assert!(
            matches!(err, JournalError::AlreadyInitialized { .. }),
            "{err}"
        );
        assert_eq!(
            Manifest::load(&store).await.unwrap(),
            m,
            "first manifest kept"
        );
    }

    #[tokio::test]
    async fn missing_newer_and_garbage_manifests_are_refused() {
        let store = MemoryStore::new();
        assert!(matches!(
            Manifest::load(&store).await,
            Err(JournalError::NotInitialized { .. })
        ));
        store
            .put(
                paths::MANIFEST,
                Bytes::from_static(b"{\"format_version\": 9}"),
            )
            .await
            .unwrap();
        assert!(matches!(
            Manifest::load(&store).await,
            Err(JournalError::UnsupportedVersion { found: 9, .. })
        ));
        store
            .put(paths::MANIFEST, Bytes::from_static(b"\x00garbage"))
            .await
            .unwrap();
        assert!(matches!(
            Manifest::load(&store).await,
            Err(JournalError::Malformed { .. })
        ));
    }

    #[tokio::test]
    async fn a_group_keeps_its_device_indexes_and_grows_only_at_the_end() {
        let store = MemoryStore::new();
        let spec = |name: &str, size| DeviceSpec {
            name: name.into(),
            size,
        };
        let m = Manifest::new_group(
            &params(),
            vec![spec("wal", 8 << 20), spec("data", 64 << 20)],
            1,
        )
        .unwrap();
        m.create(&store).await.unwrap();
        let grown = Manifest::add_device(&store, spec("logs", 4 << 20))
            .await
            .unwrap();
        let loaded = Manifest::load(&store).await.unwrap();
        assert_eq!(loaded, grown);
        let names: Vec<&str> = loaded.devices.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["wal", "data", "logs"]);
        let err = Manifest::add_device(&store, spec("data", 4 << 20))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("used by two devices"), "{err}");
        let err = Manifest::add_device(&store, spec("bad/name", 4 << 20))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("invalid device name"), "{err}");
        assert_eq!(
            Manifest::load(&store).await.unwrap(),
            grown,
            "refusals add nothing"
        );
        let twice = Manifest::new_group(&params(), vec![spec("a", 4096), spec("a", 4096)], 1);
        assert!(twice
            .unwrap_err()
            .to_string()
            .contains("used by two devices"));
    }

    #[test]
    fn bad_parameters_name_the_flag() {
        let mut p = params();
        p.block_size = 1000;
        let e = Manifest::new(&p, 0).unwrap_err().to_string();
        assert!(e.contains("block-size"), "{e}");
        let mut p = params();
        p.size = 4097;
        assert!(Manifest::new(&p, 0)
            .unwrap_err()
            .to_string()
            .contains("size"));
        let mut p = params();
        p.region_size = 3 << 20;
        assert!(Manifest::new(&p, 0)
            .unwrap_err()
            .to_string()
            .contains("region-size"));
        let mut p = params();
        p.splay_width = 0;
        assert!(Manifest::new(&p, 0)
            .unwrap_err()
            .to_string()
            .contains("splay"));
    }
}
