#!/usr/bin/env bash
# bench/profile.sh — where a 4 KiB write's CPU goes: 4k randwrite QD32 (fio's nbd engine)
# through `serve --no-journal` and `serve` with a local journal, each measured three ways in
# separate fio runs (and nbdkit's file plugin the same way, with CONFIGS=nbdkit, as the
# reference) (so one tool's overhead does not show up in another's count):
#   1. plain: IOPS, the server's CPU (utime + stime from /proc) and context switches
#      (voluntary + involuntary, summed over its threads) per request;
#   2. `perf record --call-graph dwarf` on the server: a flame graph SVG and its folded
#      stacks (bench/flamegraph.py), the top functions by self time, and the share of
#      samples in tokio's runtime, in the I/O engine, in the journal and in system calls;
#   3. `strace -c -f` on the server: system calls per request by name;
#   and 4. a uprobe on libc's malloc counted by `perf stat`: allocations per request.
# Output: bench/profile/<name>-<config>.{svg,folded,txt} (name from NAME, default "now").
#
# Needs: cargo, fio (nbd engine), perf, strace, python3. Environment: RUNTIME (s per run,
# default 8), SIZE (default 1G), BIN (a tinylag binary; default: build release here),
# CONFIGS (default "nojournal journal"), NAME, OUTDIR (default bench/profile).
set -euo pipefail
. "$(dirname "$0")/lib.sh"

ROOT=$(cd "$(dirname "$0")/.." && pwd)
RUNTIME=${RUNTIME:-8}
SIZE=${SIZE:-1G}
CONFIGS=${CONFIGS:-"nojournal journal"}
NAME=${NAME:-now}
OUTDIR=${OUTDIR:-$ROOT/bench/profile}
for tool in fio perf strace python3; do
    command -v "$tool" >/dev/null || { echo "bench/profile.sh: $tool is not installed" >&2; exit 2; }
done
if [[ -z ${BIN:-} ]]; then
    (cd "$ROOT" && cargo build --release --quiet)
    BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/tinylag
