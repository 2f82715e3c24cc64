#!/usr/bin/env bash
# Object replica request bill (issue 24): PUTs and GETs per GiB of 4 KiB random writes and
# of 1 MiB sequential writes, against the journal's own segment PUTs per GiB (target: the
# replica and its consumer position at most 1.5x those), and the idle agent's requests per
# hour (target <= 60). Measured in-process with the counting store
# (`examples/objrep_bill.rs`: a real `ObjectAgent` with the default 30 s checkpoint interval
# follows a journal written at RATE, segments cut at 8 MiB as the writer cuts them).
#
#   bench/object_replica.sh                   # 1 GiB each at 64 MiB/s, 60 s idle (= 1 h)
#   TOTAL=256M RATE=16M IDLE=30 bench/object_replica.sh
#
# Then bytes stored / bytes of live data after `replica compact` and `replica trim` (target
# <= 1.3): COMPACT_TOTAL (1G) of 4 KiB writes at random blocks of a COMPACT_DEVICE (512M),
# a checkpoint a segment. And restore of RESTORE_SIZE (1G) from an object replica in a
# local directory (`file://`, the real binary), after compaction (one image) and before it
# (delta layers), against `cp --sparse=always` of a file replica of the same journal:
# RUNS (3) interleaved runs, medians; page cache dropped before each when run as root.
#
# Counts, not timings: the debug build is the default (CARGO_PROFILE=release for release).
# Environment: BENCH_DIR (scratch, default target/bench-objrep), IDLE_SCALE (default 60).
#
#   CARGO_PROFILE=release bench/object_replica.sh promote
#
# runs only the failover measurement: PROMOTE_SIZE (1G) of incompressible data written
# through `serve` (nbdcopy), demoted, followed by an object replica (`file://`) and a file
# replica; then RUNS (3) interleaved runs of `cp --sparse=always` of the file replica against
# `promote --force --replica file://… --image OUT` until it serves (its own "materialised …
# in N s" line is the part an object replica adds), page cache dropped before each when run
# as root; medians. Each promote is stopped with SIGTERM and its image compared.
set -euo pipefail
cd "$(dirname "$0")/.."

DIR=${BENCH_DIR:-$PWD/target/bench-objrep}
PROFILE=${CARGO_PROFILE:-dev}
TARGET=${CARGO_TARGET_DIR:-$PWD/target}
TOTAL=${TOTAL:-1G}
RATE=${RATE:-64M}
IDLE=${IDLE:-60}
sub=debug
[[ $PROFILE == release ]] && sub=release
mkdir -p "$DIR"
command -v python3 >/dev/null || { echo "bench/object_replica.sh needs python3" >&2; exit 1; }

cargo build --quiet --profile "$PROFILE" --example objrep_bill --bin tinylag
bin=$TARGET/$sub/examples/objrep_bill
tl=$TARGET/$sub/tinylag
drop() { [[ $(id -u) == 0 ]] && sync && echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true; }

if [[ ${1:-} == promote ]]; then
    . bench/lib.sh
    TINYLAG=$tl
    trap kill_pids EXIT
    P=$DIR/promote
    rm -rf "$P" && mkdir -p "$P"
    SIZE=${PROMOTE_SIZE:-1G}
    echo "load before: $(uptime)" >&2
    "$tl" init --journal "$P/journal" --size "$SIZE" --primary "$P/a.img" >/dev/null
    head -c "$SIZE" /dev/urandom >"$P/data"
    "$tl" serve --primary "$P/a.img" --journal "$P/journal" >"$P/serve.log" 2>&1 &
    PIDS+=($!)
    wait_ctl "$P/a.img.ctl"
    nbdcopy "$P/data" "nbd+unix:///?socket=$P/a.img.sock"
    "$tl" demote --control "$P/a.img.ctl" >/dev/null
    stop "${PIDS[0]}"
    PIDS=()
    rm -f "$P/data"
    "$tl" replay --journal "$P/journal" --replica "file://$P/obj" --name obj --once >/dev/null 2>&1
    "$tl" replay --journal "$P/journal" --replica "$P/file.img" --name file --no-undo --once >/dev/null 2>&1
    : >"$P/times"
    for i in $(seq 1 "${RUNS:-3}"); do
        rm -f "$P/out.img" "$P/cp.img"
        drop
        t0=$(now)
        cp --sparse=always "$P/file.img" "$P/cp.img"
        echo "cp $(elapsed "$t0" "$(now)")" >>"$P/times"
        drop
        t0=$(now)
        "$tl" promote --force --replica "file://$P/obj" --image "$P/out.img" --journal "$P/journal" \
            --name "run$i" >"$P/promote$i.log" 2>&1 &
        pid=$!
        PIDS=("$pid")
        wait_until "promote run $i to serve" 300 grep -q "promoted at LSN" "$P/promote$i.log"
        echo "promote $(elapsed "$t0" "$(now)")" >>"$P/times"
        sed -n 's/.*materialised .* in \([0-9.]*\)s:.*/materialise \1/p' "$P/promote$i.log" >>"$P/times"
        stop "$pid"
        PIDS=()
        cmp "$P/out.img" "$P/file.img" || { echo "the promoted image differs" >&2; exit 1; }
    done
    rm -f "$P/out.img" "$P/cp.img"
    echo "load after: $(uptime)" >&2
    python3 - "$P/times" "$SIZE" <<'PY'
