#!/usr/bin/env bash
# Time-travel benchmark (issue 8): `tinylag restore` and `tinylag mount --at` on a replica of
# SIZE (default 1G) whose journal holds a full fill and then WRITES random 4 KiB writes spread
# over SPAN seconds (default 600: "10 minutes of writes"; the timestamps are generated, not
# waited for: examples/timetravel_bench_journal.rs).
#
#   restore  `tinylag restore --at <SPAN seconds before the head>` (sparse copy of the replica,
#            then every undo record of the span written back, then an fsync: the image is
#            durable when restore returns) against `cp --sparse=always` of the same replica,
#            and against the same cp followed by `sync` of the copy (the same durability),
#            interleaved, RUNS times each (medians)
#   mount    `tinylag mount --at` the same point: time from starting the command until a first
#            4 KiB read through it returns (polling with nbdinfo-free raw reads: qemu-io), and
#            the client's own start-up time measured against an already running mount; then
#            fio 4k random reads (nbd engine, QD32 as issue 23 asks, and QD16 as measured
#            before, 10 s each) through the mount against the same replica served by
#            `tinylag serve --no-journal`, interleaved
#
#   probe    the same mount with the undo log's `undo.json` set back to format version 1 for
#            its rounds, so the mount does not trust the generation file and probes the store
#            after every batch of replica reads (the read path before the generation), in the
#            same rounds (PROBE_AB=0 leaves it out)
#   base     with BASE_BIN (another build's tinylag), the same mount measures of that build in the
#            same rounds, on its own replica of the same journal (replayed by that build, so its
#            undo log is one that build reads)
#
# Environment: PROFILE (release, or debug for a quick look), RUNS (default 3), BASE_BIN, SIZE (1G), WRITES (30000), SPAN (600), BENCH_DIR (scratch,
# default target/bench-timetravel; needs ~4x SIZE), BENCH_OUT (default BENCHMARKS.md: the
# "timetravel" section between its markers is replaced). Needs fio (nbd engine), qemu-io,
# python3.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$(dirname "$0")/.."

RUNS=${RUNS:-3}
SIZE=${SIZE:-1G}
WRITES=${WRITES:-30000}
SPAN=${SPAN:-600}
DIR=${BENCH_DIR:-$PWD/target/bench-timetravel}
OUT=${BENCH_OUT:-$PWD/BENCHMARKS.md}
TARGET=${CARGO_TARGET_DIR:-$PWD/target}
PROFILE=${PROFILE:-release}

for tool in fio qemu-io python3; do
    command -v "$tool" >/dev/null || { echo "bench/timetravel.sh needs $tool" >&2; exit 1; }
done

if [ "$PROFILE" = release ]; then
    cargo build --release --quiet --bin tinylag --example timetravel_bench_journal
else
    cargo build --quiet --bin tinylag --example timetravel_bench_journal
fi
BIN=$TARGET/$PROFILE/tinylag
GEN=$TARGET/$PROFILE/examples/timetravel_bench_journal

rm -rf "$DIR"
mkdir -p "$DIR"
RESULTS=$DIR/results.tsv
: >"$RESULTS"
PIDS=()
cleanup() {
    kill_pids
}
trap cleanup EXIT
export TINYLAG_LOG=warn


echo "journal: $SIZE fill + $WRITES random 4k writes over ${SPAN}s"
AT=$("$GEN" "$DIR/journal" "$SIZE" "$WRITES" "$SPAN")
REPLICA=$DIR/replica.img
start=$(now)
"$BIN" replay --journal "$DIR/journal" --replica "$REPLICA" --name bench --once >"$DIR/replay.log" 2>&1
echo "replayed in $(elapsed "$start" "$(now)") s; restore point $AT"
UNDO_BYTES=$(du -sb "$REPLICA.undo" | cut -f1)
if [ -n "${BASE_BIN:-}" ]; then
    "$BASE_BIN" replay --journal "$DIR/journal" --replica "$DIR/replica-base.img" --name bench-base \
        --once >"$DIR/replay-base.log" 2>&1
fi

"$BIN" restore --journal "$DIR/journal" --replica "$REPLICA" --at "$AT" --output "$DIR/plan" \
    --dry-run >"$DIR/plan.txt"
cat "$DIR/plan.txt"

