#!/usr/bin/env bash
# diff benchmark (issue 22): `tinylag diff` over an interval of RECORDS records (default
# 1000000 random 4 KiB writes on a SIZE device, default 4G) between two marks, against the
# baseline a backup tool without it has: reading the two images at those marks whole and
# comparing them block by block.
#
#   diff      `tinylag diff --journal J --from before --to after --json`: seconds, segment
#             indexes read, store requests, bytes read (the command's own counting store)
#   compare   read before.img and after.img (the images `restore --mark` writes; generated
#             beside the journal by examples/diff_bench_journal.rs rather than restored, so the
#             baseline's cost of restoring them, at least the journal's payloads, is NOT
#             counted) in 1 MiB chunks and count differing 4 KiB blocks: seconds, bytes read
#             (2 x SIZE); it also checks that every differing block lies inside diff's extents
#
# Interleaved, RUNS times each (medians). Environment: PROFILE (release, or debug for a quick
# look), RUNS (3), SIZE (4G), RECORDS (1000000), BENCH_DIR (scratch, default
# target/bench-diff; needs about RECORDS x 4 KiB + SIZE), BENCH_OUT (default BENCHMARKS.md: the
# "diff" section between its markers is replaced), CARGO (default cargo; say
# "flock /tmp/build.lock cargo" to share a build limiter). Needs python3.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$(dirname "$0")/.."

RUNS=${RUNS:-3}
SIZE=${SIZE:-4G}
RECORDS=${RECORDS:-1000000}
DIR=${BENCH_DIR:-$PWD/target/bench-diff}
OUT=${BENCH_OUT:-$PWD/BENCHMARKS.md}
TARGET=${CARGO_TARGET_DIR:-$PWD/target}
PROFILE=${PROFILE:-release}
CARGO=${CARGO:-cargo}

command -v python3 >/dev/null || { echo "bench/diff.sh needs python3" >&2; exit 1; }

if [ "$PROFILE" = release ]; then
    $CARGO build --release --quiet --bin tinylag --example diff_bench_journal
else
    $CARGO build --quiet --bin tinylag --example diff_bench_journal
fi
BIN=$TARGET/$PROFILE/tinylag
GEN=$TARGET/$PROFILE/examples/diff_bench_journal

rm -rf "$DIR"
mkdir -p "$DIR"
RESULTS=$DIR/results.tsv
: >"$RESULTS"
export TINYLAG_LOG=warn

echo "journal: $RECORDS random 4 KiB writes on $SIZE between marks before and after"
start=$(now)
"$GEN" "$DIR/journal" "$DIR/images" "$SIZE" "$RECORDS"
echo "generated in $(elapsed "$start" "$(now)") s"
JOURNAL_BYTES=$(du -sb "$DIR/journal" | cut -f1)
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)

for run in $(seq 1 "$RUNS"); do
    start=$(now)
    "$BIN" diff --journal "$DIR/journal" --from before --to after --json >"$DIR/diff.json"
    t=$(elapsed "$start" "$(now)")
    python3 - "$DIR/diff.json" "$t" >>"$RESULTS" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
print(f"diff\tseconds\t{sys.argv[2]}")
for k in ("index_reads", "store_requests", "bytes_read", "records", "changed_bytes", "segment_bytes"):
    print(f"diff\t{k}\t{d[k]}")
print(f"diff\textents\t{len(d['extents'])}")
EOF
    start=$(now)
    python3 - "$DIR/images/before.img" "$DIR/images/after.img" "$DIR/diff.json" >"$DIR/compare.txt" <<'EOF'
import bisect, json, sys
a, b = open(sys.argv[1], "rb"), open(sys.argv[2], "rb")
differ, read, chunk, at = [], 0, 1 << 20, 0
while True:
    x, y = a.read(chunk), b.read(chunk)
    if not x and not y:
        break
    read += len(x) + len(y)
    if x != y:
        for i in range(0, max(len(x), len(y)), 4096):
            if x[i:i + 4096] != y[i:i + 4096]:
                differ.append(at + i)
    at += chunk
ext = json.load(open(sys.argv[3]))["extents"]
starts = [e["offset"] for e in ext]
outside = 0
for off in differ:
    k = bisect.bisect_right(starts, off) - 1
    if k < 0 or off + 4096 > ext[k]["offset"] + ext[k]["length"]:
        outside += 1
print(f"{read} {len(differ)} {outside}")
EOF
    t=$(elapsed "$start" "$(now)")
    read -r bytes blocks outside <"$DIR/compare.txt"
    if [ "$outside" != 0 ]; then
        echo "bench/diff.sh: $outside differing blocks lie outside diff's extents" >&2
        exit 1
    fi
    printf 'compare\tseconds\t%s\ncompare\tbytes_read\t%s\ncompare\tblocks\t%s\n' "$t" "$bytes" "$blocks" >>"$RESULTS"
done
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

python3 - "$RESULTS" "$OUT" "$SIZE" "$RECORDS" "$RUNS" "$JOURNAL_BYTES" "$(uname -r)" \
    "$(nproc)" "$PROFILE" "$LOAD_BEFORE" "$LOAD_AFTER" <<'EOF' | write_section diff "$OUT"
import re, statistics, sys
from collections import defaultdict
results, out, size, records, runs, journal, kernel, cores, profile, lb, la = sys.argv[1:]
v = defaultdict(list)
for line in open(results):
    part, label, value = line.rstrip("\n").split("\t")
    v[(part, label)].append(float(value))
m = {k: statistics.median(x) for k, x in v.items()}
mib = lambda b: f"{b / (1 << 20):.1f} MiB"
ds, cs = m[("diff", "seconds")], m[("compare", "seconds")]
db, cb = m[("diff", "bytes_read")], m[("compare", "bytes_read")]
section = f"""<!-- diff:begin -->
## diff

`bench/diff.sh`: a journal of {int(m[("diff", "records")]):,} records between two marks
({int(records):,} random 4 KiB writes, incompressible, on a {size} device; {mib(int(journal))} of
segments), generated by `examples/diff_bench_journal.rs` together with the two images the
marks name. `tinylag diff --from before --to after` against the baseline without it:
reading both images whole and comparing them 4 KiB block by block (python, 1 MiB reads;
the cost of restoring the two images first is not counted, which flatters the baseline).
Medians of {runs} interleaved runs; {profile} build; {cores} cores shared with other
helpers' builds and tests (load average {lb} before, {la} after); Linux {kernel}; warm page
cache for both.

| measure | `tinylag diff` | read and compare both images | ratio |
|---|---|---|---|
| seconds | {ds:.2f} s | {cs:.2f} s | {cs / ds:.0f}x faster |
| bytes read | {mib(db)} | {mib(cb)} | {cb / db:.0f}x fewer (target >= 100x) |
| objects read | {int(m[("diff", "index_reads")])} segment indexes ({int(m[("diff", "store_requests")])} requests in all), no payload | 2 images | |
| result | {int(m[("diff", "extents")]):,} extents, {mib(m[("diff", "changed_bytes")])} | {int(m[("compare", "blocks")]):,} differing 4 KiB blocks, every one inside diff's extents | |

`diff` reads one tail per segment (the first one's size guessed, then each the size of the
previous index and a quarter more: one request per segment, not two; 8 in flight) plus a
binary search for the first segment; the {mib(m[("diff", "segment_bytes")])} of segment payloads are never read.
Bytes read are what the journal's store returned (`tinylag diff --json`'s `bytes_read`).
<!-- diff:end -->"""
print(section)
EOF
