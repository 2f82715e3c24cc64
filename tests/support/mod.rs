//! Helpers shared by the integration tests: starting S3 servers, the daemon and real
//! clients, and cleaning them up by pid. Each file is one concern.
#![allow(dead_code)]

pub mod daemon;
pub mod ext4;
pub mod nbd;
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
