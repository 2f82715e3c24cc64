#!/usr/bin/env bash
# bench/encryption.sh — what encryption at rest costs the primary.
#
# Runs bench/serve.sh's machinery (same servers, fio nbd engine, fresh server and journal
# per run, runs interleaved) on two configs in one run: c (serve, local journal) and k (the
# same with --encryption-key), for 4k randwrite QD32 and 1M seqwrite QD4, and writes the
# medians, the k/c ratios against the targets (IOPS ≥ 0.95, MB/s ≥ 0.9) and the server CPU
# seconds per GB written (and what encryption adds) into BENCHMARKS.md, section
# "Encryption at rest". serve.sh's own table goes to a scratch file, not BENCHMARKS.md.
#
# Environment: RUNTIME (s per run, default 10), REPS (default 3), SIZE (default 1G),
# BENCH_DIR (kept when given), OUT (default BENCHMARKS.md in the checkout).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$ROOT/BENCHMARKS.md}
WORK=${BENCH_DIR:-$(mktemp -d /var/tmp/tinylag-enc-bench.XXXXXX)}
KEEP=${BENCH_DIR:-}
cleanup() { if [[ -z $KEEP ]]; then rm -rf "$WORK"; fi; }
trap cleanup EXIT

BENCH_DIR=$WORK OUT=$WORK/serve-table.md CONFIGS="c k" \
    WORKLOADS="randwrite-4k seqwrite-1M" "$ROOT/bench/serve.sh" >/dev/null

python3 - "$WORK/results.tsv" "$OUT" "${RUNTIME:-10}" "${REPS:-3}" "${SIZE:-1G}" \
    "$(cat "$WORK/load.txt" 2>/dev/null || true)" "$(nproc)" <<'PY'
import statistics, sys
from collections import defaultdict
results, out, runtime, reps, size, load, cores = sys.argv[1:8]
rows = defaultdict(list)
for line in open(results):
    f = line.rstrip("\n").split("\t")
    c, wl, rep, iops, mbps = f[:5]
    cpu_gb = f[9] if len(f) > 9 and f[9] else None
    rows[(c, wl)].append((float(iops), float(mbps), float(cpu_gb) if cpu_gb else None))
def med(c, wl, i):
    vals = [r[i] for r in rows.get((c, wl), []) if r[i] is not None]
    return statistics.median(vals) if vals else None
def num(v, spec):
    return "-" if v is None else format(v, spec)
lines = ["## Encryption at rest", "",
         f"`bench/encryption.sh` (bench/serve.sh configs c and k, interleaved): {reps} runs of "
         f"{runtime} s per server and workload, primary {size}, journal in a local directory, "
         f"{cores} cores; load {load}. Medians.", "",
         "| workload | c: IOPS | k: IOPS | c: MB/s | k: MB/s | k / c | target | c: CPU s/GB | k: CPU s/GB | added |",
         "|---|---|---|---|---|---|---|---|---|---|"]
for wl, i, target in [("randwrite-4k", 0, 0.95), ("seqwrite-1M", 1, 0.9)]:
    c, k = med("c", wl, i), med("k", wl, i)
    ratio = k / c if c and k else None
    cc, kc = med("c", wl, 2), med("k", wl, 2)
    added = kc - cc if cc is not None and kc is not None else None
    verdict = "-" if ratio is None else ("met" if ratio >= target else "NOT met")
    lines.append(f"| {wl} | {num(med('c', wl, 0), '.0f')} | {num(med('k', wl, 0), '.0f')} | "
                 f"{num(med('c', wl, 1), '.1f')} | {num(med('k', wl, 1), '.1f')} | "
                 f"{num(ratio, '.3f')} | ≥ {target} ({verdict}) | {num(cc, '.2f')} | "
                 f"{num(kc, '.2f')} | {num(added, '+.2f')} |")
lines += ["", "Replay apply rate with and without encryption: not measured yet."]
section = "\n".join(lines) + "\n"
text = open(out).read()
start = text.find("## Encryption at rest\n")
if start >= 0:
    end = text.find("\n## ", start + 1)
    text = text[:start] + section + (text[end + 1:] if end >= 0 else "")
else:
    text = text.rstrip("\n") + "\n\n" + section
open(out, "w").write(text)
print(section)
PY
