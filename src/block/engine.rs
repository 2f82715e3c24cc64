//! Which engine drives a file target's reads, writes and flushes ([`super::file::open`]
//! opens the engine's own type): io_uring
//! (completed on the async runtime's own threads, no hand-off per request) or the blocking
//! thread pool (the fallback). `serve` picks once at start with [`select`] and logs one line
//! saying which and why.
//!
//! `TINYLAG_IO_ENGINE` overrides the choice: `uring` (fail if io_uring cannot be used),
//! `threads` (always the fallback, e.g. to test it), `auto` or unset (io_uring when the
//! probe passes, else threads).
//!
//! Must never: pick io_uring without having probed it on this kernel and in this process
//! (seccomp, containers and old kernels refuse it or some of its opcodes).

use std::fmt;

/// The environment variable that overrides the engine choice.
pub const ENGINE_ENV: &str = "TINYLAG_IO_ENGINE";

/// How a file target's data transfers and flushes run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoEngine {
    /// `pread`/`pwrite`/`fdatasync` on tokio's blocking pool (after an `RWF_NOWAIT`
    /// attempt on the calling thread for buffered I/O).
    Threads,
    /// One io_uring per device: requests are submitted from the task that issues them and
    /// completed on the runtime's threads (see `block::uring`).
    Uring,
}

impl fmt::Display for IoEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IoEngine::Threads => "threads",
            IoEngine::Uring => "io_uring",
        })
    }
}

/// The outcome of [`select`]: the engine and why it was chosen, for the one log line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selection {
    pub engine: IoEngine,
    pub reason: String,
}

/// Every way selecting an engine fails.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EngineError {
    /// `TINYLAG_IO_ENGINE` holds something other than the accepted values.
    #[error("{ENGINE_ENV}={value} is not an I/O engine: expected uring, threads or auto")]
    BadValue { value: String },
    /// `TINYLAG_IO_ENGINE=uring` was asked for, but io_uring cannot be used here.
    #[error("{ENGINE_ENV}=uring, but io_uring is unavailable: {reason}")]
    UringUnavailable { reason: String },
}

/// Chooses the engine from the environment and a live probe of io_uring.
pub fn select() -> Result<Selection, EngineError> {
    choose(std::env::var(ENGINE_ENV).ok().as_deref(), probe_uring)
}

/// The decision, separated from the environment and the kernel so it can be tested:
/// `setting` is the variable's value, `probe` says whether io_uring works (or why not).
pub fn choose(
    setting: Option<&str>,
    probe: impl FnOnce() -> Result<(), String>,
) -> Result<Selection, EngineError> {
    match setting.map(str::trim) {
        Some("threads") => Ok(Selection {
            engine: IoEngine::Threads,
            reason: format!("{ENGINE_ENV}=threads"),
        }),
        Some("uring") => match probe() {
            Ok(()) => Ok(Selection {
                engine: IoEngine::Uring,
                reason: format!("{ENGINE_ENV}=uring"),
            }),
            Err(reason) => Err(EngineError::UringUnavailable { reason }),
        },
        None | Some("") | Some("auto") => Ok(match probe() {
            Ok(()) => Selection {
                engine: IoEngine::Uring,
                reason: "io_uring probe passed".to_string(),
            },
            Err(reason) => Selection {
                engine: IoEngine::Threads,
                reason: format!("io_uring unavailable: {reason}"),
            },
        }),
        Some(other) => Err(EngineError::BadValue {
            value: other.to_string(),
        }),
    }
}

/// Sets up a small ring and checks that every opcode the engine uses is supported.
pub fn probe_uring() -> Result<(), String> {
    use io_uring::{opcode, IoUring, Probe};
    let ring = IoUring::new(4).map_err(|e| format!("io_uring_setup failed: {e}"))?;
    let mut probe = Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| format!("io_uring probe failed: {e}"))?;
    for (code, name) in [
        (opcode::Read::CODE, "READ"),
        (opcode::Write::CODE, "WRITE"),
        (opcode::Fsync::CODE, "FSYNC"),
    ] {
        if !probe.is_supported(code) {
            return Err(format!("the kernel does not support IORING_OP_{name}"));
        }
    }
    // The completion signal the engine relies on.
    let efd = super::uring::EventFd::new().map_err(|e| format!("eventfd failed: {e}"))?;
    ring.submitter()
        .register_eventfd(efd.raw())
        .map_err(|e| format!("registering an eventfd with io_uring failed: {e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn works() -> Result<(), String> {
        Ok(())
    }
    fn refused() -> Result<(), String> {
        Err("io_uring_setup failed: Operation not permitted".to_string())
    }

    #[test]
    fn auto_uses_uring_only_when_the_probe_passes() {
        for setting in [None, Some(""), Some("auto")] {
            assert_eq!(choose(setting, works).unwrap().engine, IoEngine::Uring);
            let fallback = choose(setting, refused).unwrap();
            assert_eq!(fallback.engine, IoEngine::Threads);
            assert!(
                fallback.reason.contains("Operation not permitted"),
                "{}",
                fallback.reason
            );
        }
    }

    #[test]
    fn threads_is_chosen_without_probing() {
        let chosen = choose(Some("threads"), || panic!("probed")).unwrap();
        assert_eq!(chosen.engine, IoEngine::Threads);
        assert!(chosen.reason.contains(ENGINE_ENV));
    }

    #[test]
    fn forced_uring_fails_loudly_when_unavailable() {
        assert_eq!(
            choose(Some("uring"), works).unwrap().engine,
            IoEngine::Uring
        );
        let err = choose(Some("uring"), refused).unwrap_err();
        assert!(err.to_string().contains("TINYLAG_IO_ENGINE=uring"), "{err}");
        assert!(err.to_string().contains("Operation not permitted"), "{err}");
    }

    #[test]
    fn bad_values_name_the_variable_and_the_accepted_forms() {
        let err = choose(Some("epoll"), || panic!("probed")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "TINYLAG_IO_ENGINE=epoll is not an I/O engine: expected uring, threads or auto"
        );
    }
}
