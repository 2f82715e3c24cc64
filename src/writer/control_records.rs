//! What `serve` answers on its control socket, in one place: `status` (with the lease and
//! the NBD server's buffer budget),
//! `mark` (a named point), `verify` (in-band verify: `VERIFY` records of regions, paced) and
//! `resync` (regions re-journaled as a resync span) and `demote` (the epoch ends with a
//! `DEMOTE` record and the lease is released: a planned failover's first half). State-changing commands are the ones
//! [`is_state_changing`] names, so a check of the peer can be added at one spot.
//!
//! ```text
//! → {"cmd":"mark","args":{"name":"before-upgrade"}}
//! ← {"ok":true,"result":{"name":"before-upgrade","lsn":1234,"timestamp_ns":…,"time":"…"}}
//! → {"cmd":"verify","args":{"regions":"all","rate":209715200,"repair":false}}
//! ← {"ok":true,"result":{"regions":16,"bytes":67108864,"first_lsn":…,"last_lsn":…,…}}
//! → {"cmd":"resync","args":{"regions":"3,7-9"}}
//! ← {"ok":true,"result":{"regions":4,"bytes":16777216,"dirty_regions":4,"mode":"forward-part"}}
//! → {"cmd":"demote","args":{}}
//! ← {"ok":true,"result":{"epoch":3,"lsn":52817,"seq":412}}
//! ```
//!
//! Must never: create a mark before its `MARK` record is durable, or reuse a name; read
//! the primary faster than `--rate`; hold more than one region in memory.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::lease::LeaseKeeper;
use super::primary::{HookError, PrimaryCore};
use crate::clock::format_ns;
use crate::control::{Handler, Request, Response};
use crate::journal::mark::{self, MarkPoint};
use crate::journal::{JournalError, Op};
use crate::store::ObjectStore;

/// Every way a control command fails (the message goes back to the client).
#[derive(Debug, thiserror::Error)]
pub(crate) enum CommandError {
    /// The request's arguments are not what the command takes.
    #[error("bad arguments for {cmd}: {reason}")]
    BadArguments { cmd: &'static str, reason: String },
    /// The core refused or failed.
    #[error(transparent)]
    Core(#[from] HookError),
    /// The journal refused (a duplicate mark name) or failed.
    #[error(transparent)]
    Journal(#[from] JournalError),
}

/// Which regions a `verify` or `resync` covers: `all`, or a list of indexes and inclusive
/// ranges (`0,3,8-11`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegionList {
    All,
    List(Vec<(u64, u64)>),
}

impl std::str::FromStr for RegionList {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s == "all" {
            return Ok(RegionList::All);
        }
        let bad = |part: &str| {
            format!(
                "{part:?} is not a region: use `all` or region indexes and ranges like 0,3,8-11"
            )
        };
        let mut out = Vec::new();
        for part in s.split(',') {
            let part = part.trim();
            let (a, b) = match part.split_once('-') {
                Some((a, b)) => (a.trim(), b.trim()),
                None => (part, part),
            };
            let a: u64 = a.parse().map_err(|_| bad(part))?;
            let b: u64 = b.parse().map_err(|_| bad(part))?;
            if b < a {
                return Err(format!("{part:?} is an empty range: write it low-high"));
            }
            out.push((a, b));
        }
        Ok(RegionList::List(out))
    }
}

impl std::fmt::Display for RegionList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RegionList::All => write!(f, "all"),
            RegionList::List(parts) => {
                for (i, (a, b)) in parts.iter().enumerate() {
                    let sep = if i == 0 { "" } else { "," };
                    if a == b {
                        write!(f, "{sep}{a}")?;
                    } else {
                        write!(f, "{sep}{a}-{b}")?;
                    }
                }
                Ok(())
            }
        }
    }
}

impl RegionList {
    /// The region indexes, ascending and without repeats, checked against `count`.
    pub fn resolve(&self, count: u64) -> Result<Vec<u64>, HookError> {
        let mut out: Vec<u64> = match self {
            RegionList::All => (0..count).collect(),
            RegionList::List(parts) => {
                let mut v = Vec::new();
                for &(a, b) in parts {
                    if b >= count {
                        return Err(HookError::NoSuchRegion { region: b, count });
                    }
                    v.extend(a..=b);
                }
                v
            }
        };
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }
}

/// Arguments of `verify`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VerifyArgs {
    pub regions: String,
    /// Bytes per second read from the primary at most (`None`: unpaced).
    #[serde(default)]
    pub rate: Option<u64>,
    /// Re-journal the verified regions as a resync span afterwards.
    #[serde(default)]
    pub repair: bool,
}

/// What a `verify` did.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct VerifyDone {
    pub regions: u64,
    pub bytes: u64,
    /// LSNs of the first and last `VERIFY` record.
    pub first_lsn: u64,
    pub last_lsn: u64,
    pub seconds: f64,
    /// Read rate achieved, bytes per second.
    pub rate: f64,
    /// Regions marked for a resync (`--repair`).
    pub repaired: u64,
}

