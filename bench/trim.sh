#!/usr/bin/env bash
# Trim benchmark (issue 8): `tinylag journal trim --retain 0` of a journal of SEGMENTS
# segments whose only consumer is at the head (so it deletes all but the newest), with the
# journal in a local directory and on a local S3 server (s3s-fs). Reports wall time and the
# store requests trim made (counted by the CountingStore wrapper trim runs over, printed by
# `--json`), against the baseline in the same run: a blind list of `journal/` and batch
# delete of the same objects (the least any tool pays, with no consumer, retention or chain
# checks). Runs are interleaved (trim, baseline; again) so a loaded machine hits both alike.
#
#   bench/trim.sh
#
# Environment: RUNS (default 3, medians are reported), SEGMENTS (default 10000), STORES
# (default "local s3"), BENCH_DIR (scratch, default target/bench-trim), BENCH_OUT (default
# BENCHMARKS.md; the "trim" section between its markers is replaced), CARGO_PROFILE
# (default release; anything else uses the debug build). Needs python3, and s3s-fs for the S3 case (scripts/install-test-deps.sh).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$(dirname "$0")/.."

RUNS=${RUNS:-3}
SEGMENTS=${SEGMENTS:-10000}
STORES=${STORES:-"local s3"}
S3FS=${TINYLAG_TOOLS:-$HOME/.cache/tinylag/tools}/bin/s3s-fs
DIR=${BENCH_DIR:-$PWD/target/bench-trim}
OUT=${BENCH_OUT:-$PWD/BENCHMARKS.md}
PROFILE=${CARGO_PROFILE:-release}

command -v python3 >/dev/null || { echo "bench/trim.sh needs python3" >&2; exit 1; }
if [[ $PROFILE == release ]]; then
    cargo build --release --quiet --bin tinylag --example trim_bench_journal
    TARGET=${CARGO_TARGET_DIR:-$PWD/target}/release
else
    cargo build --quiet --bin tinylag --example trim_bench_journal
    TARGET=${CARGO_TARGET_DIR:-$PWD/target}/debug
fi
BIN=$TARGET/tinylag
GEN=$TARGET/examples/trim_bench_journal

PIDS=()
cleanup() {
    kill_pids
}
trap cleanup EXIT

S3PID=""
S3ENV=()

# Starts s3s-fs on directory $1; sets S3PID and S3ENV.
start_s3() { start_s3fs "$1"; }

stop_s3() {
    kill -TERM "$S3PID" 2>/dev/null || true
    wait "$S3PID" 2>/dev/null || true
}


rm -rf "$DIR"
mkdir -p "$DIR"
RESULTS=$DIR/results.txt
: >"$RESULTS"

# One pristine journal per store, copied for every run (making one takes longer than trimming it).
for where in $STORES; do
    if [[ $where == s3 ]]; then
        [[ -x $S3FS ]] || { echo "bench/trim.sh: s3s-fs not found at $S3FS" >&2; exit 1; }
        mkdir -p "$DIR/pristine-s3/bench"
        start_s3 "$DIR/pristine-s3"
        env "${S3ENV[@]}" "$GEN" make s3://bench/j "$SEGMENTS"
        stop_s3
    else
        "$GEN" make "$DIR/pristine-local" "$SEGMENTS"
    fi
done

