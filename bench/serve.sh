#!/usr/bin/env bash
# bench/serve.sh — what journaling costs the primary.
#
# fio's nbd engine drives three workloads (4k randwrite QD32, 4k randread QD32, 1M seqwrite
# QD4) against these servers, all on one file system, in one run:
#   a  nbdkit file            (the reference NBD server on the same kind of file)
#   b  tinylag serve --no-journal   (the same core, nothing journaled: for measurement only)
#   c  tinylag serve, journal in a local directory
#   d  tinylag serve, journal on a local S3 server (s3s-fs)
#   e  as c with --compress off (what zstd costs)
#   f  no server: fio's io_uring engine on the file itself, same queue depth (the NBD hop's
#      cost is b against f)
#   g  as b with TINYLAG_IO_ENGINE=threads (the fallback engine: what io_uring gained)
#   s  seqwrite-1M only, no server: fio writing files of the segment size (8 MiB, the
#      default) into a directory on the same file system, 1M writes, fsync at close, 4 jobs
#      (the default splay width): the bandwidth the local journal can hope for
#   x  as c with the binary at BASE_BIN (an A/B of two builds in one run; only when asked)
#   y  as d with the binary at BASE_BIN (the same for the S3 journal)
#   z  as b with the binary at BASE_BIN (the A/B without the journal)
#   m  as c with --max-buffered 64M, the smallest NBD buffer budget (the memory bound at
#      its tightest; against x with a BASE_BIN from before the bound: what the bound costs)
#   k  as c with --encryption-key (encryption at rest; bench/encryption.sh runs c and k)
# Journaled servers (c, d, e, m, x, y) are measured once their initial full resync is done.
# Then, for c and d, "half-4k": 4k randwrite QD32 rate-limited to half of c's median
# randwrite-4k IOPS in this run, for the ack→durable p99 at a load the journal must sustain.
# And "sweep-1M": 1M seqwrite QD4 rate-limited to each of SWEEP (MB/s) on c, d, x, y and k, recording whether the pool overflowed (the mode left `logging`): where the journal
# stops absorbing large writes.
# Every (server, workload) pair runs REPS times with a fresh server (and a fresh journal),
# interleaved (rep 1 of every server, then rep 2, ...; each rep starts one server further
# along, so no server always runs right after the same one and its writeback); the table in BENCHMARKS.md (section
# "serve") shows medians, the ratios against the targets, the p99 ack→durable lag (from the
# daemon's status), the server's CPU seconds per GB written (utime + stime from /proc, the
# S3 server's own CPU not included) and the peak RSS (VmHWM).
#
# Needs: cargo, fio (with the nbd engine), nbdkit, python3, s3s-fs (scripts/install-test-deps.sh).
# Environment: RUNTIME (s per run, default 10), REPS (default 3), SIZE (primary, default 1G),
# BENCH_DIR (work directory; default a fresh one under /var/tmp, removed at the end),
# CONFIGS (default "a b c d e f g s"), OUT (default BENCHMARKS.md in the checkout),
# WORKLOADS (default "randwrite-4k randread-4k seqwrite-1M half-4k"; add sweep-1M),
# SWEEP (MB/s steps of sweep-1M on c, d and x; default "300 600 900 1200"), BASE_BIN (config x),
# TABLE_ONLY=1 (with BENCH_DIR: only rewrite the table from that directory's results.tsv).
set -euo pipefail
. "$(dirname "$0")/lib.sh"

ROOT=$(cd "$(dirname "$0")/.." && pwd)
RUNTIME=${RUNTIME:-10}
REPS=${REPS:-3}
SIZE=${SIZE:-1G}
CONFIGS=${CONFIGS:-"a b c d e f g s"}
OUT=${OUT:-$ROOT/BENCHMARKS.md}
S3FS=${TINYLAG_TOOLS:-$HOME/.cache/tinylag/tools}/bin/s3s-fs
WORKLOADS=${WORKLOADS:-"randwrite-4k randread-4k seqwrite-1M half-4k"}
SWEEP=${SWEEP:-"300 600 900 1200"}
if [[ $CONFIGS == *[xyz]* && ! -x ${BASE_BIN:-} ]]; then
    echo "bench/serve.sh: configs x, y and z need BASE_BIN, the other build's tinylag binary" >&2
    exit 2
fi

