#!/usr/bin/env python3
"""Where the instructions of one request go: the difference, function by function, between two
`callgrind_annotate --inclusive=no` listings (a run with N more requests than the other),
divided by N. Used by loadtest/instructions.sh.

    callgrind_diff.py BASE.txt MORE.txt N [--top 25] [--unit instructions]

The listings may be of another event (`--show=I1mr --sort=I1mr`): the first column is read.
"""

import argparse
import re

LINE = re.compile(r"^\s*([0-9,]+)\s+\([^)]*\)\s+(.*)$")


def read(path):
    """Self instructions by function (file:function, without the object in brackets)."""
    counts = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        # Only the function summary: it starts after the `file:function` heading and ends at
        # the first blank line (annotated source, if any, follows).
        started = False
        for line in f:
            if not started:
                started = "file:function" in line
                continue
            if not line.strip():
                break
            m = LINE.match(line)
            if not m or "PROGRAM TOTALS" in m.group(2):
                continue
            name = re.sub(r"\s+\[[^\]]*\]\s*$", "", m.group(2))
            # The path up to the crate (registry paths are long): keep what names the code.
            name = re.sub(r"^.*/index\.crates\.io-[0-9a-f]+/", "", name)
            name = re.sub(r"^/rustc/[0-9a-f]+/library/", "std:", name)
            counts[name] = counts.get(name, 0) + int(m.group(1).replace(",", ""))
    return counts


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("base")
    ap.add_argument("more")
    ap.add_argument("n", type=int)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--unit", default="instructions")
    a = ap.parse_args()
    base, more = read(a.base), read(a.more)
    diff = {k: (more.get(k, 0) - base.get(k, 0)) / a.n for k in set(base) | set(more)}
    total = sum(diff.values())
    print(f"{total:10.0f}  100.0%  all functions listed (self {a.unit} per request)")
    for name, v in sorted(diff.items(), key=lambda kv: -kv[1])[: a.top]:
        print(f"{v:10.0f} {100 * v / total:6.1f}%  {name[:200]}")


if __name__ == "__main__":
    main()