# One measurement: $1 = trim|baseline, $2 = local|s3, $3 = run.
measure() {
    local what=$1 where=$2 run=$3 work=$DIR/work journal env=()
    rm -rf "$work" "$work.log"
    cp -a "$DIR/pristine-$where" "$work"
    if [[ $where == s3 ]]; then
        start_s3 "$work"
        env=("${S3ENV[@]}")
        journal=s3://bench/j
    else
        journal=$work
    fi
    sync
    local start end out
    start=$(now)
    if [[ $what == trim ]]; then
        out=$(env "${env[@]}" "$BIN" journal trim --journal "$journal" --retain 0 --json)
    else
        out=$(env "${env[@]}" "$GEN" baseline "$journal")
    fi
    end=$(now)
    [[ $where == s3 ]] && stop_s3
    python3 - "$what" "$where" "$run" "$start" "$end" "$out" >>"$RESULTS" <<'PY'
import json, sys
what, where, run, start, end, out = sys.argv[1:7]
j = json.loads(out)
if what == "trim":
    reqs = sum(v for k, v in j["requests"].items() if k != "deleted_keys")
    deleted = j["deleted_segments"]
else:
    reqs, deleted = j["requests"], j["objects"]
print(what, where, run, f"{float(end) - float(start):.3f}", reqs, deleted)
PY
    echo "$(tail -1 "$RESULTS")" >&2
}

for run in $(seq "$RUNS"); do
    for where in $STORES; do
        measure trim "$where" "$run"
        measure baseline "$where" "$run"
    done
done

python3 - "$RESULTS" "$OUT" "$SEGMENTS" "$RUNS" "$PROFILE" <<'PY' | write_section trim "$OUT"
import os, statistics, sys, time
results, out, segments, runs, profile = sys.argv[1:6]
rows = {}
for line in open(results):
    what, where, run, secs, reqs, deleted = line.split()
    rows.setdefault((what, where), []).append((float(secs), int(reqs), int(deleted)))
load = os.getloadavg()[0]
machine = f"{os.cpu_count()} cores, load average {load:.1f} at the end (shared with other builds and tests)"
table = []
for where in ("local", "s3"):
    t, b = rows.get(("trim", where)), rows.get(("baseline", where))
    if not t or not b:
        continue
    ts, tr, td = (statistics.median(x[i] for x in t) for i in range(3))
    bs, br, bd = (statistics.median(x[i] for x in b) for i in range(3))
    name = "local directory" if where == "local" else "local S3 (s3s-fs)"
    table.append(f"| {name} | {int(td):,} | {ts:.2f} s | {int(tr):,} | {tr / max(td, 1):.2f} | "
                 f"{bs:.2f} s | {int(br):,} | {ts / bs:.1f}x | ≤ 2 requests per segment |")
section = f"""<!-- trim:begin -->
## trim

`bench/trim.sh` on {time.strftime('%Y-%m-%d')} ({profile} build): {machine}; medians of {runs}
interleaved runs. A journal of {int(segments):,} segments (4 records of 4 KiB each) whose
only consumer is committed at the head: `tinylag journal trim --retain 0` deletes all but the
newest segment. Requests are counted by the `CountingStore` wrapper trim runs over (its
`--json` prints them); time is wall time of the whole command. The baseline deletes the same
objects blindly (one listing of `journal/`, then `delete_many` of 1,000 keys per request),
with none of trim's checks: no consumer floor, no retention, no plug chain, no pointer.

| journal | segments deleted | trim | requests | per deleted segment | baseline | baseline requests | trim / baseline | target |
|---|---|---|---|---|---|---|---|---|
""" + "\n".join(table) + """

Trim reads each deleted segment's index (one ranged GET of its tail: the newest record's
time for the retention, the next seq for plugs, the LSN chain check), so it costs one request
per segment plus one `delete_many` per 1,000; the blind baseline needs no reads, which is why
it is faster: it is the floor, not an alternative (it would delete what a consumer or the
retention still needs). Nothing is listed: the cost is O(segments deleted), whatever the
journal's length.

On s3s-fs the requests column counts store calls, not HTTP requests: s3s-fs 0.14 answers a
suffix range longer than the object (these segments are smaller than the 64 KiB tail trim
asks for) with a 500, and the S3 store falls back to a HEAD and a ranged GET, so each index
read costs it three HTTP requests and three round trips (one on AWS S3, MinIO or Ceph RGW,
and on s3s-fs too once segments pass 64 KiB, as real 8 MiB segments do). Index reads run up
to 32 at a time.
<!-- trim:end -->
"""
print(section)
PY