for tool in fio nbdkit python3 cargo; do
    command -v "$tool" >/dev/null || { echo "bench/serve.sh: $tool is not installed" >&2; exit 2; }
done
if [[ $CONFIGS == *[dy]* && ! -x $S3FS ]]; then
    echo "bench/serve.sh: s3s-fs not found at $S3FS (run scripts/install-test-deps.sh)" >&2
    exit 2
fi

WORK=${BENCH_DIR:-$(mktemp -d /var/tmp/tinylag-bench.XXXXXX)}
mkdir -p "$WORK"
RESULTS=$WORK/results.tsv
if [[ -z ${TABLE_ONLY:-} ]]; then : >"$RESULTS"; fi
PIDS=()
cleanup() {
    kill_pids
    if [[ -z ${BENCH_DIR:-} ]]; then rm -rf "$WORK"; fi
}
trap cleanup EXIT

# The measurements (everything up to the table), skipped with TABLE_ONLY=1.
measure() {
(cd "$ROOT" && cargo build --release --quiet)
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/tinylag
export TINYLAG_LOG=warn

# One primary image per server, written with random data once (reads must hit real blocks).
SEED=$WORK/seed.img
python3 - "$SEED" "$SIZE" <<'EOF'
import os, sys
path, size = sys.argv[1], sys.argv[2]
units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
n = int(size[:-1]) * units[size[-1].upper()] if size[-1].isalpha() else int(size)
block = os.urandom(1 << 20)
with open(path, "wb") as f:
    for i in range(n >> 20):
        f.write(block[i % 64:] + block[: i % 64])
EOF
for c in $CONFIGS; do
    if [[ $c != s ]]; then cp --sparse=never "$SEED" "$WORK/$c.img"; fi
done
rm -f "$SEED"


hwm_bytes() { awk '/^VmHWM:/ {print $2 * 1024}' "/proc/$1/status"; }



# Starts server $1 (a..g); sets URI (empty for f: fio opens the file), PID (empty for f),
# CTL (empty for nbdkit) and S3PID.
start_server() {
    local c=$1 img=$WORK/$1.img sock=$WORK/$1.sock
    CTL="" S3PID="" PID="" URI=""
    rm -rf "$WORK/journal-$c" "$WORK/s3-$c" "$sock"
    case $c in
    f | s)
        return 0
        ;;
    g)
        TINYLAG_IO_ENGINE=threads "$BIN" serve --primary "$img" --no-journal \
            --listen "unix:$sock" >"$WORK/$c.log" 2>&1 &
        PID=$!
        CTL=$img.ctl
        ;;
    a)
        nbdkit --unix "$sock" --foreground --exit-with-parent file "$img" &
        PID=$!
        ;;
    b | z)
        local bin=$BIN
        if [[ $c == z ]]; then bin=$BASE_BIN; fi
        "$bin" serve --primary "$img" --no-journal --listen "unix:$sock" >"$WORK/$c.log" 2>&1 &
        PID=$!
        CTL=$img.ctl
        ;;
    c | e | m | x | k)
        local extra=() bin=$BIN
        if [[ $c == e ]]; then extra=(--compress off); fi
        if [[ $c == k ]]; then
            [[ -f $WORK/bench.key ]] || "$bin" key generate --output "$WORK/bench.key" >/dev/null
            extra=(--encryption-key "$WORK/bench.key")
        fi
        if [[ $c == m ]]; then extra=(--max-buffered 64M); fi
        if [[ $c == x ]]; then bin=$BASE_BIN; fi
        # An encrypted journal is chosen at init (k): the key goes to init as well.
        local init_extra=()
        if [[ $c == k ]]; then init_extra=("${extra[@]}"); fi
        "$bin" init --journal "$WORK/journal-$c" --size "$SIZE" --primary "$img" \
            "${init_extra[@]}" >/dev/null
        SERVE=(env "$bin" serve --primary "$img" --journal "$WORK/journal-$c"
            --listen "unix:$sock" "${extra[@]}")
        "${SERVE[@]}" >"$WORK/$c.log" 2>&1 &
        PID=$!
        CTL=$img.ctl
        ;;
    d | y)
        local bin=$BIN
        if [[ $c == y ]]; then bin=$BASE_BIN; fi
        mkdir -p "$WORK/s3-$c/bench"
        start_s3fs "$WORK/s3-$c" "$WORK/s3.log"
        env "${S3ENV[@]}" "$bin" init --journal s3://bench/j --size "$SIZE" --primary "$img" \
            >/dev/null
        SERVE=(env "${S3ENV[@]}"
            "$bin" serve --primary "$img" --journal s3://bench/j --listen "unix:$sock")
        "${SERVE[@]}" >"$WORK/$c.log" 2>&1 &
        PID=$!
        CTL=$img.ctl
        ;;
    esac
    PIDS+=("$PID")
    wait_socket "$sock"
    URI="nbd+unix:///?socket=$sock"
    if [[ $c == [cdemxyk] ]]; then
        # Journaled: let the initial full resync finish, then restart from the clean stop
        # (mode logging at once, fresh ack→durable histogram).
        wait_logging
        stop "$PID"
        "${SERVE[@]}" >>"$WORK/$c.log" 2>&1 &
        PID=$!
        PIDS+=("$PID")
        wait_socket "$sock"
        wait_logging
    fi
}

