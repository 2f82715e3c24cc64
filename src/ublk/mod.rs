//! The ublk frontend: serves a [`BlockDevice`] as `/dev/ublkbN` through the kernel's
//! `ublk_drv` (libublk). One thread per hardware queue takes the kernel's requests over
//! io_uring, one task per tag; each request is translated ([`request`]) and run on the tokio
//! runtime against the device, and its result committed back to the kernel. The device
//! advertises the block size, discard and write-zeroes the [`BlockDevice`] reports, a
//! volatile cache with FUA (so FLUSH and FUA reach the device's flush semantics), and
//! `chunk_sectors` = the region size so reads and writes never cross a region. With
//! `--user-recovery` a daemon killed without a goodbye leaves the device quiesced, and the
//! next daemon given the same `--dev-id` re-attaches to it.
//!
//! Files: `params` (options checked, kernel parameters), `recovery` (re-attaching to a
//! quiesced device), `queue` (the per-queue threads and their tag tasks), `request` (a
//! descriptor translated and run); this file makes, runs and deletes the device.
//!
//! Must never: import the writer or know about journals (it serves any `BlockDevice`, the
//! primary core included); touch the device for a request it rejected; block the kernel's
//! queue thread on the device (requests run on the runtime, the queue thread only waits on
//! io_uring); run in, or share a mount namespace with, processes that mount or otherwise use
//! the device it serves: writeback to `/dev/ublkbN` waits for this daemon, so the daemon
//! must never wait for that writeback (a filesystem on its own device, a `sync` of it).

use std::path::Path;
use std::sync::Arc;

use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::io::UblkDev;
use libublk::UblkFlags;
use tokio::runtime::Handle;

use crate::block::BlockDevice;
use request::Geometry;

mod params;
mod queue;
mod recovery;
pub(crate) mod request;

use params::device_params;
pub use params::validate;
use queue::{serve_queue, QueueCtx};
use recovery::recoverable;

/// The kernel's control device; it exists once `ublk_drv` is loaded.
pub const CONTROL_PATH: &str = "/dev/ublk-control";

/// How the device is made; the CLI's `--queues`, `--depth`, ... flags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UblkOptions {
    /// Hardware queues (one serving thread each).
    pub queues: u16,
    /// Requests in flight per queue.
    pub depth: u16,
    /// Bytes of each request's buffer: the largest read or write the kernel sends.
    pub io_buf_size: u32,
    /// An unprivileged device (`UBLK_F_UNPRIVILEGED_DEV`): its owner may serve it without
    /// root, where the kernel and udev rules allow it.
    pub unprivileged: bool,
    /// Keep the device when the daemon dies, so a new daemon can re-attach to it.
    pub user_recovery: bool,
    /// The device number N of `/dev/ublkbN` [default: the kernel picks]. With
    /// `user_recovery`, an existing quiesced device N is re-attached.
    pub dev_id: Option<u32>,
    /// Reads and writes never cross a multiple of this (the journal's region size).
    pub region_size: u64,
}

impl Default for UblkOptions {
    fn default() -> UblkOptions {
        UblkOptions {
            queues: 1,
            depth: 64,
            io_buf_size: 512 << 10,
            unprivileged: false,
            user_recovery: false,
            dev_id: None,
            region_size: 4 << 20,
        }
    }
}

/// One variant per way the ublk frontend fails.
#[derive(Debug, thiserror::Error)]
pub enum UblkServeError {
    /// The kernel has no ublk driver loaded.
    #[error(
        "this kernel has no ublk driver ({CONTROL_PATH} is missing): load it with \
         `modprobe ublk_drv` (Linux >= 6.0 built with CONFIG_BLK_DEV_UBLK), or serve over \
         NBD with --frontend nbd"
    )]
    NoDriver,
    /// The control device exists but cannot be opened.
    #[error("cannot open {CONTROL_PATH}: {0} (run as root, or ask for --unprivileged where the system allows it)")]
    ControlAccess(std::io::Error),
    /// An option the device cannot take.
    #[error("{0}")]
    BadOption(String),
    /// The kernel refused to add the device.
    #[error("the kernel refused to add the ublk device: {0}")]
    Add(String),
    /// Re-attaching to an existing device failed.
    #[error("cannot re-attach to /dev/ublkb{dev_id}: {reason}")]
    Recover { dev_id: u32, reason: String },
    /// The device was added but could not be started.
    #[error("cannot start the ublk device: {0}")]
    Start(String),
}