for run in $(seq 1 "$RUNS"); do
    rm -f "$DIR/cp.img" "$DIR/restored.img"
    sync
    start=$(now)
    cp --sparse=always "$REPLICA" "$DIR/cp.img"
    printf 'restore\tcp\t%s\n' "$(elapsed "$start" "$(now)")" >>"$RESULTS"
    rm -f "$DIR/cp.img"
    sync
    start=$(now)
    cp --sparse=always "$REPLICA" "$DIR/cp.img"
    sync "$DIR/cp.img"
    printf 'restore\tcp-sync\t%s\n' "$(elapsed "$start" "$(now)")" >>"$RESULTS"
    rm -f "$DIR/cp.img"
    sync
    start=$(now)
    "$BIN" restore --journal "$DIR/journal" --replica "$REPLICA" --at "$AT" \
        --output "$DIR/restored.img" >"$DIR/restore.log" 2>&1
    printf 'restore\trestore\t%s\n' "$(elapsed "$start" "$(now)")" >>"$RESULTS"
done

# A first 4 KiB read through a fresh mount (of binary $1 on replica $2, results labelled $3),
# polling until it answers.
first_read() {
    local bin=$1 replica=$2 label=$3 sock=$DIR/mount.sock start t
    rm -f "$sock"
    start=$(now)
    "$bin" mount --journal "$DIR/journal" --replica "$replica" --at "$AT" --listen "unix:$sock" \
        >"$DIR/$label.log" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    until [ -S "$sock" ] && qemu-io -f raw -r -c "read 0 4k" "nbd+unix:///disk0?socket=$sock" >/dev/null 2>&1; do
        sleep 0.005
    done
    t=$(elapsed "$start" "$(now)")
    # The client's own start-up, against the running mount.
    start=$(now)
    qemu-io -f raw -r -c "read 0 4k" "nbd+unix:///disk0?socket=$sock" >/dev/null
    printf '%s\tfirst-read\t%s\n%s\tclient-start\t%s\n' "$label" "$t" "$label" "$(elapsed "$start" "$(now)")" >>"$RESULTS"
    MOUNT_PID=$pid
}

# fio 4k random reads through $2 at QD32 (results labelled $1) and at QD16 ($1-qd16).
randread() {
    local label=$1 uri=$2 qd name
    for qd in 32 16; do
        name=$label
        if [ "$qd" = 16 ]; then name=$label-qd16; fi
        fio --name=randread --ioengine=nbd --uri="$uri" --rw=randread --bs=4k --iodepth="$qd" \
            --size="$SIZE" --time_based --runtime=10 --ramp_time=1 --output-format=json \
            >"$DIR/fio-$name.json"
        python3 - "$DIR/fio-$name.json" "$name" >>"$RESULTS" <<'EOF'
import json, sys
text = open(sys.argv[1]).read()
j = json.loads(text[text.index("{"):])  # fio prints "connected to NBD server" first
print(f"iops\t{sys.argv[2]}\t{j['jobs'][0]['read']['iops']:.0f}")
EOF
    done
}

cp --sparse=always "$REPLICA" "$DIR/serve.img"
for run in $(seq 1 "$RUNS"); do
    first_read "$BIN" "$REPLICA" mount
    randread mount "nbd+unix:///disk0?socket=$DIR/mount.sock"
    kill "$MOUNT_PID"
    wait "$MOUNT_PID" 2>/dev/null || true
    if [ "${PROBE_AB:-1}" = 1 ]; then
        sed -i 's/"format_version": 2/"format_version": 1/' "$REPLICA.undo/undo.json"
        first_read "$BIN" "$REPLICA" mount-probe
        randread mount-probe "nbd+unix:///disk0?socket=$DIR/mount.sock"
        kill "$MOUNT_PID"
        wait "$MOUNT_PID" 2>/dev/null || true
        sed -i 's/"format_version": 1/"format_version": 2/' "$REPLICA.undo/undo.json"
    fi
    if [ -n "${BASE_BIN:-}" ]; then
        first_read "$BASE_BIN" "$DIR/replica-base.img" mount-base
        randread mount-base "nbd+unix:///disk0?socket=$DIR/mount.sock"
        kill "$MOUNT_PID"
        wait "$MOUNT_PID" 2>/dev/null || true
    fi
    sock=$DIR/serve.sock
    rm -f "$sock"
    "$BIN" serve --primary "$DIR/serve.img" --no-journal --listen "unix:$sock" --export disk0 \
        >"$DIR/serve.log" 2>&1 &
    spid=$!
    PIDS+=("$spid")
    until [ -S "$sock" ]; do sleep 0.01; done
    randread serve "nbd+unix:///disk0?socket=$sock"
    kill "$spid"
    wait "$spid" 2>/dev/null || true