import statistics, sys
t = {}
for line in open(sys.argv[1]):
    k, v = line.split()
    t.setdefault(k, []).append(float(v))
m = {k: statistics.median(v) for k, v in t.items()}
print(f"promote of {sys.argv[2]} from an object replica (medians of {len(t['cp'])} interleaved runs, s): "
      f"cp --sparse=always of a file replica {m['cp']:.2f}; promote --force until serving "
      f"{m['promote']:.2f}, of which materialising the image {m['materialise']:.2f}")
PY
    exit 0
fi
echo "load before: $(uptime)" >&2
"$bin" rand4k "$TOTAL" "$RATE" >"$DIR/rand4k.json"
"$bin" seq1m "$TOTAL" "$RATE" >"$DIR/seq1m.json"
"$bin" idle "$IDLE" >"$DIR/idle.json"
"$bin" compact "${COMPACT_TOTAL:-1G}" "${COMPACT_DEVICE:-512M}" >"$DIR/compact.json"

# Restore from the object replica against cp of a file replica.
R=$DIR/restore
rm -rf "$R" && mkdir -p "$R"
"$bin" journal "$R/journal" "${RESTORE_SIZE:-1G}" >"$R/journal.json"
"$tl" replay --journal "$R/journal" --replica "file://$R/delta" --name delta --once >/dev/null 2>&1
"$tl" replay --journal "$R/journal" --replica "file://$R/image" --name image --once >/dev/null 2>&1
"$tl" replica compact --journal "$R/journal" --replica "file://$R/image" >/dev/null
"$tl" replay --journal "$R/journal" --replica "$R/file.img" --name file --no-undo --once >/dev/null 2>&1
at="@$(date +%s)"
timed() { local t0 t1; drop; t0=$(date +%s.%N); "$@" >/dev/null; t1=$(date +%s.%N); echo "$t1 - $t0" | bc; }
for i in $(seq 1 "${RUNS:-3}"); do
    rm -f "$R/out.img" "$R/cp.img"
    echo "cp $(timed cp --sparse=always "$R/file.img" "$R/cp.img")" >>"$R/times"
    echo "image $(timed "$tl" restore --journal "$R/journal" --replica "file://$R/image" --at "$at" --output "$R/out.img")" >>"$R/times"
    cmp "$R/out.img" "$R/file.img" || { echo "restore from the image differs" >&2; exit 1; }
    rm -f "$R/out.img"
    echo "delta $(timed "$tl" restore --journal "$R/journal" --replica "file://$R/delta" --at "$at" --output "$R/out.img")" >>"$R/times"
    cmp "$R/out.img" "$R/file.img" || { echo "restore from the layers differs" >&2; exit 1; }
done
rm -f "$R/out.img" "$R/cp.img"
echo "load after: $(uptime)" >&2

python3 - "$DIR" <<'PY'
import json, sys
d = sys.argv[1]
print("| pattern | journal segment PUTs/GiB | replica PUTs/GiB | + position PUTs/GiB | ratio | replica GETs/GiB | agent journal GETs/GiB | layers | checkpoints | layer bytes / data |")
print("|---|---|---|---|---|---|---|---|---|---|")
for p in ("rand4k", "seq1m"):
    r = json.load(open(f"{d}/{p}.json"))
    print(f"| {p} | {r['journal_segment_puts_per_gib']:.1f} | {r['replica_puts_per_gib']:.1f} | "
          f"{r['replica_plus_position_puts_per_gib']:.1f} | {r['ratio_to_journal_puts']:.3f} | "
          f"{r['replica_gets_per_gib']:.1f} | {r['agent_journal_gets_per_gib']:.1f} | {r['layers']} | "
          f"{r['checkpoints']} | {r['layer_bytes_per_data_byte']:.4f} |")
i = json.load(open(f"{d}/idle.json"))
print()
print(f"idle: replica store {i['replica_requests_per_hour']:.1f} requests/hour, journal "
      f"{i['journal_requests_per_hour']:.1f} requests/hour ({i['seconds']} s at timer scale {i['timer_scale']})")
c = json.load(open(f"{d}/compact.json"))
print()
print("| written | device | live data | stored before / live | stored after compact+trim / live | objects before → after | compaction PUTs | GETs | s |")
print("|---|---|---|---|---|---|---|---|---|")
print(f"| {c['bytes_written']>>20} MiB 4 KiB random | {c['device']>>20} MiB | {c['live_bytes']/2**20:.0f} MiB | "
      f"{c['stored_before_per_live']:.3f} | {c['stored_after_per_live']:.3f} | {c['objects_before']} → {c['objects_after']} | "
      f"{c['compaction_puts']} | {c['compaction_gets']} | {c['compaction_s']:.2f} |")
import statistics
t = {}
for line in open(f"{d}/restore/times"):
    k, v = line.split()
    t.setdefault(k, []).append(float(v))
j = json.load(open(f"{d}/restore/journal.json"))
print()
print(f"restore of {j['bytes']>>20} MiB (medians of {len(t['cp'])} interleaved runs, s): "
      f"cp --sparse=always of a file replica {statistics.median(t['cp']):.2f}, "
      f"from the object replica's image {statistics.median(t['image']):.2f}, "
      f"from its delta layers {statistics.median(t['delta']):.2f}")
PY
