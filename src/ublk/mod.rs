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
//! Must never: import the writer or know about journals (it serves any `BlockDevice`, the
//! primary core included); touch the device for a request it rejected; block the kernel's
//! queue thread on the device (requests run on the runtime, the queue thread only waits on
//! io_uring); run in, or share a mount namespace with, processes that mount or otherwise use
//! the device it serves: writeback to `/dev/ublkbN` waits for this daemon, so the daemon
//! must never wait for that writeback (a filesystem on its own device, a `sync` of it).

use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;
use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::helpers::IoBuf;
use libublk::io::{UblkDev, UblkQueue};
use libublk::{BufDesc, UblkFlags};
use tokio::runtime::Handle;

use crate::block::BlockDevice;
use request::{Geometry, SECTOR};

pub(crate) mod request;

/// The kernel's control device; it exists once `ublk_drv` is loaded.
pub const CONTROL_PATH: &str = "/dev/ublk-control";

/// The most memory the request buffers (one per tag) may take.
const MAX_REQUEST_BUFFERS: u64 = 1 << 30;

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
fn errno(e: &libublk::UblkError) -> Option<i32> {
    match e {
        libublk::UblkError::OtherError(code) | libublk::UblkError::UringIOError(code) => {
            Some(code.abs())
        }
        libublk::UblkError::IOError(io) => io.raw_os_error(),
        _ => None,
    }
}

/// libublk's errors say "other failure" for every errno; this names the errno.
fn describe(e: &libublk::UblkError) -> String {
    match e {
        libublk::UblkError::OtherError(code) | libublk::UblkError::UringIOError(code) => {
            std::io::Error::from_raw_os_error(code.abs()).to_string()
        }
        libublk::UblkError::IOError(io) => io.to_string(),
        other => other.to_string(),
    }
}

/// Checks `options` against the device before anything is created.
pub fn validate(options: &UblkOptions, block_size: u32) -> Result<(), UblkServeError> {
    let bad = |s: String| Err(UblkServeError::BadOption(s));
    if options.queues == 0 || options.queues > 64 {
        return bad(format!(
            "--queues {} is out of range: use 1 to 64",
            options.queues
        ));
    }
    if options.depth == 0 || options.depth > 4096 {
        return bad(format!(
            "--depth {} is out of range: use 1 to 4096",
            options.depth
        ));
    }
    let buf = options.io_buf_size;
    if !(4096..=32 << 20).contains(&buf) || buf % 4096 != 0 || buf % block_size != 0 {
        return bad(format!(
            "--io-buf-size {buf} is not usable: use a multiple of 4K and of the block size \
             ({block_size}) from 4K to 32M"
        ));
    }
    // Every tag owns a buffer of --io-buf-size: keep their sum bounded.
    let total = u64::from(options.queues) * u64::from(options.depth) * u64::from(buf);
    if total > MAX_REQUEST_BUFFERS {
        return bad(format!(
            "--queues {} x --depth {} x --io-buf-size {buf} is {total} bytes of request \
             buffers: keep the product at most 1G",
            options.queues, options.depth
        ));
    }
    Ok(())
}

