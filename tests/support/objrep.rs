//! An object replica as the tests see it: where it is (a directory or a prefix on a local S3
//! server), what a child `tinylag` needs in its environment to reach it, and a store handle
//! to inspect what it holds. Shared by the object replica's tests so each file only adds the
//! steps its own scenarios repeat.
//!
//! Must never: print the S3 server's credentials (they travel in `env`, not in arguments).

use std::ffi::OsStr;
use std::path::Path;
use std::process::Output;
use std::sync::Arc;

use tinylag::objrep::manifest;
use tinylag::objrep::ReplicaManifest;
use tinylag::store::{LocalStore, ObjectStore};

use super::replay::{run_ok, tinylag, TestJournal};
use super::s3::S3Server;

/// Where the replica is and how a child process reaches it.
pub struct Replica {
    pub uri: String,
    pub env: Vec<(&'static str, String)>,
    pub store: Arc<dyn ObjectStore>,
}

impl Replica {
    /// A replica in the directory `dir`.
    pub fn local(dir: &Path) -> Replica {
        Replica {
            uri: format!("file://{}", dir.display()),
            env: Vec::new(),
            store: Arc::new(LocalStore::new(dir)),
        }
    }

    /// A replica under `prefix` on the local S3 server `s3`.
    pub fn on_s3(s3: &S3Server, prefix: &str) -> Replica {
        Replica {
            uri: s3.uri(prefix),
            env: s3.child_env(),
            store: Arc::new(s3.store(prefix)),
        }
    }

    /// `COMMAND… --journal J --replica URI EXTRA…` as arguments.
    pub fn args(&self, journal: &TestJournal, command: &[&str], extra: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = command.iter().map(|s| s.to_string()).collect();
        args.extend(
            ["--journal", journal.uri(), "--replica", &self.uri]
                .iter()
                .chain(extra)
                .map(|s| s.to_string()),
        );
        args
    }

    /// Runs `tinylag ARGS` with the replica's environment.
    pub fn run<S: AsRef<OsStr>>(&self, args: &[S]) -> Output {
        let mut cmd = tinylag();
        cmd.args(args)
            .envs(self.env.iter().map(|(k, v)| (*k, v.as_str())));
        cmd.output().expect("run tinylag")
    }

    /// [`Replica::run`], which must succeed.
    pub fn run_ok<S: AsRef<OsStr> + std::fmt::Debug>(&self, args: &[S]) -> Output {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "tinylag {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// The replica's newest manifest, if it has one.
    pub async fn manifest(&self) -> Option<ReplicaManifest> {
        manifest::load_latest(self.store.as_ref())
            .await
            .expect("read the replica's manifest")
    }

    /// Every key the replica's store holds.
    pub async fn keys(&self) -> Vec<String> {
        tinylag::store::list_all(self.store.as_ref(), "")
            .await
            .expect("list the replica")
            .into_iter()
            .map(|m| m.key)
            .collect()
    }
}

/// `journal trim --retain 0s`, which must succeed: from then on the past the journal held
/// is in the replica alone. Its output, for what it says it kept.
pub fn trim_the_journal(journal: &TestJournal) -> Output {
    run_ok(
        &[
            "journal",
            "trim",
            "--journal",
            journal.uri(),
            "--retain",
            "0s",
        ]
        .map(String::from),
    )
}
