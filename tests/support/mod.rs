//! Helpers shared by the integration tests: starting S3 servers, the daemon and real
//! clients, and cleaning them up by pid. Each file is one concern.
//!
//! - `procs`: children killed by pid on drop, free ports, and the condition waits
//!   (`wait_until`, `wait_for`, `wait_for_port`, `wait_for_path`): a test waits for a socket,
//!   a status field, an LSN or a file, never a fixed time (the few waits that *are* the
//!   scenario, such as an outage's length, say so where they are);
//! - `daemon`: `tinylag serve` and any daemon's control socket (`control_status`,
//!   `wait_control`, `wait_applied`); `replay`: test journals and `tinylag replay`;
//! - `nbd`: the in-process NBD server, real clients with a timeout, and `RawClient`, the one
//!   hand-driven NBD client (Unix socket, TCP, or TLS after STARTTLS); `tls`: certificates;
//! - `s3`: the S3 servers (s3s-fs, moto) on 127.0.0.1; `oracle`, `timetravel`: expected
//!   images; `verdict`: the ext4 judge (`e2fsck -fy` on a copy must only do what a legal
//!   crash state needs, then `-fn` must be clean); `teardown`: mounts, loop devices and FUSE
//!   mounts undone newest first; `shell`: one bash session for the walkthroughs.
//!
//! `scripts/test` runs the suite from a copy with its own `TMPDIR` and ends with
//! `scripts/check-leftovers`, which fails on any mount, loop device or process left behind.
#![allow(dead_code)]

pub mod daemon;
pub mod ext4;
pub mod nbd;
pub mod objrep;
pub mod oracle;
pub mod procs;
pub mod prometheus;
pub mod replay;
pub mod request_bill;
pub mod s3;
pub mod shell;
pub mod teardown;
pub mod timetravel;
pub mod tls;
pub mod verdict;
pub mod vm;
