#!/usr/bin/env bash
# `mount --at --replica URI` from an object replica on s3s-fs (issue 24): time to the
# first byte, process start included (target <= 250 ms), and sequential read MB/s of the
# whole device with nbdcopy, against the same from a `mount` of a file replica of the same
# journal. A journal of SIZE (1G) of 1 MiB writes of half-random data (every byte written,
# `examples/objrep_bill.rs journal`), mounted as of now (its end); the object replica is
# replayed in one run and compacted (one image, parts of 64 MiB), the file replica replayed
# beside it.
# RUNS (3) interleaved runs, medians; page cache dropped before each when run as root. The
# cache of the object mount is the default (1 GiB, under $TMPDIR), emptied by each new mount.
#
#   bench/object_replica_mount.sh              # release build, 1 GiB, 3 runs
#   SIZE=256M RUNS=5 bench/object_replica_mount.sh
#
# Environment: BENCH_DIR (scratch, default target/bench-objm), CARGO_PROFILE (release),
# TINYLAG_TOOLS (where bin/s3s-fs is). Writes the section objrep-mount of BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh

DIR=${BENCH_DIR:-$PWD/target/bench-objm}
PROFILE=${CARGO_PROFILE:-release}
TARGET=${CARGO_TARGET_DIR:-$PWD/target}
SIZE=${SIZE:-1G}
RUNS=${RUNS:-3}
S3FS=${TINYLAG_TOOLS:-$HOME/.cache/tinylag/tools}/bin/s3s-fs
sub=debug
[[ $PROFILE == release ]] && sub=release
for tool in nbdcopy qemu-io python3 "$S3FS"; do
    command -v "$tool" >/dev/null || { echo "$BENCH_NAME needs $tool" >&2; exit 1; }
done

cargo build --quiet --profile "$PROFILE" --example objrep_bill --bin tinylag
BIN=$TARGET/$sub/tinylag
GEN=$TARGET/$sub/examples/objrep_bill
rm -rf "$DIR"
mkdir -p "$DIR/s3/bench"
RESULTS=$DIR/results.tsv
: >"$RESULTS"
trap kill_pids EXIT
export TINYLAG_LOG=warn

"$GEN" journal "$DIR/journal" "$SIZE" >"$DIR/journal.json"
start_s3fs "$DIR/s3" "$DIR/s3.log"
OBJ=s3://bench/replica
env "${S3ENV[@]}" "$BIN" replay --journal "$DIR/journal" --replica "$OBJ" --name obj --once \
    >"$DIR/replay-obj.log" 2>&1
env "${S3ENV[@]}" "$BIN" replica compact --journal "$DIR/journal" --replica "$OBJ" \
    >"$DIR/compact.log" 2>&1
"$BIN" replay --journal "$DIR/journal" --replica "$DIR/file.img" --name file --once \
    >"$DIR/replay-file.log" 2>&1
AT="@$(date +%s)"

drop() { [[ $(id -u) == 0 ]] && sync && echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true; }

# Mounts replica $2 (labelled $1; extra env in the rest) and records the time from the start
# of the process to the first 4 KiB read a fresh qemu-io gets back; leaves MOUNT_PID and SOCK.
first_read() {
    local label=$1 replica=$2 start t
    shift 2
    SOCK=$DIR/$label.sock
    rm -f "$SOCK"
    drop
    start=$(now)
    env "$@" "$BIN" mount --journal "$DIR/journal" --replica "$replica" --at "$AT" \
        --listen "unix:$SOCK" >>"$DIR/$label.log" 2>&1 &
    MOUNT_PID=$!
    PIDS+=("$MOUNT_PID")
    until [ -S "$SOCK" ] && qemu-io -f raw -r -c "read 0 4k" "nbd+unix:///disk0?socket=$SOCK" \
        >/dev/null 2>&1; do
        kill -0 "$MOUNT_PID" 2>/dev/null || { echo "mount $label died:" >&2; tail "$DIR/$label.log" >&2; exit 1; }
        sleep 0.005
    done
    t=$(elapsed "$start" "$(now)")
    printf '%s\tfirst-read\t%s\n' "$label" "$t" >>"$RESULTS"
    # The client's own start-up, against the running mount (part of the figure above).
    start=$(now)
    qemu-io -f raw -r -c "read 0 4k" "nbd+unix:///disk0?socket=$SOCK" >/dev/null
    printf '%s\tclient-start\t%s\n' "$label" "$(elapsed "$start" "$(now)")" >>"$RESULTS"
}

# The whole device read sequentially by nbdcopy into nothing: MB/s.
seq_read() {
    local label=$1 start t bytes
    bytes=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["bytes"])' "$DIR/journal.json")
    start=$(now)
    nbdcopy "nbd+unix:///disk0?socket=$SOCK" null:
    t=$(elapsed "$start" "$(now)")
    python3 -c "import sys; print(f'$label\tseq-MBps\t{$bytes / 1e6 / float(sys.argv[1]):.1f}')" "$t" >>"$RESULTS"
}

echo "load before: $(uptime)" >&2
for run in $(seq 1 "$RUNS"); do
    first_read object "$OBJ" "${S3ENV[@]}"
    seq_read object
    stop "$MOUNT_PID"
    first_read file "$DIR/file.img" TINYLAG_LOG=warn
    seq_read file
    stop "$MOUNT_PID"
done
echo "load after: $(uptime)" >&2

python3 - "$RESULTS" "$SIZE" "$RUNS" "$(uptime | sed 's/.*load average: //')" <<'PY' | write_section objrep-mount BENCHMARKS.md
import statistics, sys
rows = [l.split("\t") for l in open(sys.argv[1]).read().split("\n") if l]
med = lambda label, what: statistics.median(float(v) for l, w, v in rows if l == label and w == what)
print("### Lazy mount of the object replica (`bench/object_replica_mount.sh`)")
print()
print(f"A {sys.argv[2]} device, every byte written (1 MiB writes), compacted to one image on "
      f"s3s-fs (loopback); medians of {sys.argv[3]} interleaved runs, release build, load "
      f"average at the end {sys.argv[4]}.")
print()
print("| mount of | first 4 KiB read, process start included (ms) | of which qemu-io's start (ms) | sequential read, nbdcopy (MB/s) |")
print("|---|---|---|---|")
for label, name in (("object", "object replica on s3s-fs (lazy, cache 1 GiB)"), ("file", "file replica")):
    print(f"| {name} | {med(label, 'first-read') * 1000:.0f} | {med(label, 'client-start') * 1000:.0f} | "
          f"{med(label, 'seq-MBps'):.0f} |")
PY