fi
export TINYLAG_LOG=warn
mkdir -p "$OUTDIR"
WORK=$(mktemp -d /var/tmp/tinylag-profile.XXXXXX)
PID=""
cleanup() {
    if [[ -n $PID ]]; then kill "$PID" 2>/dev/null || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT

wait_logging() {
    for _ in $(seq 6000); do
        if "$BIN" status --control "$1" --json 2>/dev/null | python3 -c \
            'import json,sys; s=json.load(sys.stdin); sys.exit(0 if s["mode"]=="logging" and s["durable_lsn"]>=s["head_lsn"] else 1)'; then
            return 0
        fi
        sleep 0.1
    done
    echo "bench/profile.sh: $1 never reached mode logging" >&2
    return 1
}
# Runs fio against $1 (socket) for RUNTIME s; prints the total I/Os.
fio_run() {
    fio --name=p --ioengine=nbd --uri="nbd+unix:///?socket=$1" --rw=randwrite --bs=4k \
        --iodepth=32 --size="$SIZE" --time_based --runtime="$RUNTIME" --norandommap \
        --randrepeat=0 --output-format=json --output="$WORK/fio.json" >/dev/null
    python3 -c 'import json,sys; j=json.load(open(sys.argv[1]))["jobs"][0]["write"]; print(j["total_ios"], j["iops"])' "$WORK/fio.json"
}

MALLOC_EVENT=""
LIBC=$(ldd "$BIN" | awk '/libc.so/ {print $3}')
if perf probe -q -x "$LIBC" malloc 2>/dev/null || perf probe -l 2>/dev/null | grep -q 'probe_libc:malloc'; then
    MALLOC_EVENT=probe_libc:malloc
fi

for config in $CONFIGS; do
    img=$WORK/$config.img sock=$WORK/$config.sock
    # Written through, not sparse: a 4k write into a hole would cost the file system an
    # allocation the measured server did not ask for.
    head -c "$SIZE" /dev/zero >"$img"
    rm -f "$sock"
    if [[ $config == journal ]]; then
        "$BIN" init --journal "$WORK/journal" --size "$SIZE" --primary "$img" >/dev/null
        "$BIN" serve --primary "$img" --journal "$WORK/journal" --listen "unix:$sock" \
            >"$WORK/serve.log" 2>&1 &
    elif [[ $config == nbdkit ]]; then
        nbdkit --unix "$sock" --foreground --exit-with-parent file "$img" &
    else
        "$BIN" serve --primary "$img" --no-journal --listen "unix:$sock" >"$WORK/serve.log" 2>&1 &
    fi
    PID=$!
    wait_socket "$sock"
    if [[ $config == journal ]]; then wait_logging "$img.ctl"; fi
    out=$OUTDIR/$NAME-$config
    {
        echo "# bench/profile.sh $config, $(date -u +%FT%TZ), load $(cut -d' ' -f1-3 /proc/loadavg)"
        echo "# binary $("$BIN" --version 2>/dev/null || basename "$BIN") (its path left out: the repository refers to nothing outside it)"
        # 1. plain
        c0=$(cpu_seconds "$PID") x0=$(ctx_switches "$PID")
        read -r ios iops < <(fio_run "$sock")
        c1=$(cpu_seconds "$PID") x1=$(ctx_switches "$PID")
        python3 -c 'import sys; ios,iops,c0,c1,x0,x1=map(float,sys.argv[1:]); print(f"plain: {iops:.0f} IOPS, CPU {1e6*(c1-c0)/ios:.1f} µs/request, {(x1-x0)/ios:.3f} context switches/request, {(c1-c0)/(ios*4096/1e9):.2f} CPU s/GB")' \
            "$ios" "$iops" "$c0" "$c1" "$x0" "$x1"
        # 4. allocations
        if [[ -n $MALLOC_EVENT ]]; then
            perf stat -e "$MALLOC_EVENT" -x, -o "$WORK/mallocs.csv" -p "$PID" -- sleep $((RUNTIME + 2)) &
            stat_pid=$!
            read -r ios _ < <(fio_run "$sock")
            wait "$stat_pid" || true
            python3 -c 'import sys; n=[l for l in open(sys.argv[1]) if "malloc" in l][0].split(",")[0]; print(f"malloc calls/request: {float(n)/float(sys.argv[2]):.2f} ({n} over {sys.argv[2]} requests, fio ran inside the counting window)")' \
                "$WORK/mallocs.csv" "$ios"
        else
            echo "malloc calls/request: not measured (perf probe on libc malloc failed)"
        fi
        # 2. perf
        perf_flamegraph "$PID" "4k randwrite QD32, serve $config ($NAME)" "$out" 30 fio_run "$sock"
        python3 - "$out.folded" <<'EOF'
import sys
total = 0
cats = {"tokio runtime (scheduler, wakers, park)": 0, "I/O engine (block::uring / block::file)": 0,
        "NBD transmission": 0, "writer ack path (primary core, range lock, intake)": 0,
        "journal encoder / segment": 0, "system calls (kernel, entered from user space)": 0}
threads = {}
for line in open(sys.argv[1]):
    stack, n = line.rsplit(" ", 1)
    n = int(n)
    total += n
    frames = stack.split(";")
    threads[frames[0]] = threads.get(frames[0], 0) + n
    s = stack
    if "entry_SYSCALL" in s or "do_syscall_64" in s:
        cats["system calls (kernel, entered from user space)"] += n
    if "tinylag::block::" in s:
        cats["I/O engine (block::uring / block::file)"] += n
    if "tinylag::nbd::" in s:
        cats["NBD transmission"] += n
    if "tinylag::writer::primary" in s or "range_lock" in s or "intake" in s:
        cats["writer ack path (primary core, range lock, intake)"] += n
    if "encoder" in s or "tinylag::journal::segment" in s or "journal_writer" in s:
        cats["journal encoder / segment"] += n
    # tokio's own frames at the top of the stack (not the user futures it polls)
    own = [f for f in frames[1:] if not f.startswith("[")]
    if own and ("tokio::" in own[-1] or "parking_lot" in own[-1]):
        cats["tokio runtime (scheduler, wakers, park)"] += n
print(f"samples: {total}; by thread: " + ", ".join(f"{k} {100*v/total:.1f}%" for k, v in sorted(threads.items(), key=lambda kv: -kv[1])))
for k, v in cats.items():
    print(f"  {100*v/total:5.1f}%  {k} (anywhere on the stack; tokio: self time in tokio frames)")
EOF
        # 3. strace
        strace_per_io "$PID" request fio_run "$sock"
    } | tee "$out.txt"
    stop "$PID"
    PID=""
    rm -rf "$WORK/journal" "$img" "$img.ctl"
done
