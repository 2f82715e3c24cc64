//! The queue side of a ublk device: one thread per hardware queue, a task per tag on a local
//! executor driven by the queue's io_uring, each request translated and run on the tokio
//! runtime and its result committed back to the kernel.
//!
//! Must never: block the queue thread on the device (requests run on the runtime; the
//! queue thread only waits on io_uring), or touch the device for a request it refused.

use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;
use libublk::helpers::IoBuf;
use libublk::io::{UblkDev, UblkQueue};
use libublk::BufDesc;
use tokio::runtime::Handle;

use super::describe;
use super::request::{self, Geometry};
use crate::block::BlockDevice;

/// What one queue thread needs.
#[derive(Clone)]
pub(super) struct QueueCtx {
    pub(super) device: Arc<dyn BlockDevice>,
    pub(super) runtime: Handle,
    pub(super) geo: Geometry,
}

/// One queue thread: a task per tag, driven by a local executor that wakes on the queue's
/// io_uring or when a request finished on the runtime.
pub(super) fn serve_queue(qid: u16, dev: &UblkDev, mut ctx: QueueCtx) {
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
