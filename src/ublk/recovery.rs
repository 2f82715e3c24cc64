//! Re-attaching to a device a dead daemon left behind (`--user-recovery`): whether the
//! device with the given id exists, is quiesced, was made for recovery and has the
//! primary's size, and if so starting its recovery.
//!
//! Must never: take a device a live daemon serves, or one of another size.

use std::path::Path;

use libublk::ctrl::UblkCtrl;

use super::request::SECTOR;
use super::{describe, errno, UblkServeError};

/// Whether device `dev_id` exists and waits for a new daemon (quiesced by user recovery).
pub(super) fn recoverable(dev_id: u32, size: u64) -> Result<bool, UblkServeError> {
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
