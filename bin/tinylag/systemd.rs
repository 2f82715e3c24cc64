//! Tells systemd how a daemon is doing (`Type=notify` units): `READY=1` once it serves (the
//! NBD socket accepts, the replay agent runs) and `STOPPING=1` when it starts to shut down,
//! as datagrams on `$NOTIFY_SOCKET` (the `sd-notify` crate). Without `$NOTIFY_SOCKET`
//! (not under systemd), nothing happens.
//!
//! Must never: fail or hold up a daemon because the notification cannot be sent (a warning
//! is logged), or unset `$NOTIFY_SOCKET` (`up` runs two daemons in one process; both notify).

use sd_notify::NotifyState;

/// `READY=1`, with a `STATUS=` line systemctl status shows.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// `STOPPING=1`.
pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

fn send(states: &[NotifyState]) {
    // systemd treats an empty $NOTIFY_SOCKET as unset.
    if std::env::var_os("NOTIFY_SOCKET").is_none_or(|v| v.is_empty()) {
        return;
    }
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify systemd on $NOTIFY_SOCKET");
    }
}