/// The kernel parameters of a device: sizes from `info`, the block size as logical and
/// physical block size, a write-back cache with FUA, discard and write-zeroes when the
/// device honours them, and chunks of one region.
fn device_params(geo: &Geometry, region_size: u64, max_io_bytes: u32) -> libublk::sys::ublk_params {
    use libublk::sys;
    let shift = geo.block_size.trailing_zeros() as u8;
    let region_sectors = region_size / SECTOR;
    // The kernel wants a power of two here; other region sizes simply go without.
    let chunk_sectors = if region_sectors.is_power_of_two() && region_sectors <= u64::from(u32::MAX)
    {
        region_sectors as u32
    } else {
        0
    };
    let mut attrs = sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA;
    if geo.read_only {
        attrs |= sys::UBLK_ATTR_READ_ONLY;
    }
    let mut params = sys::ublk_params {
        types: sys::UBLK_PARAM_TYPE_BASIC,
        basic: sys::ublk_param_basic {
            attrs,
            logical_bs_shift: shift,
            physical_bs_shift: shift,
            io_opt_shift: shift,
            io_min_shift: shift,
            max_sectors: max_io_bytes >> 9,
            chunk_sectors,
            dev_sectors: geo.size >> 9,
            ..Default::default()
        },
        ..Default::default()
    };
    if !geo.read_only && (geo.trim || geo.write_zeroes) {
        // One region at most per request, like reads and writes.
        let max = if chunk_sectors != 0 {
            chunk_sectors
        } else {
            u32::MAX >> 9
        };
        params.types |= sys::UBLK_PARAM_TYPE_DISCARD;
        params.discard = sys::ublk_param_discard {
            discard_granularity: geo.block_size,
            max_discard_sectors: if geo.trim { max } else { 0 },
            max_write_zeroes_sectors: if geo.write_zeroes { max } else { 0 },
            max_discard_segments: 1,
            ..Default::default()
        };
    }
    params
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

/// What one queue thread needs.
#[derive(Clone)]
struct QueueCtx {
    device: Arc<dyn BlockDevice>,
    runtime: Handle,
    geo: Geometry,
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

/// Whether device `dev_id` exists and waits for a new daemon (quiesced by user recovery).
fn recoverable(dev_id: u32, size: u64) -> Result<bool, UblkServeError> {
    let recover_err = |reason: String| UblkServeError::Recover { dev_id, reason };
    // No such device (its char device is made with it): add it.
    if !Path::new(&format!("/dev/ublkc{dev_id}")).exists() {
        return Ok(false);
    }
    let ctrl = match UblkCtrl::new_simple(dev_id as i32) {
        Ok(c) => c,
        Err(e) if errno(&e) == Some(libc::ENODEV) => return Ok(false),
        Err(e) => return Err(recover_err(describe(&e))),
    };
    // A daemon that was just killed leaves the device live until the kernel has torn down
    // its rings; give that a moment, but never take a device a live daemon serves.
    let mut waited = 0;
    while u32::from(ctrl.dev_info().state) == libublk::sys::UBLK_S_DEV_LIVE {
        let pid = ctrl.dev_info().ublksrv_pid;
        if pid_alive(pid) || waited >= RECOVERY_WAIT_STEPS {
            return Err(recover_err(format!(
                "it is live, served by process {pid}; stop that daemon first"
            )));
        }
        if waited == 0 {
            tracing::info!(
                dev_id,
                pid,
                "waiting for the dead daemon's device to quiesce"
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        waited += 1;
        ctrl.read_dev_info()
            .map_err(|e| recover_err(describe(&e)))?;
    }
    let state = u32::from(ctrl.dev_info().state);
    if state != libublk::sys::UBLK_S_DEV_QUIESCED && state != libublk::sys::UBLK_S_DEV_FAIL_IO {
        return Err(recover_err(format!(
            "it is in state {state}, not waiting for recovery; delete it or pick another --dev-id"
        )));
    }
    if ctrl.dev_info().flags & u64::from(libublk::sys::UBLK_F_USER_RECOVERY) == 0 {
        return Err(recover_err("it was not made with --user-recovery".into()));
    }
    let mut params = libublk::sys::ublk_params {
        len: std::mem::size_of::<libublk::sys::ublk_params>() as u32,
        types: libublk::sys::UBLK_PARAM_TYPE_BASIC,
        ..Default::default()
    };
    ctrl.get_params(&mut params)
        .map_err(|e| recover_err(describe(&e)))?;
    if params.basic.dev_sectors != size / SECTOR {
        return Err(recover_err(format!(
            "it has {} bytes and the primary {size}",
            params.basic.dev_sectors * SECTOR
        )));
    }
    let asked = std::time::Instant::now();
    ctrl.start_user_recover()
        .map_err(|e| recover_err(describe(&e)))?;
    tracing::info!(
        dev_id,
        waited_ms = asked.elapsed().as_millis() as u64,
        "recovery started"
    );
    // This handle must not delete the device when dropped.
    ctrl.disown();
    Ok(true)
}

/// How many 100 ms steps a new daemon waits for a dead one's device to quiesce.
const RECOVERY_WAIT_STEPS: u32 = 300;

/// Whether process `pid` exists (in this PID namespace).
fn pid_alive(pid: i32) -> bool {
    pid > 0 && crate::sys::process_exists(pid)
}

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

/// One queue thread: a task per tag, driven by a local executor that wakes on the queue's
/// io_uring or when a request finished on the runtime.
fn serve_queue(qid: u16, dev: &UblkDev, mut ctx: QueueCtx) {
    // The buffers are what the kernel agreed to, which may be less than was asked.
    ctx.geo.buf_size = ctx.geo.buf_size.min(dev.dev_info.max_io_buf_bytes);
    let queue = match UblkQueue::new(qid, dev) {
        Ok(q) => Rc::new(q),
        Err(e) => {
            tracing::error!(qid, error = %describe(&e), "cannot set up a ublk queue");
            return;
        }
    };
    let exe = Rc::new(smol::LocalExecutor::new());
    // A task that queued a commit (or ended) kicks the loop so the commit is submitted.
    let (kick_tx, kick_rx) = smol::channel::unbounded::<()>();
    let mut tasks = Vec::new();
    for tag in 0..dev.dev_info.queue_depth {
        let q = queue.clone();
        let ctx = ctx.clone();
        let kick = kick_tx.clone();
        tasks.push(exe.spawn(async move {
            match serve_tag(&q, tag, &ctx, &kick).await {
                Ok(()) | Err(libublk::UblkError::QueueIsDown) => {}
                Err(e) => tracing::error!(qid, tag, error = %describe(&e), "ublk tag failed"),
            }
            let _ = kick.try_send(());
        }));
    }
    let q = queue.clone();
    let exe2 = exe.clone();
    let driven =
        smol::block_on(exe.run(async move { drive_ring(&exe2, &q, &tasks, &kick_rx).await }));
    if let Err(e) = driven {
        tracing::error!(qid, error = %describe(&e), "the ublk queue failed");
    }
}

/// Submits queued commands and reaps completions until every tag task has ended.
async fn drive_ring(
    exe: &smol::LocalExecutor<'_>,
    q: &UblkQueue<'_>,
    tasks: &[smol::Task<()>],
    kick: &smol::channel::Receiver<()>,
) -> Result<(), libublk::UblkError> {
    use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
    let fd = libublk::io::with_task_io_ring(|ring| ring.as_raw_fd());
    // SAFETY: the ring owns `fd` and outlives this function; the File is turned back into
    // a raw fd below, so it never closes it.
    let ring_file = smol::Async::new(unsafe { std::fs::File::from_raw_fd(fd) })?;
    let result = async {
        while exe.try_tick() {}
        while !tasks.iter().all(|t| t.is_finished()) {
            libublk::io::with_task_io_ring_mut(|ring| ring.submit_and_wait(0))?;
            smol::future::race(
                async {
                    let _ = ring_file.readable().await;
                },
                async {
                    let _ = kick.recv().await;
                },
            )
            .await;
            while kick.try_recv().is_ok() {}
            libublk::uring_async::ublk_reap_io_events_with_update_queue(q, false, None, |cqe| {
                libublk::uring_async::ublk_wake_task(cqe.user_data(), cqe)
            })?;
            while exe.try_tick() {}
        }
        Ok(())
    }
    .await;
    if let Ok(file) = ring_file.into_inner() {
        let _ = file.into_raw_fd();
    }
    result
}

/// One tag: fetch a request, run it, commit the result, forever (until the queue stops).
async fn serve_tag(
    q: &UblkQueue<'_>,
    tag: u16,
    ctx: &QueueCtx,
    kick: &smol::channel::Sender<()>,
) -> Result<(), libublk::UblkError> {
    let mut buf = IoBuf::<u8>::new(q.dev.dev_info.max_io_buf_bytes as usize);
    q.submit_io_prep_cmd(tag, BufDesc::Slice(buf.as_slice()), 0, Some(&buf))
        .await?;
    loop {
        let iod = q.get_iod(tag);
        let (op_flags, start_sector, nr_sectors) = (iod.op_flags, iod.start_sector, iod.nr_sectors);
        let res = handle(op_flags, start_sector, nr_sectors, buf.as_mut_slice(), ctx).await;
        let _ = kick.try_send(());
        q.submit_io_commit_cmd(tag, BufDesc::Slice(buf.as_slice()), res)
            .await?;
    }
}

/// Runs one descriptor on the runtime; the commit result.
async fn handle(
    op_flags: u32,
    start_sector: u64,
    nr_sectors: u32,
    buf: &mut [u8],
    ctx: &QueueCtx,
) -> i32 {
    let request = match request::translate(op_flags, start_sector, nr_sectors, &ctx.geo) {
        Ok(r) => r,
        Err(errno) => {
            tracing::debug!(
                op_flags,
                start_sector,
                nr_sectors,
                errno,
                "ublk request refused"
            );
            return errno;
        }
    };
    let payload = match request {
        request::Request::Write { len, .. } => Bytes::copy_from_slice(&buf[..len as usize]),
        _ => Bytes::new(),
    };
    let device = ctx.device.clone();
    let running = ctx
        .runtime
        .spawn(async move { request::execute(device.as_ref(), request, payload).await });
    match running.await {
        Ok(outcome) => request::completion(&request, outcome, buf),
        Err(e) => {
            tracing::error!(error = %e, "a ublk request's task failed");
            -libc::EIO
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geo() -> Geometry {
        Geometry {
            size: 64 << 20,
            block_size: 4096,
            buf_size: 512 << 10,
            read_only: false,
            trim: true,
            write_zeroes: true,
        }
    }

    #[test]
    fn the_device_advertises_block_size_cache_discard_and_region_chunks() {
        let p = device_params(&geo(), 4 << 20, 512 << 10);
        assert_eq!(p.basic.logical_bs_shift, 12);
        assert_eq!(p.basic.physical_bs_shift, 12);
        assert_eq!(p.basic.dev_sectors, (64 << 20) / 512);
        assert_eq!(p.basic.max_sectors, 1024);
        assert_eq!(p.basic.chunk_sectors, 8192);
        let attrs = p.basic.attrs;
        assert_ne!(attrs & libublk::sys::UBLK_ATTR_VOLATILE_CACHE, 0);
        assert_ne!(attrs & libublk::sys::UBLK_ATTR_FUA, 0);
        assert_eq!(attrs & libublk::sys::UBLK_ATTR_READ_ONLY, 0);
        assert_ne!(p.types & libublk::sys::UBLK_PARAM_TYPE_DISCARD, 0);
        assert_eq!(p.discard.discard_granularity, 4096);
        assert_eq!(p.discard.max_discard_sectors, 8192);
        assert_eq!(p.discard.max_write_zeroes_sectors, 8192);

        let small = Geometry {
            block_size: 512,
            read_only: true,
            ..geo()
        };
        let p = device_params(&small, 3 << 20, 512 << 10);
        assert_eq!(p.basic.logical_bs_shift, 9);
        assert_eq!(p.basic.chunk_sectors, 0, "not a power of two: no chunks");
        assert_ne!(p.basic.attrs & libublk::sys::UBLK_ATTR_READ_ONLY, 0);
        assert_eq!(p.types & libublk::sys::UBLK_PARAM_TYPE_DISCARD, 0);
    }

    #[test]
    fn options_out_of_range_are_refused_by_name() {
        let ok = UblkOptions::default();
        assert!(validate(&ok, 4096).is_ok());
        for (opts, flag) in [
            (
                UblkOptions {
                    queues: 0,
                    ..ok.clone()
                },
                "--queues",
            ),
            (
                UblkOptions {
                    depth: 5000,
                    ..ok.clone()
                },
                "--depth",
            ),
            (
                UblkOptions {
                    io_buf_size: 6000,
                    ..ok.clone()
                },
                "--io-buf-size",
            ),
            (
                UblkOptions {
                    io_buf_size: 64 << 20,
                    ..ok.clone()
                },
                "--io-buf-size",
            ),
            (
                UblkOptions {
                    queues: 8,
                    depth: 4096,
                    ..ok.clone()
                },
                "at most 1G",
            ),
        ] {
            let e = validate(&opts, 4096).unwrap_err().to_string();
            assert!(e.contains(flag), "{e}");
        }
    }

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
