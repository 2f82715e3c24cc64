//! `serve --frontend ublk` against the kernel's own `ublk_drv`, in a small VM (Debian's
//! backports kernel under QEMU): the daemon serves a primary file inside the guest as
//! `/dev/ublkb0`, and the guest writes patterns and reads them back with `dd`/`cmp`,
//! discards and zeroes ranges (`blkdiscard`, `blkdiscard -z`), makes, fills, remounts and
//! checks an ext4 (`mkfs.ext4`, `e2fsck -fn`), kills the daemon with -9 and has a new one
//! re-attach to the same device (user recovery) with the data intact, and stops it cleanly.
//! Before the kill and after the stop, a replica rebuilt from the journal alone
//! (`replay --once`) equals the primary. Last, the daemon is killed again while a copy into
//! the mounted filesystem is in flight, and the copy completes through its successor; and an
//! `--unprivileged` device serves too. Each step prints a marker; the host checks the markers and the code.

mod support;

use std::path::Path;

use support::vm::{run_ublk_guest, GUEST_DAEMON_LIB};

fn guest_script(tinylag: &Path) -> String {
    let t = tinylag.display();
    let lib = GUEST_DAEMON_LIB;
    format!(
        r#"set -e
T={t}
D=/dev/ublkb0
SERVE="$T serve --primary /tmp/p.img --journal /tmp/j --frontend ublk --dev-id 0 \
    --user-recovery --queues 2 --depth 16 --io-buf-size 256K --pool-size 64M --linger 50ms --compress off"
LOGS=/tmp/serve.log
{lib}
replica_equals_primary() {{ # replay what the journal holds, compare with the primary
    $T replay --journal /tmp/j --replica /tmp/r.img --name vm --once >/tmp/replay.log 2>&1 \
        || {{ cat /tmp/replay.log; fail "replay"; }}
    cmp /tmp/r.img /tmp/p.img || fail "the replica differs from the primary ($1)"
}}
zeroes() {{ # zeroes OFFSET_KIB LEN_KIB: that range of the device reads as zeroes
    dd if=$D of=/tmp/z bs=1024 skip=$1 count=$2 2>/dev/null
    dd if=/dev/zero of=/tmp/zz bs=1024 count=$2 2>/dev/null
    cmp /tmp/z /tmp/zz || fail "not zero at $1K+$2K"
}}

echo "step: init ($(cut -d" " -f1 /proc/uptime)s)"
$T init --journal /tmp/j --size 64M --primary /tmp/p.img --segment-size 1M >/dev/null
$SERVE >/tmp/serve.log 2>&1 &
PID=$!
wait_for /tmp/serve.log "as /dev/ublkb0"
[ -b $D ] || fail "no $D"
[ "$(cat /sys/block/ublkb0/queue/logical_block_size)" = 4096 ] || fail "block size"
[ "$(cat /sys/block/ublkb0/queue/chunk_sectors)" = 8192 ] || fail "chunk_sectors"
[ "$(cat /sys/block/ublkb0/queue/write_cache)" = "write back" ] || fail "write cache"
[ "$(cat /sys/block/ublkb0/queue/discard_max_bytes)" != 0 ] || fail "no discard"
[ "$(cat /sys/block/ublkb0/queue/write_zeroes_max_bytes)" != 0 ] || fail "no write-zeroes"
[ "$(cat /sys/block/ublkb0/size)" = 131072 ] || fail "size"

echo "step: patterns ($(cut -d" " -f1 /proc/uptime)s)"
dd if=/dev/urandom of=/tmp/a bs=4096 count=1500 2>/dev/null
# Across a region boundary (4 MiB), in large requests, with a flush at the end.
dd if=/tmp/a of=$D bs=256K seek=14 conv=fsync 2>/dev/null
dd if=$D of=/tmp/b bs=256K skip=14 count=24 2>/dev/null
cmp -n 6144000 /tmp/a /tmp/b || fail "pattern 1"
# Small odd blocks, direct.
dd if=/tmp/a of=$D bs=4096 seek=9001 count=33 oflag=direct 2>/dev/null
dd if=$D of=/tmp/b bs=4096 skip=9001 count=33 iflag=direct 2>/dev/null
cmp -n 135168 /tmp/a /tmp/b || fail "pattern 2"
# The end of the device, and a read past it fails.
dd if=/tmp/a of=$D bs=4096 seek=16383 count=1 conv=fsync 2>/dev/null
dd if=$D of=/tmp/b bs=4096 skip=16383 count=1 2>/dev/null
cmp -n 4096 /tmp/a /tmp/b || fail "last block"

echo "step: discard ($(cut -d" " -f1 /proc/uptime)s)"
/usr/sbin/blkdiscard -o 4194304 -l 1048576 $D
zeroes 4096 1024
echo "step: write-zeroes ($(cut -d" " -f1 /proc/uptime)s)"
/usr/sbin/blkdiscard -z -o 5242880 -l 524288 $D
zeroes 5120 512
dd if=$D of=/tmp/b bs=1024 skip=3584 count=512 2>/dev/null
dd if=/tmp/a of=/tmp/c bs=1024 count=512 2>/dev/null
cmp /tmp/b /tmp/c || fail "discard reached outside its range"

echo "step: ext4 ($(cut -d" " -f1 /proc/uptime)s)"
/sbin/mkfs.ext4 -q -F -b 4096 $D
mount -t ext4 $D /mnt
i=0
while [ $i -lt 12 ]; do
    mkdir -p /mnt/d$((i % 3))
    dd if=/dev/urandom of=/tmp/f$i bs=4096 count=$((8 + i * 16)) 2>/dev/null
    cp /tmp/f$i /mnt/d$((i % 3))/f$i
    i=$((i + 1))
done
rm -r /mnt/d2
sync
umount /mnt
/sbin/e2fsck -fn $D >/tmp/fsck.log 2>&1 || {{ cat /tmp/fsck.log; fail "fsck"; }}

echo "step: replay ($(cut -d" " -f1 /proc/uptime)s)"
wait_drained
$T status --primary /tmp/p.img --json | grep -q '"mode": "logging"' || fail "not logging"
replica_equals_primary "first daemon"

echo "step: kill -9 ($(cut -d" " -f1 /proc/uptime)s)"
kill -9 $PID
wait $PID 2>/dev/null || true
[ -e /sys/block/ublkb0 ] || fail "the device went away with the daemon"
$SERVE >/tmp/serve.log 2>&1 &
PID=$!
wait_for /tmp/serve.log "as /dev/ublkb0 (re-attached)"
mount -t ext4 $D /mnt
i=0
while [ $i -lt 12 ]; do
    if [ $((i % 3)) -ne 2 ]; then cmp /tmp/f$i /mnt/d$((i % 3))/f$i || fail "f$i after re-attach"; fi
    i=$((i + 1))
done
[ ! -e /mnt/d2 ] || fail "d2 is back"
cp /tmp/f11 /mnt/after
sync
umount /mnt
/sbin/e2fsck -fn $D >/tmp/fsck.log 2>&1 || {{ cat /tmp/fsck.log; fail "fsck after re-attach"; }}

echo "step: stop ($(cut -d" " -f1 /proc/uptime)s)"
kill -TERM $PID
wait $PID || fail "the daemon's clean stop failed"
lsns=$(sed -n 's/^stopped: .*durable through LSN \([0-9]*\) of \([0-9]*\).*/\1 \2/p' /tmp/serve.log)
[ -n "$lsns" ] && [ "${{lsns% *}}" = "${{lsns#* }}" ] || fail "the journal did not drain at the stop"
deadline=$(( $(now) + 30 ))
while [ -e /sys/block/ublkb0 ]; do
    [ $(now) -lt $deadline ] || fail "the device outlived a clean stop"; sleep 0.2
done

echo "daemon log after the re-attach:"; cat /tmp/serve.log
# The killed daemon had drained its journal; its successor journals from where it stopped.
echo "step: replay again ($(cut -d" " -f1 /proc/uptime)s)"
replica_equals_primary "after the re-attach"

# Now with writes in flight: the filesystem sees a pause, not an error.
echo "step: kill -9 under I/O ($(cut -d" " -f1 /proc/uptime)s)"
$SERVE >/tmp/serve.log 2>&1 &
PID=$!
wait_for /tmp/serve.log "as /dev/ublkb0"
mount -t ext4 $D /mnt
dd if=/dev/urandom of=/tmp/big bs=65536 count=192 2>/dev/null
dd if=/tmp/big of=/mnt/big bs=65536 conv=fsync 2>/tmp/dd.log &
DD=$!
sleep 1
kill -0 $DD 2>/dev/null && echo "the copy was in flight at the kill"
kill -9 $PID
wait $PID 2>/dev/null || true
echo "killed ($(cut -d" " -f1 /proc/uptime)s)"
$SERVE >/tmp/serve.log 2>&1 &
PID=$!
wait_for /tmp/serve.log "as /dev/ublkb0 (re-attached)"
echo "re-attached ($(cut -d" " -f1 /proc/uptime)s)"
wait $DD || {{ cat /tmp/dd.log; fail "the copy failed across the re-attach"; }}
echo "copied ($(cut -d" " -f1 /proc/uptime)s)"
cmp /tmp/big /mnt/big || fail "the copy differs after the re-attach"
cmp /tmp/f0 /mnt/d0/f0 || fail "an old file changed"
umount /mnt
/sbin/e2fsck -fn $D >/tmp/fsck.log 2>&1 || {{ cat /tmp/fsck.log; fail "fsck after kill under I/O"; }}
kill -TERM $PID
wait $PID || fail "the last daemon's clean stop failed"
echo "daemon log after the re-attach under I/O:"; cat /tmp/serve.log

echo "step: unprivileged ($(cut -d" " -f1 /proc/uptime)s)"
$T serve --primary /tmp/p.img --journal /tmp/j --frontend ublk --unprivileged --dev-id 1 \
    >/tmp/serve.log 2>&1 &
PID=$!
wait_for /tmp/serve.log "as /dev/ublkb1"
dd if=/tmp/a of=/dev/ublkb1 bs=4096 count=64 conv=fsync 2>/dev/null
dd if=/dev/ublkb1 of=/tmp/b bs=4096 count=64 2>/dev/null
cmp -n 262144 /tmp/a /tmp/b || fail "unprivileged device"
kill -TERM $PID
wait $PID || fail "the unprivileged daemon's clean stop failed"
echo "primary $(sha256sum /tmp/p.img)"
echo "step: done ($(cut -d" " -f1 /proc/uptime)s)"
"#
    )
}

#[test]
fn ublk_serves_patterns_discard_zeroes_ext4_recovery_and_a_journal_that_rebuilds_the_primary() {
    run_ublk_guest(
        guest_script,
        &[
            "patterns",
            "discard",
            "write-zeroes",
            "ext4",
            "kill -9",
            "replay",
            "stop",
            "replay again",
            "kill -9 under I/O",
            "unprivileged",
            "done",
        ],
    );
}
