#!/usr/bin/env python3
"""bench/flamegraph.py — fold `perf script` output into stacks and draw a flame graph SVG.

    perf script -i perf.data | bench/flamegraph.py --title "serve --no-journal" \
        --folded out.folded --top 25 > out.svg

Reads `perf script`'s default output (one header line per sample, then one frame per
line, innermost first, then a blank line), folds each sample into `comm;outer;...;inner`
(Brendan Gregg's folded format: one line per distinct stack with its sample count), and
draws the SVG: width = share of samples, one row per stack depth, root at the bottom.
`--folded` also writes the folded stacks; `--top N` prints the N functions with the most
self samples (and the share of samples that have each one anywhere on the stack) to stderr.

Written here rather than fetched (the repository depends on nothing outside it for its
benchmarks); it draws a static picture: hover titles give each frame's name and share.
"""

import argparse
import collections
import html
import re
import sys
import zlib

FRAME = re.compile(r"^\s*[0-9a-f]+\s+(.*?)(?:\s+\((.*)\))?$")


def clean(symbol, module):
    """A readable frame name: Rust symbols without their hash, unknowns by module."""
    if not symbol or symbol.startswith("[unknown]"):
        base = (module or "?").rsplit("/", 1)[-1]
        return f"[{base}]"
    symbol = re.sub(r"::h[0-9a-f]{16}$", "", symbol)
    symbol = re.sub(r"\+0x[0-9a-f]+$", "", symbol)
    return symbol


def fold(lines):
    stacks = collections.Counter()
    comm = None
    frames = []

    def finish():
        if comm is not None:
            stacks[";".join([comm] + list(reversed(frames)))] += 1

    for line in lines:
        line = line.rstrip("\n")
        if not line.strip():
            finish()
            comm, frames = None, []
            continue
        if not line.startswith((" ", "\t")):
            finish()
            # "comm pid/tid [cpu] time: period event:"; the thread name may hold spaces,
            # so it is everything before the first field that is a number (the pid).
            parts = line.split()
            name = []
            for p in parts:
                if re.match(r"^\d+(/\d+)?$", p):
                    break
                name.append(p)
            comm = "-".join(name) or "?"
            # Thread pools get numbered names; fold them into one.
            comm = re.sub(r"[-_]?\d+$", "", comm)
            frames = []
            continue
        m = FRAME.match(line)
        if m:
            frames.append(clean(m.group(1), m.group(2)))
    finish()
    return stacks


def color(name):
    h = zlib.crc32(name.encode())
    if name.startswith("[k") or "kernel" in name or name.startswith(("__x64", "do_syscall", "entry_SYSCALL")):
        return f"rgb({200 + h % 55},{120 + h % 60},{40 + h % 40})"
    if "tokio" in name:
        return f"rgb({60 + h % 40},{140 + h % 60},{200 + h % 55})"
    if "tinylag" in name:
        return f"rgb({80 + h % 60},{190 + h % 60},{80 + h % 40})"
    return f"rgb({220 + h % 35},{90 + h % 90},{50 + h % 50})"


def svg(stacks, title, width=1600, row=16):
    total = sum(stacks.values())
    tree = {}
    for stack, n in stacks.items():
        node = tree
        for frame in stack.split(";"):
            child = node.setdefault(frame, [0, {}])
            child[0] += n
            node = child[1]
    depth = 0

    def measure(node, d):
        nonlocal depth
        depth = max(depth, d)
        for _, (_, kids) in node.items():
            measure(kids, d + 1)

    measure(tree, 1)
    height = (depth + 3) * row
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="monospace" font-size="11">',
           f'<rect width="100%" height="100%" fill="#fafafa"/>',
           f'<text x="{width / 2}" y="{row}" text-anchor="middle" font-size="14">'
           f'{html.escape(title)} ({total} samples)</text>']

    def draw(node, x, d):
        for name, (n, kids) in sorted(node.items()):
            w = n / total * width
            y = height - (d + 1) * row
            if w >= 0.3:
                label = html.escape(name)
                share = 100 * n / total
                out.append(f'<g><title>{label} ({n} samples, {share:.2f}%)</title>'
                           f'<rect x="{x:.2f}" y="{y}" width="{w:.2f}" height="{row - 1}" '
                           f'fill="{color(name)}"/>')
                chars = int(w / 7)
                if chars >= 3:
                    text = name if len(name) <= chars else name[: chars - 2] + ".."
                    out.append(f'<text x="{x + 2:.2f}" y="{y + row - 4}">{html.escape(text)}</text>')
                out.append("</g>")
                draw(kids, x, d + 1)
            x += w

    draw(tree, 0.0, 0)
    out.append("</svg>")
    return "\n".join(out) + "\n"


def top(stacks, n):
    total = sum(stacks.values())
    own = collections.Counter()
    anywhere = collections.Counter()
    for stack, c in stacks.items():
        frames = stack.split(";")
        own[frames[-1]] += c
        for f in set(frames[1:]):
            anywhere[f] += c
    lines = [f"{'self %':>7} {'total %':>7}  function ({total} samples)"]
    for name, c in own.most_common(n):
        lines.append(f"{100 * c / total:7.2f} {100 * anywhere[name] / total:7.2f}  {name}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--title", default="flame graph")
    ap.add_argument("--folded")
    ap.add_argument("--top", type=int, default=0)
    args = ap.parse_args()
    stacks = fold(sys.stdin)
    if not stacks:
        sys.exit("bench/flamegraph.py: no samples in the input")
    if args.folded:
        with open(args.folded, "w") as f:
            for stack, n in sorted(stacks.items()):
                f.write(f"{stack} {n}\n")
    if args.top:
        print(top(stacks, args.top), file=sys.stderr)
    sys.stdout.write(svg(stacks, args.title))


if __name__ == "__main__":
    main()