# A new journal over a primary with data starts in forward-full: the daemon journals the
# whole primary first. Waits (up to 10 min) until that is done, so that the runs measure
# steady-state journaling, not the initial resync competing with it (start_server then
# restarts the daemon, so its ack→durable histogram holds only the measured run).
wait_logging() {
    for _ in $(seq 6000); do
        if "$BIN" status --control "$CTL" --json 2>/dev/null | python3 -c \
            'import json,sys; s=json.load(sys.stdin); sys.exit(0 if s["mode"]=="logging" and s["durable_lsn"]>=s["head_lsn"] else 1)'; then
            return 0
        fi
        sleep 0.1
    done
    echo "bench/serve.sh: $CTL never reached mode logging" >&2
    return 1
}

# Waits until the daemon's journal has caught up, then prints its status JSON.
settled_status() {
    for _ in $(seq 600); do
        local s
        s=$("$BIN" status --control "$CTL" --json)
        if python3 -c 'import json,sys; s=json.load(sys.stdin); sys.exit(0 if s["mode"]=="no-journal" or s["durable_lsn"]>=s["head_lsn"] else 1)' <<<"$s"; then
            echo "$s"
            return
        fi
        sleep 0.1
    done
    "$BIN" status --control "$CTL" --json
}

# The load for half-4k: half of c's median randwrite-4k IOPS measured above (or of the
# first journaled config's, without c).
half_rate() {
    python3 - "$RESULTS" <<'EOF'
import statistics, sys
rows = [l.split("\t") for l in open(sys.argv[1])]
for c in "cdex":
    v = [float(r[3]) for r in rows if r[0] == c and r[1] == "randwrite-4k"]
    if v:
        print(int(statistics.median(v) / 2))
        break
else:
    print(0)
EOF
}

# sweep-1M stands for one workload per rate step.
workloads=()
for wl in $WORKLOADS; do
    if [[ $wl == sweep-1M ]]; then
        for r in $SWEEP; do workloads+=("seqwrite-1M@$r"); done
    else
        workloads+=("$wl")
    fi
