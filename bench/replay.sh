#!/usr/bin/env bash
# Replay benchmark (issue 4): how fast `tinylag replay` applies a journal, against fio writing
# the same pattern straight to a file on the same disk in the same run.
#
#   bench/replay.sh [apply]          apply rate: journals of 4 KiB random writes and of 1 MiB
#                                    sequential writes, with and without undo records
#
# Environment: RUNS (default 3, medians are reported), SIZE (device and journal size,
# default 1G), BENCH_DIR (scratch space, default target/bench-replay; needs ~5x SIZE),
# BENCH_OUT (default BENCHMARKS.md; the "replay" section between its markers is replaced).
# Needs fio and python3. Runs are interleaved (fio, no undo, undo; then again) so that the
# noise of a shared machine hits every configuration alike.
set -euo pipefail
cd "$(dirname "$0")/.."

PART=${1:-apply}
RUNS=${RUNS:-3}
SIZE=${SIZE:-1G}
DIR=${BENCH_DIR:-$PWD/target/bench-replay}
OUT=${BENCH_OUT:-$PWD/BENCHMARKS.md}

for tool in fio python3; do
    command -v "$tool" >/dev/null || { echo "bench/replay.sh needs $tool" >&2; exit 1; }
done

cargo build --release --quiet --bin tinylag --example replay_bench_journal
BIN=$PWD/target/release/tinylag
GEN=$PWD/target/release/examples/replay_bench_journal

rm -rf "$DIR"
mkdir -p "$DIR"
RESULTS=$DIR/results.tsv
: >"$RESULTS"

now() { date +%s.%N; }

# Seconds taken by a command (its output goes to the log).
timed() {
    local start end
    sync
    start=$(now)
    "$@" >>"$DIR/log" 2>&1
    end=$(now)
    python3 -c "print(f'{$end - $start:.3f}')"
}

apply_part() {
    for pattern in rand4k seq1m; do
        local journal=$DIR/journal-$pattern replica=$DIR/replica.img raw=$DIR/raw.img
        local fio_rw fio_bs
        case $pattern in
            rand4k) fio_rw=randwrite fio_bs=4k ;;
            seq1m) fio_rw=write fio_bs=1M ;;
        esac
        echo "== $pattern: writing a journal of $SIZE"
        "$GEN" "$journal" "$SIZE" "$pattern" "$SIZE" | tee -a "$DIR/log"
        # Both targets exist and hold data, so pre-images are real and fio overwrites too.
        for f in "$replica" "$raw"; do
            rm -f "$f"
            fio --name=prefill --filename="$f" --rw=write --bs=1M --size="$SIZE" \
                --end_fsync=1 --output-format=terse >/dev/null
        done
        for run in $(seq 1 "$RUNS"); do
            t=$(timed fio --name=raw --filename="$raw" --rw=$fio_rw --bs=$fio_bs --size="$SIZE" \
                --ioengine=psync --end_fsync=1 --output-format=terse)
            printf '%s\traw\t%s\t%s\n' "$pattern" "$run" "$t" >>"$RESULTS"
            t=$(timed "$BIN" replay --journal "$journal" --replica "$replica" \
                --name "noundo-$run" --no-undo --once --control "$DIR/ctl")
            printf '%s\tno-undo\t%s\t%s\n' "$pattern" "$run" "$t" >>"$RESULTS"
            t=$(timed "$BIN" replay --journal "$journal" --replica "$replica" \
                --name "undo-$run" --undo "$DIR/undo-$run" --once --control "$DIR/ctl")
            printf '%s\tundo\t%s\t%s\n' "$pattern" "$run" "$t" >>"$RESULTS"
            rm -rf "$DIR/undo-$run"
            echo "   run $run: $(grep -P "^$pattern\t" "$RESULTS" | grep -P "\t$run\t" | cut -f2,4 | tr '\t\n' '= ')"
        done
        rm -rf "$journal"
    done
}

summarize_apply() {
    python3 - "$RESULTS" "$SIZE" "$OUT" "$RUNS" <<'PY'
import os, platform, statistics, subprocess, sys, time
results, size_arg, out, runs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
size = int(size_arg[:-1]) * units[size_arg[-1].upper()] if size_arg[-1].isalpha() else int(size_arg)
times = {}
for line in open(results):
    pattern, mode, run, secs = line.split()
    times.setdefault((pattern, mode), []).append(float(secs))
record = {"rand4k": 4096, "seq1m": 1 << 20}
label = {"rand4k": "4 KiB random writes", "seq1m": "1 MiB sequential writes"}
rows = []
for pattern in ("rand4k", "seq1m"):
    raw = statistics.median(times[(pattern, "raw")])
    for mode in ("raw", "no-undo", "undo"):
        t = statistics.median(times[(pattern, mode)])
        what = {"raw": "fio, straight to a file", "no-undo": "tinylag replay --no-undo",
                "undo": "tinylag replay (undo log)"}[mode]
        rows.append(f"| {label[pattern]} | {what} | {t:.2f} s | {size / t / 1e6:.0f} MB/s | "
                    f"{size // record[pattern] / t:,.0f} | {raw / t:.2f}x |")
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
fs = subprocess.run(["df", "-T", os.path.dirname(results)], capture_output=True, text=True).stdout.splitlines()[-1].split()[1]
section = f"""<!-- replay:begin -->
## replay

`bench/replay.sh apply` on {time.strftime('%Y-%m-%d')}: {os.cpu_count()} cores ({cpu}), Linux {platform.release()},
{fs} scratch directory; a shared machine where other builds and tests run at the same time,
so single runs vary by 2x: medians of {runs} interleaved runs. A journal of {size_arg} of one
pattern (incompressible data, segments of 8 MiB, local-directory store) is applied to an
existing {size_arg} replica full of data (so every pre-image is real data), against fio writing
the same pattern (`--ioengine=psync --end_fsync=1`) to an existing {size_arg} file on the same
disk. Time is wall time of the whole command, start to exit.

| journal | applied by | time | MB/s | records/s | vs fio |
|---|---|---|---|---|---|
""" + "\n".join(rows) + """

Targets: without undo ≥ 0.8x fio for 1 MiB records; with undo ≥ 0.4x. Anchor: Ceph's journal
replay runs about 30 MB/s per image by default.
<!-- replay:end -->
"""
text = open(out).read() if os.path.exists(out) else "# Benchmarks\n"
begin, end = "<!-- replay:begin -->", "<!-- replay:end -->\n"
if begin in text and end in text:
    text = text[:text.index(begin)] + section + text[text.index(end) + len(end):]
else:
    text = text.rstrip("\n") + "\n\n" + section
open(out, "w").write(text)
print(section)
PY
}

case $PART in
    apply) apply_part; summarize_apply ;;
    *) echo "usage: bench/replay.sh [apply]" >&2; exit 2 ;;
esac