/// Fails with [`UblkServeError::NoDriver`] unless the kernel's ublk driver is loaded and
/// its control device can be opened.
pub fn check_driver() -> Result<(), UblkServeError> {
    check_driver_at(Path::new(CONTROL_PATH))
}

fn check_driver_at(path: &Path) -> Result<(), UblkServeError> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(UblkServeError::NoDriver),
        Err(e) => Err(UblkServeError::ControlAccess(e)),
    }
}

/// The errno inside a libublk error, if it carries one.
pub(super) fn errno(e: &libublk::UblkError) -> Option<i32> {
    match e {
        libublk::UblkError::OtherError(code) | libublk::UblkError::UringIOError(code) => {
            Some(code.abs())
        }
        libublk::UblkError::IOError(io) => io.raw_os_error(),
        _ => None,
    }
}

/// libublk's errors say "other failure" for every errno; this names the errno.
pub(super) fn describe(e: &libublk::UblkError) -> String {
    match e {
        libublk::UblkError::OtherError(code) | libublk::UblkError::UringIOError(code) => {
            std::io::Error::from_raw_os_error(code.abs()).to_string()
        }
        libublk::UblkError::IOError(io) => io.to_string(),
        other => other.to_string(),
    }
}

/// A served device; [`UblkHandle::stop`] removes it.
pub struct UblkHandle {
    dev_id: u32,
    recovered: bool,
    stop: std::sync::mpsc::Sender<()>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl UblkHandle {
    /// N of `/dev/ublkbN`.
    pub fn dev_id(&self) -> u32 {
        self.dev_id
    }

    /// The block device users open.
    pub fn block_path(&self) -> String {
        format!("/dev/ublkb{}", self.dev_id)
    }

    /// Whether this daemon re-attached to a device an earlier daemon left behind.
    pub fn recovered(&self) -> bool {
        self.recovered
    }

    /// Stops the device (the kernel fails new I/O to it), waits for the queues to finish
    /// their requests, and deletes it.
    pub async fn stop(mut self) {
        let _ = self.stop.send(());
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

/// Adds (or, with user recovery, re-attaches to) a ublk device serving `device`, and
/// returns once the kernel has started it. Requests run on `runtime`.
pub async fn start(
    device: Arc<dyn BlockDevice>,
    options: UblkOptions,
    runtime: Handle,
) -> Result<UblkHandle, UblkServeError> {
    check_driver()?;
    let info = device.info();
    validate(&options, info.block_size)?;
    let geo = Geometry {
        size: info.size,
        block_size: info.block_size,
        buf_size: options.io_buf_size,
        read_only: info.read_only,
        trim: info.supports_trim,
        write_zeroes: info.supports_write_zeroes,
    };
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let ctx = QueueCtx {
        device,
        runtime,
        geo,
    };
    let thread = std::thread::Builder::new()
        .name("ublk-ctrl".into())
        .spawn(move || run_device(ctx, options, started_tx, stop_rx))
        .map_err(|e| UblkServeError::Start(e.to_string()))?;
    match started_rx.await {
        Ok(Ok((dev_id, recovered))) => Ok(UblkHandle {
            dev_id,
            recovered,
            stop: stop_tx,
            thread: Some(thread),
        }),
        Ok(Err(e)) => {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
            Err(e)
        }
        Err(_) => Err(UblkServeError::Start(
            "the ublk control thread ended before the device started".into(),
        )),
    }
}

type Started = tokio::sync::oneshot::Sender<Result<(u32, bool), UblkServeError>>;

/// The control thread: makes the device, runs its queues until told to stop, deletes it.
fn run_device(
    ctx: QueueCtx,
    options: UblkOptions,
    started: Started,
    stop: std::sync::mpsc::Receiver<()>,
) {
    let recover = match (options.user_recovery, options.dev_id) {
        (true, Some(id)) => match recoverable(id, ctx.geo.size) {
            Ok(r) => r,
            Err(e) => {
                let _ = started.send(Err(e));
                return;
            }
        },
        _ => false,
    };
    let mut ctrl_flags = 0u64;
    if options.user_recovery {
        // Requests the dead daemon had taken are issued again to the new one.
        ctrl_flags |= u64::from(
            libublk::sys::UBLK_F_USER_RECOVERY | libublk::sys::UBLK_F_USER_RECOVERY_REISSUE,
        );
    }
    if options.unprivileged {
        ctrl_flags |= u64::from(libublk::sys::UBLK_F_UNPRIVILEGED_DEV);
    }
    let built = UblkCtrlBuilder::default()
        .name("tinylag")
        .id(options.dev_id.map_or(-1, |id| id as i32))
        .nr_queues(options.queues)
        .depth(options.depth)
        .io_buf_bytes(options.io_buf_size)
        .ctrl_flags(ctrl_flags)
        .dev_flags(if recover {
            UblkFlags::UBLK_DEV_F_RECOVER_DEV
        } else {
            UblkFlags::UBLK_DEV_F_ADD_DEV
        })
        .build();
    let ctrl = match built {
        Ok(c) => c,
        Err(e) => {
            let _ = started.send(Err(match options.dev_id {
                Some(dev_id) if recover => UblkServeError::Recover {
                    dev_id,
                    reason: describe(&e),
                },
                Some(dev_id) if errno(&e) == Some(libc::EEXIST) => UblkServeError::Add(format!(
                    "/dev/ublkb{dev_id} already exists (left by a daemon with \
                     --user-recovery? add --user-recovery to re-attach to it, or pick another \
                     --dev-id)"
                )),
                _ => UblkServeError::Add(describe(&e)),
            }));
            return;
        }
    };
    let dev_id = ctrl.dev_info().dev_id;
    let geo = ctx.geo;
    let region_size = options.region_size;
    let tgt_init = move |dev: &mut UblkDev| {
        dev.set_default_params(geo.size);
        dev.tgt.params = device_params(&geo, region_size, dev.dev_info.max_io_buf_bytes);
        Ok(())
    };
    let started = std::sync::Mutex::new(Some(started));
    let started = Arc::new(started);
    let on_start = started.clone();
    // run_target wants a Sync closure; only this one thread ever waits on it.
    let stop = std::sync::Mutex::new(stop);
    let after_start = move |ctrl: &UblkCtrl| {
        if let Some(tx) = on_start.lock().unwrap().take() {
            let _ = tx.send(Ok((dev_id, recover)));
        }
        // Serve until the daemon says stop (or goes away); then stop the device so the
        // queues drain and end.
        let _ = stop.lock().map(|rx| rx.recv());
        if let Err(e) = ctrl.kill_dev() {
            tracing::warn!(error = %describe(&e), "stopping the ublk device failed");
        }
    };
    let queue = move |qid: u16, dev: &UblkDev| serve_queue(qid, dev, ctx.clone());
    let ran = ctrl.run_target(tgt_init, queue, after_start);
    if let Err(e) = ran {
        if let Some(tx) = started.lock().unwrap().take() {
            let _ = tx.send(Err(UblkServeError::Start(describe(&e))));
            return;
        }
        tracing::error!(error = %describe(&e), "the ublk device failed");
    }
    // A clean stop deletes the device, re-attached or not (dropping an added one does too).
    if let Err(e) = ctrl.del_dev() {
        tracing::debug!(error = %describe(&e), "deleting the ublk device");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_driver_is_named_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let e = check_driver_at(&dir.path().join("ublk-control")).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("modprobe ublk_drv"), "{text}");
        assert!(text.contains("--frontend nbd"), "{text}");
        assert!(check_driver_at(&dir.path().join("nope/ublk-control")).is_err());
        // Something that exists opens (the check is "can we open it").
        let file = dir.path().join("present");
        std::fs::write(&file, b"").unwrap();
        assert!(check_driver_at(&file).is_ok());
    }
}