done
for wl in "${workloads[@]}"; do
    configs=$CONFIGS
    case $wl in
    randwrite-4k) args=(--rw=randwrite --bs=4k --iodepth=32) ;;
    randread-4k) args=(--rw=randread --bs=4k --iodepth=32) ;;
    seqwrite-1M) args=(--rw=write --bs=1M --iodepth=4) ;;
    half-4k)
        rate=$(half_rate)
        if [[ $rate == 0 ]]; then continue; fi
        args=(--rw=randwrite --bs=4k --iodepth=32 --rate_iops="$rate")
        configs=$(tr -cd 'cdxy ' <<<"$CONFIGS")
        ;;
    seqwrite-1M@*)
        args=(--rw=write --bs=1M --iodepth=4 --rate="${wl#*@}m")
        configs=$(tr -cd 'cdxyk ' <<<"$CONFIGS")
        ;;
    esac
    if [[ $wl != seqwrite-1M ]]; then configs=${configs//s/}; fi
    read -ra order <<<"$configs"
    for rep in $(seq "$REPS"); do
        # Rotate: rep r starts with the r-th server.
        shift_by=$(( (rep - 1) % ${#order[@]} ))
        for c in "${order[@]:shift_by}" "${order[@]:0:shift_by}"; do
            start_server "$c"
            size=$SIZE
            if [[ $c == f ]]; then
                target=(--ioengine=io_uring --filename="$WORK/$c.img")
            elif [[ $c == s ]]; then
                rm -rf "$WORK/seg-s" && mkdir -p "$WORK/seg-s"
                target=(--ioengine=psync --directory="$WORK/seg-s" --numjobs=4 --nrfiles=16
                    --filesize=8M --file_service_type=sequential --openfiles=1
                    --create_on_open=1 --fsync_on_close=1 --unlink_each_loop=1
                    --group_reporting)
                size=128M
            else
                target=(--ioengine=nbd --uri="$URI")
            fi
            cpu0=0
            if [[ -n $PID ]]; then cpu0=$(cpu_seconds "$PID"); fi
            fio --name="$wl" "${target[@]}" "${args[@]}" --size="$size" \
                --time_based --runtime="$RUNTIME" --ramp_time=1 --norandommap --randrepeat=0 \
                --output-format=json --output="$WORK/fio.json" >/dev/null
            status='{}' hwm=0 cpu=""
            if [[ -n $CTL ]]; then status=$(settled_status); fi
            if [[ -n $PID ]]; then
                hwm=$(hwm_bytes "$PID")
                cpu=$(python3 -c 'import sys; print(float(sys.argv[1]) - float(sys.argv[2]))' \
                    "$(cpu_seconds "$PID")" "$cpu0")
                stop "$PID"
            fi
            if [[ -n $S3PID ]]; then stop "$S3PID"; fi
            rm -rf "$WORK/journal-$c" "$WORK/s3-$c" "$WORK/seg-s"
            python3 - "$WORK/fio.json" "$c" "$wl" "$rep" "$hwm" "$status" "$cpu" \
                "$RUNTIME" >>"$RESULTS" <<'EOF'
import json, sys
fio, config, wl, rep, hwm, status, cpu, runtime = sys.argv[1:9]
job = json.load(open(fio))["jobs"][0]
side = job["write"] if job["write"]["io_bytes"] > 0 else job["read"]
pct = side["clat_ns"]["percentile"]
status = json.loads(status)
lag = status.get("durable_lag", {})
lag = lag.get("p99_seconds", "") if lag.get("records", 0) > 0 else ""
# The pool overflowed when the mode left `logging` during the run (the daemon was restarted
# in `logging` just before it).
overflows = sum(1 for t in status.get("transitions", []) if t.get("from") == "logging")
pool_peak = status.get("pool", {}).get("peak", "")
# CPU per GB moved: the CPU covers the 1 s ramp-up too, fio's byte counts do not, so the
# bytes are the measured rate over the whole run.
moved = side["bw_bytes"] * (float(runtime) + 1)
cpu_per_gb = float(cpu) / (moved / 1e9) if cpu and moved > 0 else ""
print("\t".join(str(v) for v in [config, wl, rep, side["iops"], side["bw_bytes"] / 1e6,
      pct["50.000000"] / 1e3, pct["99.000000"] / 1e3, lag, int(hwm), cpu_per_gb,
      overflows if status else "", pool_peak]))
EOF
            tail -1 "$RESULTS" >&2
        done
    done
done
}

if [[ -z ${TABLE_ONLY:-} ]]; then
    before=$(cut -d' ' -f1-3 /proc/loadavg)
    measure
    echo "$before at the start, $(cut -d' ' -f1-3 /proc/loadavg) at the end" >"$WORK/load.txt"
fi

python3 - "$RESULTS" "$OUT" "$RUNTIME" "$REPS" "$SIZE" "$(nproc)" \
    "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs)" \
    "$(stat -f -c %T "$WORK")" "$(uname -r)" "$(fio --version)" "$(nbdkit --version | head -1)" \
    "$(cat "$WORK/load.txt" 2>/dev/null || true)" <<'EOF' | write_section "## serve" "$OUT"
import statistics, sys
from collections import defaultdict
results, out, runtime, reps, size, cores, cpu, fs, kernel, fio, nbdkit, load = sys.argv[1:13]
rows = defaultdict(list)
for line in open(results):
    f = line.rstrip("\n").split("\t")
    c, wl, rep, iops, mbps, p50, p99, lag, hwm = f[:9]
    cpu_gb = f[9] if len(f) > 9 else ""
    overflows = f[10] if len(f) > 10 else ""
    pool_peak = f[11] if len(f) > 11 else ""
    rows[(c, wl)].append((float(iops), float(mbps), float(p50), float(p99),
                          float(lag) if lag else None, int(hwm),
                          float(cpu_gb) if cpu_gb else None,
                          int(overflows) if overflows else None,
                          int(pool_peak) if pool_peak else None))
names = {"a": "a: nbdkit file", "b": "b: serve --no-journal", "c": "c: serve, local journal",
         "d": "d: serve, S3 journal (s3s-fs)", "e": "e: c with --compress off",
         "f": "f: fio io_uring on the file (no NBD)",
         "g": "g: b on the threads engine (fallback)",
         "x": "x: c on the BASE_BIN build",
         "y": "y: d on the BASE_BIN build",
         "z": "z: b on the BASE_BIN build",
         "m": "m: c with --max-buffered 64M",
         "k": "k: c with --encryption-key",
         "s": "s: fio, 8 MiB files + fsync into a directory, 4 jobs (no NBD)"}
def med(c, wl, i):
    vals = [r[i] for r in rows.get((c, wl), []) if r[i] is not None]
    return statistics.median(vals) if vals else None
def fmt(v, spec):
    return "–" if v is None else format(v, spec)
wls = ["randwrite-4k", "randread-4k", "seqwrite-1M", "half-4k"]
lines = ["## serve", "",
         f"`bench/serve.sh` (fio {fio}, nbd engine, Unix sockets; {nbdkit}), release build. "
         f"Each cell is the median of {reps} interleaved runs of {runtime} s (after 1 s of "
         f"ramp-up) on a {size} primary file with random content, every run with a fresh server "
         f"and journal. Machine: {cores} cores ({cpu}), shared with other builds and tests "
         f"(load average {load or 'not recorded'}); file system {fs}; Linux {kernel}. "
         "Latency is fio's completion latency. Ack→durable p99 is the daemon's own histogram "
         "(acknowledgement to segment durable, every record, read once the journal caught up). "
         "CPU s/GB is the server process's user + system CPU per GB moved (the S3 server's own "
         "CPU not included). `half-4k` is 4k randwrite QD32 rate-limited to half of c's "
         "median randwrite-4k IOPS. Peak RSS is the server's VmHWM (pool cap 512 MiB).", "",
         "| workload | server | IOPS | MB/s | p50 µs | p99 µs | ack→durable p99 | CPU s/GB | peak RSS MiB |",
         "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
for wl in wls:
    for c in "sfagbzcmxedy":
        if (c, wl) not in rows:
            continue
        lag = med(c, wl, 4)
        rss = med(c, wl, 5)
        lines.append(f"| {wl} | {names[c]} | {fmt(med(c, wl, 0), '.0f')} | "
                     f"{fmt(med(c, wl, 1), '.1f')} | {fmt(med(c, wl, 2), '.0f')} | "
                     f"{fmt(med(c, wl, 3), '.0f')} | "
                     f"{'–' if lag is None else format(lag * 1000, '.0f') + ' ms'} | "
                     f"{fmt(med(c, wl, 6), '.2f')} | "
                     f"{'–' if not rss else format(rss / 2**20, '.0f')} |")
def ratio(x, y, wl, i):
    a, b = med(x, wl, i), med(y, wl, i)
    return None if a is None or b is None or b == 0 else a / b
def cell(v, spec=".2f"):
    return "–" if v is None else format(v, spec)
def lag_ms(c, wl):
    v = med(c, wl, 4)
    return None if v is None else v * 1000
targets = [
    ("4k randwrite QD32 IOPS, b / a (serve --no-journal / nbdkit)",
     ratio("b", "a", "randwrite-4k", 0), "≥ 1.0", lambda v: v >= 1.0),
    ("4k randwrite QD32 IOPS, c / b (local journal / no journal)",
     ratio("c", "b", "randwrite-4k", 0), "≥ 0.95", lambda v: v >= 0.95),
    ("4k randwrite p99 latency, c / b",
     ratio("c", "b", "randwrite-4k", 3), "≤ 1.2", lambda v: v <= 1.2),
    ("4k randwrite CPU s/GB, b / a (issue 23)",
     ratio("b", "a", "randwrite-4k", 6), "≤ 1.0", lambda v: v <= 1.0),
    ("4k randwrite CPU s/GB, c / a (issue 23)",
     ratio("c", "a", "randwrite-4k", 6), "≤ 1.3", lambda v: v <= 1.3),
    ("4k randread QD32 IOPS, b / a (issue 23)",
     ratio("b", "a", "randread-4k", 0), "≥ 1.0", lambda v: v >= 1.0),
    ("1M seqwrite QD4 MB/s, b / a",
     ratio("b", "a", "seqwrite-1M", 1), "≥ 1.0", lambda v: v >= 1.0),
    ("1M seqwrite QD4 MB/s, c / b",
     ratio("c", "b", "seqwrite-1M", 1), "≥ 0.8", lambda v: v >= 0.8),
    ("ack→durable p99 at half load, local journal (c, half-4k), ms",
     lag_ms("c", "half-4k"), "≤ 250", lambda v: v <= 250),
    ("ack→durable p99 at half load, local S3 (d, half-4k), ms",
     lag_ms("d", "half-4k"), "≤ 250", lambda v: v <= 250),
]
lines += ["", "| figure | value | target | met |", "|---|---:|---|---|"]
for what, v, target, ok in targets:
    spec = ".0f" if "ms" in what else ".2f"
    lines.append(f"| {what} | {cell(v, spec)} | {target} | "
                 f"{'–' if v is None else ('yes' if ok(v) else 'no')} |")
lines += ["", "| also | workload | value |", "|---|---|---:|"]
for (x, y, i, what) in [("b", "f", 0, "IOPS b / f (the NBD hop: serve --no-journal / fio io_uring on the file)"),
                        ("b", "g", 0, "IOPS b / g (io_uring engine / threads engine)"),
                        ("e", "c", 0, "IOPS e / c (compression off / on)"),
                        ("c", "s", 1, "MB/s c / s (local journal / fio writing segment files)"),
                        ("d", "b", 0, "IOPS d / b (S3 journal / no journal)"),
                        ("c", "x", 1, "MB/s c / x (this build / BASE_BIN)"),
                        ("c", "x", 0, "IOPS c / x (this build / BASE_BIN)"),
                        ("m", "x", 0, "IOPS m / x (tightest NBD buffer budget / BASE_BIN)"),
                        ("m", "c", 0, "IOPS m / c (--max-buffered 64M / default 256M)"),
                        ("c", "x", 6, "CPU s/GB c / x (this build / BASE_BIN)"),
                        ("b", "z", 0, "IOPS b / z (this build / BASE_BIN, no journal)"),
                        ("b", "z", 6, "CPU s/GB b / z (this build / BASE_BIN, no journal)"),
                        ("d", "y", 1, "MB/s d / y (this build / BASE_BIN, S3 journal)")]:
    for wl in wls[:3]:
        r = ratio(x, y, wl, i)
        if r is not None:
            lines.append(f"| {what} | {wl} | {r:.2f} |")
for wl in ["randwrite-4k", "seqwrite-1M"]:
    r = ratio("c", "a", wl, 6)
    r2 = ratio("b", "a", wl, 6)
    if r2 is not None:
        lines.append(f"| CPU s/GB b / a (serve --no-journal / nbdkit) | {wl} | {r2:.2f} |")
    if r is not None:
        lines.append(f"| CPU s/GB c / a (serve with local journal / nbdkit) | {wl} | {r:.2f} |")
sweep = sorted({wl for (_, wl) in rows if wl.startswith("seqwrite-1M@")},
               key=lambda w: int(w.split("@")[1]))
if sweep:
    cs = [c for c in "cxdy" if any((c, wl) in rows for wl in sweep)]
    lines += ["", "Where the pool overflows: 1M seqwrite QD4 rate-limited to each step (sweep-1M); "
              "per server the median MB/s reached, the pool's peak, and in how many of the "
              f"{reps} runs the mode left `logging` (the pool overflowed).", "",
              "| offered MB/s | " + " | ".join(names[c] for c in cs) + " |",
              "|---:|" + "---|" * len(cs)]
    for wl in sweep:
        cells = []
        for c in cs:
            runs = rows.get((c, wl), [])
            if not runs:
                cells.append("–")
                continue
            over = sum(1 for r in runs if r[7])
            peak = med(c, wl, 8)
            cells.append(f"{med(c, wl, 1):.0f} MB/s, pool peak "
                         f"{'–' if peak is None else format(peak / 2**20, '.0f')} MiB, "
                         f"overflowed {over}/{len(runs)}")
        lines.append(f"| {wl.split('@')[1]} | " + " | ".join(cells) + " |")
section = "\n".join(lines) + "\n"
print(section)
EOF
