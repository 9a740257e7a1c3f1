#!/usr/bin/env python3
"""Summarises folded stacks (inferno-collapse-perf output, one `frame;frame;... COUNT` per line)
as Markdown tables, one column per file, so targets can be compared side by side:

1. self time by component (the crate of the leaf frame; kernel, mimalloc, libc apart);
2. the frames with the most self time (the union of each file's top N);
3. inclusive time of Breakwater's own functions (`breakwater::`), each counted once per stack.

    flame_top.py [--top 12] results/flame-pingora.folded results/flame-breakwater.folded ...

Percentages are of each file's samples. Standard library only.
"""
import argparse
import os
import re
import sys
from collections import Counter


def load(path):
    stacks = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            stack, _, count = line.rpartition(" ")
            try:
                stacks.append((stack.split(";"), int(count)))
            except ValueError:
                continue
    return stacks


def component(frame):
    if frame.endswith("_[k]"):
        return "kernel"
    if frame in ("[unknown]", ""):
        return "[unknown]"
    if frame.startswith(("_mi_", "mi_", "mimalloc")):
        return "mimalloc"
    if "::" not in frame:
        return "libc and other C"
    crate = own_crate(frame)
    if crate in ("core", "alloc", "std"):
        return "Rust std (core, alloc, std)"
    return crate or "Rust, no path (inlined closures, <T as ...>)"


def own_crate(frame):
    """The crate a Rust frame's function belongs to: `breakwater` for
    `breakwater::x::f` and `<breakwater::proxy::Gateway as pingora_proxy::ProxyHttp>::f`,
    None for inlined frames named without a path (`{async_fn#0}<...>`, `T as ...`)."""
    m = re.match(r"^<*&?(?:dyn |impl |mut )*([a-z_][a-z0-9_]*)::", frame)
    return m.group(1) if m else None


def short(frame, width=100):
    frame = frame.replace("|", "\\|")
    return frame if len(frame) <= width else frame[: width - 1] + "…"


def table(title, columns, rows, fmt):
    out = [f"**{title}**", "", "| " + " | ".join(["frame"] + columns) + " |",
           "|---|" + "---:|" * len(columns)]
    for name, values in rows:
        out.append(f"| {name} | " + " | ".join(fmt(v) for v in values) + " |")
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("files", nargs="+")
    args = ap.parse_args()

    names, totals, selfs, comps, incl = [], [], [], [], []
    for path in args.files:
        stacks = load(path)
        names.append(re.sub(r"^flame-|\.folded$", "", os.path.basename(path)))
        total = sum(c for _, c in stacks) or 1
        s, comp, inc = Counter(), Counter(), Counter()
        for frames, count in stacks:
            leaf = frames[-1] if frames else "[unknown]"
            s[leaf] += count
            comp[component(leaf)] += count
            for fr in set(frames):
                if own_crate(fr) == "breakwater":
                    inc[fr] += count
        totals.append(total)
        selfs.append(s)
        comps.append(comp)
        incl.append(inc)

    pct = lambda v: "—" if v is None or v < 0.05 else f"{v:.1f}"

    def rows_for(counters, keys, backtick=True):
        rows = []
        for key in keys:
            values = [100.0 * counters[i][key] / totals[i] for i in range(len(names))]
            rows.append((f"`{short(key)}`" if backtick else key, values))
        return rows

    # Rows in the order of their largest share in any column.
    def order(counters, keys):
        return sorted(keys, key=lambda k: max(100.0 * counters[i][k] / totals[i] for i in range(len(names))), reverse=True)

    # inferno weighs each stack by its perf event period: with the cpu-clock event (VMs), ns.
    print("Total weight (perf periods; ns of CPU with cpu-clock): "
          + ", ".join(f"{n} {t:.3g}" for n, t in zip(names, totals)) + ".\n")
    ckeys = set()
    for c in comps:
        ckeys.update(k for k, _ in c.most_common(args.top))
    print(table("Self time by component, % of samples", names, rows_for(comps, order(comps, ckeys), backtick=False), pct))
    skeys = set()
    for c in selfs:
        skeys.update(k for k, _ in c.most_common(args.top))
    print(table(f"Frames with the most self time (each target's top {args.top}), % of samples", names,
                rows_for(selfs, order(selfs, skeys)), pct))
    ikeys = set()
    for c in incl:
        ikeys.update(k for k, _ in c.most_common(args.top))
    if ikeys:
        print(table(f"Breakwater's own functions, inclusive (each target's top {args.top}), % of samples", names,
                    rows_for(incl, order(incl, ikeys)), pct))
    return 0


if __name__ == "__main__":
    sys.exit(main())