/// Arguments of `resync`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ResyncArgs {
    pub regions: String,
}

/// What a `resync` did.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ResyncDone {
    pub regions: u64,
    pub bytes: u64,
    /// Dirty regions of the whole device now.
    pub dirty_regions: u64,
    pub mode: String,
}

/// Arguments of `mark`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MarkArgs {
    pub name: String,
}

/// What `mark` answers.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct MarkDone {
    pub name: String,
    pub lsn: u64,
    pub timestamp_ns: u64,
    /// RFC 3339.
    pub time: String,
}

/// Arguments of `demote`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DemoteArgs {
    /// Seconds to wait for a pending resync to drain (default 60).
    #[serde(default)]
    pub resync_timeout_s: Option<u64>,
}

/// What `demote` answers: the epoch, the `DEMOTE`'s LSN and its segment's seq.
pub use super::primary::Demoted as DemoteDone;

/// Commands that change state (everything but `status`).
pub(crate) fn is_state_changing(cmd: &str) -> bool {
    matches!(cmd, "mark" | "verify" | "resync" | "demote")
}

/// Ends this writer's epoch (see [`PrimaryCore::demote`]), then releases the lease with the
/// final durable end so that a `promote` need not wait out its term.
pub(crate) async fn demote(
    core: &PrimaryCore,
    lease: Option<&LeaseKeeper>,
    args: &DemoteArgs,
) -> Result<DemoteDone, CommandError> {
    let timeout = Duration::from_secs(args.resync_timeout_s.unwrap_or(60));
    let done = core.demote(timeout).await?;
    if let Some(lease) = lease {
        lease.release().await;
    }
    Ok(done)
}