done

python3 - "$RESULTS" "$OUT" "$SIZE" "$WRITES" "$SPAN" "$RUNS" "$UNDO_BYTES" "$(uname -r)" \
    "$(stat -f -c %T "$DIR")" "$(nproc)" "$PROFILE" <<'EOF' | write_section timetravel "$OUT"
import statistics, sys
from collections import defaultdict
results, out, size, writes, span, runs, undo, kernel, fs, cores, profile = sys.argv[1:]
v = defaultdict(list)
for line in open(results):
    part, label, value = line.split("\t")
    v[(part, label)].append(float(value))
m = {k: statistics.median(x) for k, x in v.items()}
cp, rs = m[("restore", "cp")], m[("restore", "restore")]
cps = m[("restore", "cp-sync")]
first, client = m[("mount", "first-read")], m[("mount", "client-start")]
im, iserve = m[("iops", "mount")], m[("iops", "serve")]
im16, iserve16 = m[("iops", "mount-qd16")], m[("iops", "serve-qd16")]
base = ""
if ("iops", "mount-probe") in m:
    pf, pi = m[("mount-probe", "first-read")], m[("iops", "mount-probe")]
    base += (f"| probing every batch (undo.json version 1): first 4 KiB read | {pf * 1000:.0f} ms | | | |\n"
             f"| probing every batch: 4k random read IOPS, QD32 | {pi:.0f} | `serve --no-journal`: {iserve:.0f} | {pi / iserve:.2f}x (generation / probing: {im / pi:.2f}x) | |\n")
if ("iops", "mount-base") in m:
    bf, bi = m[("mount-base", "first-read")], m[("iops", "mount-base")]
    base += (f"| BASE_BIN: `mount --at` start to first 4 KiB read | {bf * 1000:.0f} ms | | | |\n"
            f"| BASE_BIN: 4k random read IOPS (fio nbd, QD32) | {bi:.0f} | `serve --no-journal`: {iserve:.0f} | {bi / iserve:.2f}x (this build / BASE_BIN: {im / bi:.2f}x) | |\n")
section = f"""<!-- timetravel:begin -->
## timetravel

`bench/timetravel.sh`: a {size} replica whose journal holds a full fill (1 MiB writes), then
{writes} random 4 KiB writes with timestamps spread evenly over {span} s (generated, not waited
for: `examples/timetravel_bench_journal.rs`), applied by `tinylag replay --once` with an undo log
({int(undo) / 2**20:.0f} MiB). The restore point is {span} s before the head, so every random
write is undone. Medians of {runs} interleaved runs; {cores} cores shared with other builds and
tests running at the same time (numbers are noisy; ratios compare runs of the same moment);
{fs} scratch directory; Linux {kernel}; {profile} build.

| measure | tinylag | baseline (same run) | ratio | target |
|---|---|---|---|---|
| restore {size} to {span} s back | {rs:.2f} s | `cp --sparse=always`: {cp:.2f} s | {rs / cp:.2f}x | <= 1.5x |
| the same, against a copy as durable as restore's image | {rs:.2f} s | `cp --sparse=always` + `sync` of the copy: {cps:.2f} s | {rs / cps:.2f}x | |
| `mount --at` start to first 4 KiB read | {first * 1000:.0f} ms | the client alone: {client * 1000:.0f} ms | | <= 100 ms |
| 4k random read IOPS (fio nbd, QD32) | {im:.0f} | `serve --no-journal` of the replica: {iserve:.0f} | {im / iserve:.2f}x | >= 0.8x |
| the same at QD16 | {im16:.0f} | {iserve16:.0f} | {im16 / iserve16:.2f}x | |
{base}
The first-read time includes starting `tinylag mount` (opening the journal and undo log,
resolving the time, building the extent map from {writes} undo records' index entries) and
qemu-io's own start-up, measured alone in the next column.
<!-- timetravel:end -->
"""
print(section)
EOF
