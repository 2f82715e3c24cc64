#!/usr/bin/env bash
# bench/resync.sh — what trouble costs: a store outage, the resync after it, the activity log.
#
#   outage  A 1G primary full of data on a new journal on a local S3 server (s3s-fs): serve
#           starts forward-full, and its resync throughput (MB/s read from the primary and
#           journaled) is set against fio reading the same primary file (1M sequential reads)
#           in the same run. Then, with `tinylag replay` following: fio (nbd engine, 4k
#           randwrite QD32) for RUNTIME s, the S3 server killed for OUTAGE s under the same
#           load, restarted on its data, RUNTIME s more; IOPS of each phase, the seconds from
#           the store's return to mode `logging`, and (once fio stops) to the replica being
#           byte-identical to the primary (cmp). Both daemons run with --metrics-listen and
#           bench/timeline.py samples their /metrics every 0.5 s from the replica's start to
#           the end; bench/timeline.gp draws primary IOPS, journal lag and replica lag from
#           those samples into TIMELINE_SVG (default bench/resync-outage.svg).
#   al      4k randwrite QD32 IOPS through serve (local-directory journal) with the activity
#           log on and off (--no-activity-log), REPS interleaved runs of RUNTIME s each.
#   all     both (default)
#
# Environment: SIZE (default 1G), RUNTIME (default 10), OUTAGE (default 60), REPS (default 3),
# BENCH_DIR (scratch, default target/bench-resync), BENCH_OUT (default BENCHMARKS.md; the
# section between "<!-- resync:begin -->" and "<!-- resync:end -->" is replaced).
# Needs fio (nbd engine), python3, cmp, s3s-fs (scripts/install-test-deps.sh), gnuplot
# (Debian: gnuplot-nox) for the outage timeline.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$(dirname "$0")/.."

PART=${1:-all}
SIZE=${SIZE:-1G}
RUNTIME=${RUNTIME:-10}
OUTAGE=${OUTAGE:-60}
REPS=${REPS:-3}
S3FS=${TINYLAG_TOOLS:-$HOME/.cache/tinylag/tools}/bin/s3s-fs
DIR=${BENCH_DIR:-$PWD/target/bench-resync}
OUT=${BENCH_OUT:-$PWD/BENCHMARKS.md}
SVG=${TIMELINE_SVG:-$PWD/bench/resync-outage.svg}

for tool in fio python3 cmp gnuplot; do
    command -v "$tool" >/dev/null || { echo "bench/resync.sh needs $tool" >&2; exit 1; }
done
[[ -x $S3FS ]] || { echo "bench/resync.sh: s3s-fs not found at $S3FS (scripts/install-test-deps.sh)" >&2; exit 1; }

cargo build --release --quiet --bin tinylag
BIN=${CARGO_TARGET_DIR:-$PWD/target}/release/tinylag
rm -rf "$DIR"
mkdir -p "$DIR"
PIDS=()
cleanup() {
    kill_pids
}
trap cleanup EXIT
export TINYLAG_LOG=warn

# fio write IOPS through the NBD socket $1 for $2 seconds.
fio_iops() {
    fio --name=load --ioengine=nbd --uri="nbd+unix:///?socket=$1" --rw=randwrite --bs=4k \
        --iodepth=32 --size="$SIZE" --time_based --runtime="$2" --norandommap --randrepeat=0 \
        --output-format=json 2>/dev/null | sed -n '/^{/,$p' | field 'round(d["jobs"][0]["write"]["iops"])'
}
start_s3() { start_s3fs "$1" "$DIR/s3.log" "$2"; } # $1 data dir, $2 port
seed() { # a file of $SIZE random-ish data (compresses about 2:1)
    python3 - "$1" "$SIZE" <<'EOF'
import os, sys
path, size = sys.argv[1], sys.argv[2]
units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
n = int(size[:-1]) * units[size[-1].upper()] if size[-1].isalpha() else int(size)
half = os.urandom(1 << 19)
block = half + bytes(1 << 19)
with open(path, "wb") as f:
    for i in range(n >> 20):
        f.write(block[i % 64:] + block[: i % 64])
EOF
}