/// Appends a `MARK` record, waits until it is durable, then records `marks/<name>`. A name
/// already taken is refused before anything is appended; of two racing marks of one name
/// the second's record stays in the journal as a no-op and its `marks/` create is refused.
pub(crate) async fn mark(
    core: &PrimaryCore,
    store: &dyn ObjectStore,
    name: &str,
) -> Result<MarkDone, CommandError> {
    mark::validate_name(name)?;
    match mark::load(store, name).await {
        Ok(existing) => {
            return Err(JournalError::MarkExists {
                journal: store.describe(),
                name: name.to_string(),
                lsn: existing.lsn,
            }
            .into())
        }
        Err(JournalError::UnknownMark { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    let appended = core
        .append_control_durable(Op::Mark {
            name: name.to_string(),
        })
        .await?;
    let point = MarkPoint {
        name: name.to_string(),
        lsn: appended.lsn,
        timestamp_ns: appended.timestamp_ns,
    };
    mark::create(store, &point).await?;
    tracing::info!(name, lsn = point.lsn, "mark recorded");
    Ok(MarkDone {
        name: point.name,
        lsn: point.lsn,
        timestamp_ns: point.timestamp_ns,
        time: format_ns(point.timestamp_ns),
    })
}

/// Journals a `VERIFY` of each region in order, reading at most `rate` bytes per second;
/// with `repair`, then marks the same regions for a resync.
pub(crate) async fn verify(
    core: &PrimaryCore,
    regions: &RegionList,
    rate: Option<u64>,
    repair: bool,
) -> Result<VerifyDone, CommandError> {
    let list = regions.resolve(core.region_count())?;
    let started = Instant::now();
    let mut bytes = 0u64;
    let (mut first_lsn, mut last_lsn) = (0, 0);
    for &region in &list {
        let (appended, _) = core.verify_region(region).await?;
        if first_lsn == 0 {
            first_lsn = appended.lsn;
        }
        last_lsn = appended.lsn;
        bytes += core.region_range(region)?.end - core.region_range(region)?.start;
        if let Some(rate) = rate.filter(|r| *r > 0) {
            let due = Duration::from_secs_f64(bytes as f64 / rate as f64);
            let elapsed = started.elapsed();
            if due > elapsed {
                tokio::time::sleep(due - elapsed).await;
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    tracing::info!(
        regions = list.len(),
        bytes,
        first_lsn,
        last_lsn,
        "verify records journaled"
    );
    let repaired = if repair {
        core.resync_regions(&list)?;
        list.len() as u64
    } else {
        0
    };
    Ok(VerifyDone {
        regions: list.len() as u64,
        bytes,
        first_lsn,
        last_lsn,
        seconds,
        rate: if seconds > 0.0 {
            bytes as f64 / seconds
        } else {
            0.0
        },
        repaired,
    })
}

/// Marks the regions dirty for a resync span.
pub(crate) fn resync(core: &PrimaryCore, regions: &RegionList) -> Result<ResyncDone, CommandError> {
    let list = regions.resolve(core.region_count())?;
    let mut bytes = 0;
    for &r in &list {
        let range = core.region_range(r)?;
        bytes += range.end - range.start;
    }
    core.resync_regions(&list)?;
    tracing::info!(regions = list.len(), bytes, "regions marked for a resync");
    Ok(ResyncDone {
        regions: list.len() as u64,
        bytes,
        dirty_regions: core.dirty().count(),
        mode: core.mode().to_string(),
    })
}

/// `serve`'s control-socket handler.
pub struct ServeControl {
    pub core: Arc<PrimaryCore>,
    /// The journal (`None` with `--no-journal`).
    pub store: Option<Arc<dyn ObjectStore>>,
    pub lease: Option<Arc<LeaseKeeper>>,
    /// Shown by `status` while plaintext clients can reach the disk from other hosts.
    pub security_warning: Option<String>,
    /// The NBD server's buffer budget (`None` with `--frontend ublk`), shown by `status`.
    pub nbd_buffers: Option<crate::nbd::BufferBudget>,
}

fn args<T: for<'de> Deserialize<'de>>(
    cmd: &'static str,
    value: serde_json::Value,
) -> Result<T, CommandError> {
    serde_json::from_value(value).map_err(|e| CommandError::BadArguments {
        cmd,
        reason: e.to_string(),
    })
}

fn regions(cmd: &'static str, s: &str) -> Result<RegionList, CommandError> {
    s.parse()
        .map_err(|reason| CommandError::BadArguments { cmd, reason })
}

impl ServeControl {
    fn status(&self) -> Result<serde_json::Value, String> {
        let mut snapshot = self.core.status();
        snapshot.security_warning = self.security_warning.clone();
        let mut v = serde_json::to_value(snapshot).map_err(|e| format!("status: {e}"))?;
        if let (Some(lease), Some(obj)) = (
            self.lease.as_ref().and_then(|l| l.status()),
            v.as_object_mut(),
        ) {
            obj.insert(
                "lease".into(),
                serde_json::to_value(lease).map_err(|e| format!("lease status: {e}"))?,
            );
        }
        if let (Some(buffers), Some(obj)) = (&self.nbd_buffers, v.as_object_mut()) {
            obj.insert(
                "nbd_buffers".into(),
                serde_json::to_value(buffers.status())
                    .map_err(|e| format!("NBD buffer status: {e}"))?,
            );
        }
        Ok(v)
    }

    async fn run(&self, request: Request) -> Result<serde_json::Value, CommandError> {
        let encode = |v: Result<serde_json::Value, serde_json::Error>| {
            v.map_err(|e| CommandError::BadArguments {
                cmd: "encode",
                reason: e.to_string(),
            })
        };
        match request.cmd.as_str() {
            "mark" => {
                let a: MarkArgs = args("mark", request.args)?;
                let store = self.store.as_ref().ok_or(HookError::NoJournal)?;
                encode(serde_json::to_value(
                    mark(&self.core, store.as_ref(), &a.name).await?,
                ))
            }
            "verify" => {
                let a: VerifyArgs = args("verify", request.args)?;
                let list = regions("verify", &a.regions)?;
                encode(serde_json::to_value(
                    verify(&self.core, &list, a.rate, a.repair).await?,
                ))
            }
            "resync" => {
                let a: ResyncArgs = args("resync", request.args)?;
                let list = regions("resync", &a.regions)?;
                encode(serde_json::to_value(resync(&self.core, &list)?))
            }
            "demote" => {
                let a: DemoteArgs = args("demote", request.args)?;
                encode(serde_json::to_value(
                    demote(&self.core, self.lease.as_deref(), &a).await?,
                ))
            }
            other => Err(CommandError::BadArguments {
                cmd: "control",
                reason: format!(
                    "unknown command {other:?}; this daemon knows: status, mark, verify, \
                     resync, demote"
                ),
            }),
        }
    }
}

#[async_trait]
impl Handler for ServeControl {
    async fn handle(&self, request: Request) -> Response {
        if request.cmd == "status" {
            return match self.status() {
                Ok(v) => Response::ok(v),
                Err(e) => Response::error(format!("cannot encode the {e}")),
            };
        }
        if is_state_changing(&request.cmd) {
            tracing::info!(cmd = %request.cmd, args = %request.args, "control command");
        }
        match self.run(request).await {
            Ok(v) => Response::ok(v),
            Err(e) => Response::error(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_lists_parse_resolve_and_refuse_bad_input() {
        assert_eq!("all".parse::<RegionList>(), Ok(RegionList::All));
        let list: RegionList = "3, 0,8-10".parse().unwrap();
        assert_eq!(list.to_string(), "3,0,8-10");
        assert_eq!(list.resolve(16).unwrap(), vec![0, 3, 8, 9, 10]);
        assert_eq!(RegionList::All.resolve(3).unwrap(), vec![0, 1, 2]);
        let err = list.resolve(10).unwrap_err().to_string();
        assert!(err.contains("region 10") && err.contains("0..10"), "{err}");
        for bad in ["", "x", "1-", "5-2", "1,,2", "-3"] {
            assert!(bad.parse::<RegionList>().is_err(), "{bad:?}");
        }
    }
}
