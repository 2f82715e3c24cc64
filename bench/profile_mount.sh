#!/usr/bin/env bash
# bench/profile_mount.sh — where a 4 KiB read's CPU goes on `tinylag mount --at` against the
# same reads on `serve --no-journal` (issue 23's "4k random read QD32 on a mount / on serve"):
# 4k randread QD32 (fio's nbd engine) through each, measured three ways in separate fio runs,
# as bench/profile.sh does for writes:
#   1. plain: IOPS, the server's CPU (utime + stime from /proc) and context switches per read;
#   2. `perf record --call-graph dwarf` on the server: a flame graph SVG and its folded stacks
#      (bench/flamegraph.py) and the top functions by self time;
#   3. `strace -c -f` on the server: system calls per read by name.
# It reuses what `bench/timetravel.sh` leaves in its BENCH_DIR (run that first): the journal,
# the replica with its undo log, the restore point (from plan.txt's run, given as AT) and
# serve.img (the copy `serve` reads there), so both servers read what that script measured.
# Output: bench/profile/<NAME>-{mount,serve}.{svg,folded,txt}.
#
# Needs: fio (nbd engine), perf, strace, python3. Environment: BIN (tinylag binary, required),
# AT (the restore point, required: the time after "restore point" on the line timetravel.sh
# prints after its replay, not the one in its section's prose), BENCH_DIR (default
# target/bench-timetravel), RUNTIME (s per run, default 8), CONFIGS (default "mount serve"),
# NAME (default "mount"), OUTDIR (default bench/profile).
set -euo pipefail
. "$(dirname "$0")/lib.sh"

ROOT=$(cd "$(dirname "$0")/.." && pwd)
: "${BIN:?BIN: the tinylag binary to profile}" "${AT:?AT: the restore point timetravel.sh used}"
DIR=${BENCH_DIR:-$ROOT/target/bench-timetravel}
RUNTIME=${RUNTIME:-8}
CONFIGS=${CONFIGS:-"mount serve"}
NAME=${NAME:-mount}
OUTDIR=${OUTDIR:-$ROOT/bench/profile}
for tool in fio perf strace python3; do
    command -v "$tool" >/dev/null || { echo "$BENCH_NAME: $tool is not installed" >&2; exit 2; }
done
for f in "$DIR/journal" "$DIR/replica.img" "$DIR/serve.img"; do
    [[ -e $f ]] || { echo "$BENCH_NAME: $f is missing (run bench/timetravel.sh first)" >&2; exit 2; }
done
export TINYLAG_LOG=warn
mkdir -p "$OUTDIR"
WORK=$(mktemp -d /var/tmp/tinylag-profile-mount.XXXXXX)
PID=""
cleanup() {
    if [[ -n $PID ]]; then stop "$PID"; fi
    rm -rf "$WORK"
}
trap cleanup EXIT

# Runs fio against $1 (socket) for RUNTIME s; prints the total I/Os and the IOPS.
fio_run() {
    fio --name=p --ioengine=nbd --uri="nbd+unix:///disk0?socket=$1" --rw=randread --bs=4k \
        --iodepth=32 --size=1G --time_based --runtime="$RUNTIME" --output-format=json \
        --output="$WORK/fio.json" >/dev/null
    python3 -c 'import json,sys; t=open(sys.argv[1]).read(); j=json.loads(t[t.index("{"):])["jobs"][0]["read"]; print(j["total_ios"], j["iops"])' "$WORK/fio.json"
}

for config in $CONFIGS; do
    sock=$WORK/$config.sock
    if [[ $config == mount ]]; then
        "$BIN" mount --journal "$DIR/journal" --replica "$DIR/replica.img" --at "$AT" \
            --listen "unix:$sock" >"$WORK/$config.log" 2>&1 &
    else
        "$BIN" serve --primary "$DIR/serve.img" --no-journal --listen "unix:$sock" \
            --export disk0 >"$WORK/$config.log" 2>&1 &
    fi
    PID=$!
    wait_socket "$sock"
    out=$OUTDIR/$NAME-$config
    {
        echo "# $BENCH_NAME $config, $(date -u +%FT%TZ), load $(cut -d' ' -f1-3 /proc/loadavg)"
        # Warm: the first run of a fresh mount reads undo payloads into its cache.
        fio_run "$sock" >/dev/null
        c0=$(cpu_seconds "$PID") x0=$(ctx_switches "$PID")
        read -r ios iops < <(fio_run "$sock")
        c1=$(cpu_seconds "$PID") x1=$(ctx_switches "$PID")
        python3 -c 'import sys; ios,iops,c0,c1,x0,x1=map(float,sys.argv[1:]); print(f"plain: {iops:.0f} IOPS, CPU {1e6*(c1-c0)/ios:.2f} µs/read, {(x1-x0)/ios:.3f} context switches/read")' \
            "$ios" "$iops" "$c0" "$c1" "$x0" "$x1"
        perf_flamegraph "$PID" "4k randread QD32, $config ($NAME)" "$out" 25 fio_run "$sock"
        strace_per_io "$PID" read fio_run "$sock"
    } | tee "$out.txt"
    stop "$PID"
    PID=""
done
