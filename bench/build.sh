#!/usr/bin/env bash
# bench/build.sh — how long a clean build of tinylag takes, for several revisions at once.
#
#   bench/build.sh BASE_REV NEW_REV            clean `cargo build --release` of each
#   PROFILE=dev bench/build.sh BASE_REV NEW_REV   clean `cargo build` (debug) instead
#
# Each round exports every revision (git archive) into its own directory and builds all of
# them *at the same time*, each with a fresh target directory, so every revision sees the
# same machine load (on a shared machine a sequential baseline measured an hour earlier is
# meaningless). Wall time therefore includes the other builds of the round; user + sys CPU
# time is the figure that compares revisions. Prints one line per (round, revision) and the
# medians; the registry cache (~/.cargo/registry) is shared, so nothing is downloaded.
#
# Environment: ROUNDS (default 1), PROFILE (release | dev, default release),
# BENCH_DIR (default a fresh directory under /var/tmp, removed at the end).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
ROUNDS=${ROUNDS:-1}
PROFILE=${PROFILE:-release}
[ $# -ge 1 ] || { echo "usage: bench/build.sh REV [REV...]" >&2; exit 2; }
BENCH_DIR=${BENCH_DIR:-$(mktemp -d /var/tmp/tinylag-build-bench.XXXXXX)}
mkdir -p "$BENCH_DIR"
trap 'rm -rf "$BENCH_DIR"' EXIT
flag=()
[ "$PROFILE" = release ] && flag=(--release)

results="$BENCH_DIR/results.tsv"
: >"$results"
for round in $(seq 1 "$ROUNDS"); do
    pids=()
    for rev in "$@"; do
        dir="$BENCH_DIR/$round-$rev"
        rm -rf "$dir" && mkdir -p "$dir/src"
        git -C "$ROOT" archive "$rev" | tar -x -C "$dir/src"
        (
            cd "$dir/src"
            CARGO_TARGET_DIR="$dir/target" /usr/bin/time -f "%e %U %S" -o "$dir/time" \
                cargo build "${flag[@]}" --locked >"$dir/log" 2>&1
        ) &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid"; done
    for rev in "$@"; do
        read -r wall user sys <"$BENCH_DIR/$round-$rev/time"
        printf '%s\t%s\t%s\t%s\t%s\n' "$round" "$rev" "$wall" "$user" "$sys" | tee -a "$results"
        rm -rf "$BENCH_DIR/$round-$rev"
    done
done

echo "median over $ROUNDS round(s), cargo build ${flag[*]:-(dev)}; load average now: $(cut -d' ' -f1-3 /proc/loadavg)"
for rev in "$@"; do
    awk -F'\t' -v rev="$rev" '$2 == rev { w[n] = $3; c[n] = $4 + $5; n++ }
        END {
            asort(w); asort(c); m = int((n + 1) / 2)
            printf "%s: wall %.0f s, cpu (user+sys) %.0f s\n", rev, w[m], c[m]
        }' "$results"
done
