#!/usr/bin/env python3
"""Summarises folded stacks (inferno-collapse-perf output, one `frame;frame;... COUNT` per line)
as Markdown tables, one column per file, so targets can be compared side by side:

1. self time by component (the crate of the leaf frame; kernel, mimalloc, libc apart);
2. the frames with the most self time (the union of each file's top N);
3. inclusive time of Breakwater's own functions (`breakwater::`), each counted once per stack.

    flame_top.py [--top 12] [--us NAME=CPU_US ...] results/flame-pingora.folded ...

Figures are percentages of each file's samples; with `--us NAME=CPU_US` for every file (NAME as
in flame-NAME.folded, CPU_US its measured CPU µs per request), µs per request instead: the
share times CPU_US, so that targets of different cost compare directly. Standard library only.
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


C_FUNCTION = re.compile(r"^(__|_int_|_IO|_dl_|mem|str|malloc|free|calloc|realloc|pthread|epoll|"
                        r"ngx_|\[|clock_|cfree|sched_|syscall|writev|readv|recv|send)")


def component(frames):
    """The component a sample's CPU is charged to, from its leaf frame. A Rust function inlined
    without a path (`mac`, `{async_fn#0}`) is charged to the nearest caller that has one."""
    frame = frames[-1] if frames else "[unknown]"
    if frame.endswith("_[k]"):
        return "kernel"
    if frame in ("[unknown]", ""):
        return "[unknown]"
    if frame.startswith(("_mi_", "mi_", "mimalloc")):
        return "mimalloc"
    if C_FUNCTION.match(frame):
        return "libc and other C"
    crate = None
    for f in reversed(frames):
        crate = own_crate(f)
        if crate:
            break
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
    ap.add_argument("--us", action="append", default=[], metavar="NAME=CPU_US")
    ap.add_argument("files", nargs="+")
    args = ap.parse_args()
    cpu_us = {}
    for item in args.us:
        name, _, value = item.partition("=")
        cpu_us[name] = float(value)

    names, totals, selfs, comps, incl = [], [], [], [], []
    for path in args.files:
        stacks = load(path)
        names.append(re.sub(r"^flame-|\.folded$", "", os.path.basename(path)))
        total = sum(c for _, c in stacks) or 1
        s, comp, inc = Counter(), Counter(), Counter()
        for frames, count in stacks:
            leaf = frames[-1] if frames else "[unknown]"
            s[leaf] += count
            comp[component(frames)] += count
            for fr in set(frames):
                if own_crate(fr) == "breakwater":
                    inc[fr] += count
        totals.append(total)
        selfs.append(s)
        comps.append(comp)
        incl.append(inc)

    # scale[i]: what 100% of file i is worth (100 for percentages, its CPU µs/req otherwise).
    in_us = all(n in cpu_us for n in names)
    scale = [cpu_us[n] if in_us else 100.0 for n in names]
    unit = "µs per request" if in_us else "% of samples"
    pct = lambda v: "—" if v is None or v < 0.05 else f"{v:.1f}"

    def rows_for(counters, keys, backtick=True):
        rows = []
        for key in keys:
            values = [scale[i] * counters[i][key] / totals[i] for i in range(len(names))]
            rows.append((f"`{short(key)}`" if backtick else key, values))
        return rows

    # Rows in the order of their largest share in any column.
    def order(counters, keys):
        return sorted(keys, key=lambda k: max(scale[i] * counters[i][k] / totals[i] for i in range(len(names))), reverse=True)

    # inferno weighs each stack by its perf event period: with the cpu-clock event (VMs), ns.
    print("Total weight (perf periods; ns of CPU with cpu-clock): "
          + ", ".join(f"{n} {t:.3g}" for n, t in zip(names, totals)) + ".\n")
    ckeys = set()
    for c in comps:
        ckeys.update(k for k, _ in c.most_common(args.top))
    if in_us:
        print("µs per request = the share of the profile × the CPU µs per request of the measured run.\n")
        print(table(f"CPU per request, {unit}", names, [("total", scale)], pct))
    print(table(f"Self time by component, {unit}", names, rows_for(comps, order(comps, ckeys), backtick=False), pct))
    skeys = set()
    for c in selfs:
        skeys.update(k for k, _ in c.most_common(args.top))
    print(table(f"Frames with the most self time (each target's top {args.top}), {unit}", names,
                rows_for(selfs, order(selfs, skeys)), pct))
    ikeys = set()
    for c in incl:
        ikeys.update(k for k, _ in c.most_common(args.top))
    if ikeys:
        print(table(f"Breakwater's own functions, inclusive (each target's top {args.top}), {unit}", names,
                    rows_for(incl, order(incl, ikeys)), pct))
    return 0


if __name__ == "__main__":
    sys.exit(main())
