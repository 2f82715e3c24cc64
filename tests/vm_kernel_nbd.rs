//! The kernel's own NBD client against `tinylag serve`: a Debian kernel in a small VM
//! connects `nbd-client` (four connections) to the daemon on this machine, makes ext4 on
//! `/dev/nbd0`, copies files in, remounts and checks them, and fscks it. Back on the host
//! the primary is judged a clean filesystem, an image rebuilt from the journal alone equals
//! it, and so does a replica that a replay agent builds from the journal.

mod support;

use support::daemon::{init, Daemon};
use support::oracle::{assert_same_image, rebuild_local};
use support::procs::{free_port, path};
use support::replay::{replay_args, run_ok};
use support::vm::{vm_available, Guest};

/// The guest: connect, mkfs, fill, remount, verify, fsck, disconnect. Every step is checked
/// (`set -e`), and the script says which step it reached.
fn guest_script(port: u16) -> String {
    format!(
        r#"set -e
echo "step: connect"
nbd-client 10.0.2.2 {port} /dev/nbd0 -C 4 -b 4096
echo "step: mkfs"
/sbin/mkfs.ext4 -q -F -b 4096 /dev/nbd0
mount -t ext4 /dev/nbd0 /mnt
echo "step: fill"
i=0
while [ $i -lt 24 ]; do
    mkdir -p /mnt/d$((i % 4))
    dd if=/dev/urandom of=/tmp/f$i bs=4096 count=$((16 + i * 8)) 2>/dev/null
    cp /tmp/f$i /mnt/d$((i % 4))/f$i
    i=$((i + 1))
done
rm -r /mnt/d3
sync
umount /mnt
echo "step: verify"
mount -t ext4 -o ro /dev/nbd0 /mnt
i=0
while [ $i -lt 24 ]; do
    if [ $((i % 4)) -ne 3 ]; then cmp /tmp/f$i /mnt/d$((i % 4))/f$i; fi
    i=$((i + 1))
done
[ ! -e /mnt/d3 ]
umount /mnt
echo "step: fsck"
/sbin/e2fsck -fn /dev/nbd0
nbd-client -d /dev/nbd0
echo "step: done"
"#
    )
}

#[test]
fn the_kernel_nbd_client_makes_a_clean_ext4_that_the_journal_and_a_replica_reproduce() {
    if !vm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let primary = dir.path().join("primary.img");
    let journal = dir.path().join("journal");
    init(
        path(&journal),
        &primary,
        "96M",
        &["--segment-size", "1M"],
        &[],
    );
    let port = free_port();
    let mut daemon = Daemon::start(
        &primary,
        path(&journal),
        &["--listen", &format!("tcp:127.0.0.1:{port}")],
        &[],
    );

    let (code, console) = Guest::new(guest_script(port))
        .net()
        .module("nbd")
        .module("crc32c_generic")
        .module("ext4")
        .bin("/sbin/mkfs.ext4")
        .bin("/sbin/e2fsck")
        .run(dir.path());
    assert_eq!(
        code,
        0,
        "the guest failed; console:\n{console}\ndaemon log:\n{}",
        daemon.log_tail()
    );
    assert!(console.contains("step: done"), "{console}");

    let status = daemon.wait_status(
        std::time::Duration::from_secs(60),
        "the journal to drain",
        |s| s["durable_lsn"] == s["head_lsn"],
    );
    assert_eq!(status["mode"], "logging", "{status:#}");
    let head = status["head_lsn"].as_u64().unwrap();
    // The files that survive (d0..d2) hold 1872 blocks of random data; the kernel merges
    // them into large requests, so count bytes, not records.
    let kept_bytes: u64 = (0..24u64)
        .filter(|i| i % 4 != 3)
        .map(|i| (16 + i * 8) * 4096)
        .sum();
    let uploaded = status["bytes_uploaded"].as_u64().unwrap();
    assert!(
        uploaded >= kept_bytes,
        "the journal holds {uploaded} bytes, less than the {kept_bytes} bytes of files: {status:#}"
    );
    daemon.stop_ok();

    if let Err(verdict) = support::verdict::judge_ext4(&primary) {
        panic!("the primary is not a clean ext4:\n{verdict}");
    }
    let rebuilt = dir.path().join("rebuilt.img");
    assert_eq!(rebuild_local(&journal, &rebuilt, None), head);
    assert_same_image(&rebuilt, &primary);

    let replica = dir.path().join("replica.img");
    let mut args = replay_args(path(&journal), &replica, "vm");
    args.push("--once".into());
    run_ok(&args);
    assert_same_image(&replica, &primary);
}
