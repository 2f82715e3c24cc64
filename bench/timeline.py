#!/usr/bin/env python3
"""Samples the daemons' own Prometheus metrics (tinylag serve/replay --metrics-listen) every
INTERVAL seconds until killed, and writes one tab-separated line per sample to OUT:

  t  primary_write_iops  journal_lag_mib  dirty_mib  replica_lag_records  replica_lag_s  mode

t is seconds since the sampler started; IOPS is the rate of tinylag_primary_requests_total
{op="write"} between samples; the journal lag is tinylag_journal_lag_bytes (changes
acknowledged but not yet durable); dirty is tinylag_dirty_bytes (changed, not journaled,
waiting for a resync); the replica lag is the primary's tinylag_head_lsn minus the replica's
tinylag_replica_applied_lsn (records) and the replica's tinylag_replica_lag_seconds; mode is
the tinylag_mode series at 1.

usage: bench/timeline.py PRIMARY_PORT REPLICA_PORT OUT [INTERVAL]
"""
import concurrent.futures
import re
import sys
import time
import urllib.request

SERIES = re.compile(r'^([a-z_]+)(\{[^}]*\})? (\S+)$')


def scrape(port):
    """{(name, labels): value} from 127.0.0.1:port/metrics, or {} when it does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        m = SERIES.match(line)
        if m:
            out[(m.group(1), m.group(2) or "")] = float(m.group(3))
    return out


def one(samples, name, label=""):
    """The value of the first series of `name` whose labels contain `label`."""
    for (n, labels), v in samples.items():
        if n == name and label in labels:
            return v
    return None


def main():
    p_port, r_port, out = sys.argv[1], sys.argv[2], sys.argv[3]
    interval = float(sys.argv[4]) if len(sys.argv) > 4 else 0.5
    start = time.monotonic()
    prev = None
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=2)
    with open(out, "w", buffering=1) as f:
        f.write("t\tiops\tjournal_lag_mib\tdirty_mib\treplica_lag_records\treplica_lag_s\tmode\n")
        while True:
            now = time.monotonic()
            # Both at once, so a slow answer from one does not delay the other's sample.
            p, r = pool.map(scrape, [p_port, r_port])
            writes = one(p, "tinylag_primary_requests_total", 'op="write"')
            head = one(p, "tinylag_head_lsn")
            applied = one(r, "tinylag_replica_applied_lsn")
            # A daemon that does not answer leaves its columns empty (NaN: a gap in the plot).
            if writes is not None and head is not None:
                iops = 0.0 if prev is None else (writes - prev[1]) / (now - prev[0])
                prev = (now, writes)
                mode = next((labels.split('mode="')[1].split('"')[0]
                             for (n, labels), v in p.items()
                             if n == "tinylag_mode" and v == 1), "?")
                f.write("\t".join([
                    f"{now - start:.2f}", f"{iops:.0f}",
                    f"{(one(p, 'tinylag_journal_lag_bytes') or 0) / 2**20:.1f}",
                    f"{(one(p, 'tinylag_dirty_bytes') or 0) / 2**20:.1f}",
                    "NaN" if applied is None else f"{max(head - applied, 0):.0f}",
                    "NaN" if not r else f"{one(r, 'tinylag_replica_lag_seconds') or 0:.2f}",
                    mode]) + "\n")
            time.sleep(max(0.0, interval - (time.monotonic() - now)))


if __name__ == "__main__":
    main()