outage_part() {
    local w=$DIR/outage port
    mkdir -p "$w/s3/bench"
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    start_s3 "$w/s3" "$port"
    local env=("${S3_ENV[@]}" AWS_ENDPOINT_URL="http://127.0.0.1:$port")
    seed "$w/primary.img"
    sync
    # fio reading the primary, for the resync's yardstick (same file, same page cache state
    # as the resync will see: just written).
    local fio_read
    fio_read=$(fio --name=read --filename="$w/primary.img" --rw=read --bs=1M --size="$SIZE" \
        --output-format=json | field 'round(d["jobs"][0]["read"]["bw_bytes"] / 1e6)')
    env "${env[@]}" "$BIN" init --journal s3://bench/j --size "$SIZE" >/dev/null
    local t0 t_logging
    t0=$(now)
    local mport_p mport_r
    mport_p=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    mport_r=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    env "${env[@]}" "$BIN" serve --primary "$w/primary.img" --journal s3://bench/j \
        --listen "unix:$w/p.sock" --metrics-listen "127.0.0.1:$mport_p" >"$w/serve.log" 2>&1 &
    PIDS+=($!)
    wait_path "$w/primary.img.ctl"
    until [[ $(status "$w/primary.img.ctl" | field 'd.get("mode")') == logging ]]; do sleep 0.2; done
    t_logging=$(now)
    local full_s full_mbs
    full_s=$(python3 -c "print(f'{$t_logging - $t0:.1f}')")
    full_mbs=$(status "$w/primary.img.ctl" | field "round(d['resync']['lifetime_regions'] * d['dirty']['region_size'] / 1e6 / $full_s)")
    echo "forward-full of $SIZE: $full_s s ($full_mbs MB/s); fio reads the primary at $fio_read MB/s"

    # A replica that starts equal to the primary (as after the forward-full).
    cp --sparse=never "$w/primary.img" "$w/replica.img"
    env "${env[@]}" "$BIN" replay --journal s3://bench/j --replica "$w/replica.img" --name dr \
        --no-undo --metrics-listen "127.0.0.1:$mport_r" >"$w/replay.log" 2>&1 &
    PIDS+=($!)
    local t_sample sampler t_kill
    t_sample=$(now)
    python3 bench/timeline.py "$mport_p" "$mport_r" "$DIR/timeline.tsv" 0.5 &
    sampler=$!
    PIDS+=("$sampler")
    local before during after t_back t_log t_same
    before=$(fio_iops "$w/p.sock" "$RUNTIME")
    kill -9 "$S3PID"
    t_kill=$(now)
    during=$(fio_iops "$w/p.sock" "$OUTAGE")
    start_s3 "$w/s3" "$port"
    t_back=$(now)
    # Watch for logging while the load goes on.
    (until [[ $(status "$w/primary.img.ctl" | field 'd.get("mode")') == logging ]]; do sleep 0.2; done; now >"$w/t_log") &
    local watcher=$!
    after=$(fio_iops "$w/p.sock" "$RUNTIME")
    # Only the watcher: a bare `wait` would also wait for serve and replay, which run on.
    wait "$watcher"
    t_log=$(cat "$w/t_log")
    until cmp -s "$w/primary.img" "$w/replica.img"; do sleep 0.5; done
    t_same=$(now)
    sleep 2
    kill "$sampler"
    # The events on the samples' time axis, kept beside them to redraw the picture.
    python3 -c "
import sys; t0, k, b, l, s = map(float, sys.argv[1:])
print(f'kill={k - t0:.1f}; back={b - t0:.1f}; logging={l - t0:.1f}; same={s - t0:.1f}')" \
        "$t_sample" "$t_kill" "$t_back" "$t_log" "$t_same" >"$DIR/timeline.events"
    gnuplot -e "data='$DIR/timeline.tsv'; out='$SVG'; $(cat "$DIR/timeline.events")" bench/timeline.gp
    echo "timeline: $SVG"
    python3 - "$before" "$during" "$after" "$t_back" "$t_log" "$t_same" "$OUTAGE" "$full_mbs" "$fio_read" >"$DIR/outage.tsv" <<'EOF'
import sys
b, d, a, back, log, same, outage, full, fio = sys.argv[1:]
b, d, a = float(b), float(d), float(a)
print("\t".join([str(round(b)), str(round(d)), str(round(a)), f"{d / b:.2f}", f"{a / b:.2f}",
                 f"{float(log) - float(back):.1f}", f"{float(same) - float(back):.1f}", outage, full, fio]))
EOF
    cat "$DIR/outage.tsv"
    cleanup
    PIDS=()
}

