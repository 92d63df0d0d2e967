#!/usr/bin/env python3
"""Attribute `perf script` call-graph samples to our own functions.

`perf report` sorts by leaf symbol (malloc, memtable seeks...), which says
what is hot but not which of our code paths asked for it. This reads the
text of `perf script` (samples taken with `--call-graph dwarf`) and, for
every sample, finds the innermost frame matching PATTERN (default: any
jobsched_ function) and counts the sample for it. With --leaf, only samples
whose stack contains a frame matching LEAF are counted (e.g. --leaf malloc
answers "who calls malloc").

    perf record -e cpu-clock -F 299 --call-graph dwarf,16384 -p <pid> -o perf.data -- sleep 6
    perf script -i perf.data > perf.txt
    scripts/perf-callers.py perf.txt                 # our functions, inclusive
    scripts/perf-callers.py perf.txt --leaf FindGreaterOrEqual
    scripts/perf-callers.py perf.txt --pattern 'jobsched_core::'
"""

import argparse
import collections
import re
import sys


def samples(lines):
    """Yield each sample's frames (symbol names), innermost first."""
    frames = []
    for line in lines:
        if not line.strip():
            if frames:
                yield frames
            frames = []
            continue
        if line[0] in " \t":
            parts = line.strip().split(None, 1)
            if len(parts) == 2:
                # "addr symbol+off (dso)"
                sym = re.sub(r"\+0x[0-9a-f]+ \(.*\)$", "", parts[1])
                sym = re.sub(r" \(.*\)$", "", sym)
                frames.append(sym)
    if frames:
        yield frames


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file")
    ap.add_argument("--pattern", default=r"jobsched_", help="regex a frame must match to be counted")
    ap.add_argument("--leaf", help="only samples with a frame matching this regex; attribute from there outwards")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--depth", type=int, default=1, help="how many matching frames (outwards) to show per line")
    args = ap.parse_args()
    pat = re.compile(args.pattern)
    leaf = re.compile(args.leaf) if args.leaf else None
    counts = collections.Counter()
    total = kept = 0
    with open(args.file, errors="replace") as f:
        for frames in samples(f):
            total += 1
            start = 0
            if leaf:
                hit = next((i for i, fr in enumerate(frames) if leaf.search(fr)), None)
                if hit is None:
                    continue
                start = hit
            kept += 1
            ours = [fr for fr in frames[start:] if pat.search(fr)][: args.depth]
            key = " <- ".join(short(fr) for fr in ours) if ours else "(no matching frame)"
            counts[key] += 1
    print(f"{total} samples, {kept} counted" + (f" (with a frame matching {args.leaf!r})" if leaf else ""))
    for key, n in counts.most_common(args.top):
        print(f"{100.0 * n / max(total, 1):6.1f}%  {n:6d}  {key}")


def short(sym):
    sym = re.sub(r"::h[0-9a-f]{16}$", "", sym)
    sym = re.sub(r"<impl [^>]*>", "<impl>", sym)
    return sym[-140:]


if __name__ == "__main__":
    sys.exit(main())