al_part() {
    local w=$DIR/al
    mkdir -p "$w"
    : >"$DIR/al.tsv"
    for rep in $(seq 1 "$REPS"); do
        for mode in on off; do
            rm -rf "$w/journal" "$w"/primary.img*
            truncate -s "$SIZE" "$w/primary.img"
            "$BIN" init --journal "$w/journal" --size "$SIZE" >/dev/null
            local extra=()
            [[ $mode == off ]] && extra=(--no-activity-log)
            "$BIN" serve --primary "$w/primary.img" --journal "$w/journal" \
                --listen "unix:$w/p.sock" "${extra[@]}" >"$w/serve.log" 2>&1 &
            local pid=$!
            PIDS+=("$pid")
            wait_path "$w/primary.img.ctl"
            printf '%s\t%s\n' "$mode" "$(fio_iops "$w/p.sock" "$RUNTIME")" | tee -a "$DIR/al.tsv"
            kill "$pid"
            wait "$pid" || true
        done
    done
}

case $PART in
    outage) outage_part ;;
    al) al_part ;;
    all) outage_part; al_part ;;
    *) echo "usage: bench/resync.sh [outage|al|all]" >&2; exit 1 ;;
esac

python3 - "$DIR" "$OUT" "$SIZE" "$RUNTIME" "$REPS" "$SVG" <<'EOF' | write_section resync "$OUT"
import os, statistics, subprocess, sys, datetime
d, out, size, runtime, reps, svg = sys.argv[1:]
cpus = os.cpu_count()
kernel = subprocess.run(["uname", "-r"], capture_output=True, text=True).stdout.strip()
lines = ["<!-- resync:begin -->", "## resync", "",
         f"`bench/resync.sh` on {datetime.date.today()}: {cpus} cores, Linux {kernel}; a shared "
         "machine where other builds and tests run at the same time (single runs vary by 2x).", ""]
if os.path.exists(f"{d}/outage.tsv"):
    b, du, a, rd, ra, log, same, outage, full, fio = open(f"{d}/outage.tsv").read().split("\t")
    lines += ["### Store outage", "",
              f"fio (nbd engine, 4k randwrite QD32) through `tinylag serve` on a {size} primary, "
              f"journal on s3s-fs, `tinylag replay --no-undo` following; the S3 server killed for "
              f"{outage.strip()} s under the load, then restarted on its data. One run.", "",
              "| before | during the outage | after (resync running) | during/before | after/before | store back → `logging` | store back → replica = primary | target |",
              "|---|---|---|---|---|---|---|---|",
              f"| {int(b):,} IOPS | {int(du):,} IOPS | {int(a):,} IOPS | {rd}x | {ra}x | {log} s | {same} s | ≥ 0.9x |", "",
              f"Resync throughput: the forward-full of the {size} primary (every region read and "
              f"journaled, serve just started) ran at {full} MB/s; fio reading the same file "
              f"(1M sequential) in the same run: {fio.strip()} MB/s.", ""]
    if os.path.exists(f"{d}/timeline.tsv") and os.path.exists(svg):
        rel = os.path.relpath(svg, os.path.dirname(os.path.abspath(out)))
        lines += [f"![primary IOPS, journal lag and replica lag during the outage]({rel})", "",
                  "The same run as the daemons' own metrics saw it (`--metrics-listen`, sampled "
                  "every 0.5 s by `bench/timeline.py`, drawn by `bench/timeline.gp`): primary "
                  "write IOPS, the journal's lag (bytes not yet durable, and dirty bytes "
                  "waiting for a resync) and the replica's lag behind the primary's head; the "
                  "outage is shaded.", ""]
if os.path.exists(f"{d}/al.tsv"):
    rows = [l.split("\t") for l in open(f"{d}/al.tsv").read().split("\n") if l]
    on = [float(v) for m, v in rows if m == "on"]
    off = [float(v) for m, v in rows if m == "off"]
    if on and off:
        mon, moff = statistics.median(on), statistics.median(off)
        lines += ["### Activity log cost", "",
                  f"4k randwrite QD32 over a {size} primary (local-directory journal), {runtime} s "
                  f"per run, medians of {reps} interleaved runs.", "",
                  "| activity log | IOPS (median) | runs | vs off | target |", "|---|---|---|---|---|",
                  f"| off (`--no-activity-log`) | {moff:,.0f} | {', '.join(f'{v:.0f}' for v in off)} | 1.00x | |",
                  f"| on | {mon:,.0f} | {', '.join(f'{v:.0f}' for v in on)} | {mon / moff:.2f}x | ≥ 0.95x |", ""]
lines.append("<!-- resync:end -->")
section = "\n".join(lines)
print(section)
EOF
