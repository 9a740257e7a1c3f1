#!/usr/bin/env python3
"""Atomic read-modify-write instructions executed by a process, from a callgrind profile.

    atomics.py PROFILE [--functions FILE] [--cache DIR] [--clocks FILE]

PROFILE is a callgrind output written with --dump-instr=yes (each instruction's address and
execution count). The atomic instructions are found in each executable object of the profile by
objdump: those with a `lock` prefix, `xchg` with a memory operand (locked without the prefix; a
sequentially consistent store compiles to it) and `mfence`. Prints the number of them executed.
--functions FILE also writes the count per function (`count<TAB>function`, largest first).
--cache DIR keeps each object's list of atomic addresses there, keyed by its path, size and
modification time, since objdump takes seconds on a large binary.
--clocks FILE also counts the clock reads: calls to `clock_gettime` (`Instant::now`,
`SystemTime::now`, the coarse clocks alike), printed after the atomics on the same line, with
the count per calling function written to FILE (`count<TAB>function`).

Why count them: callgrind counts a `lock add` as one instruction like any other, but it waits for
the core's store buffer to drain, which costs some 4 ns on a core that is busy storing (measured on
the 2-CPU Intel Xeon host, 2026-12-04: 5.1 ns a loop iteration of sixteen stores, 9.3 ns with one
`lock add` more). Reference counts (`Arc`, shared `Bytes`), locks, channels and timers are made of
them.

Clock reads are the same kind of hidden cost: under valgrind `clock_gettime` is a system call,
outside what callgrind counts, while natively it reads the timestamp counter through the vDSO,
some 20 ns on this host (a `CLOCK_MONOTONIC_COARSE` read is a load from the vDSO page, 4 ns).
"""

import argparse
import collections
import hashlib
import os
import re
import subprocess
import sys

# A name line: `ob=(3) /path`, or `ob=(3)` once the id was named.
NAME = re.compile(r"(ob|fn|cob|cfn)=\((\d+)\)(?: (.*))?$")
INSN = re.compile(r"\s*([0-9a-f]+):\s+(.*)")


def atomic_addresses(obj, cache):
    """Addresses of the atomic read-modify-write instructions in the object file `obj`."""
    if not os.path.isfile(obj):
        return set()
    st = os.stat(obj)
    key = hashlib.sha1(f"{obj}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()
    path = os.path.join(cache, key) if cache else None
    if path and os.path.exists(path):
        with open(path) as f:
            return {int(line, 16) for line in f if line.strip()}
    found = set()
    dump = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", obj],
        capture_output=True, text=True, check=False,
    ).stdout
    for line in dump.splitlines():
        m = INSN.match(line)
        if not m:
            continue
        insn = m.group(2)
        if insn.startswith("lock ") or insn.startswith("mfence") or (
            insn.startswith("xchg") and "(" in insn
        ):
            found.add(int(m.group(1), 16))
    if path:
        os.makedirs(cache, exist_ok=True)
        with open(path, "w") as f:
            f.write("".join(f"{a:x}\n" for a in sorted(found)))
    return found


def position(token, last):
    """One position of a cost line: absolute (`0x4a2b`), relative (`+3`, `-3`) or `*` (same)."""
    if token == "*":
        return last
    if token[0] == "+":
        return last + int(token[1:], 0)
    if token[0] == "-":
        return last - int(token[1:], 0)
    return int(token, 0)


CLOCK = re.compile(r"^(__)?clock_gettime\b")
# Functions that only pass a clock read on (one read per call): a read is put down to the
# first caller outside them, so that the listing names who wanted the time.
CLOCK_PLUMBING = re.compile(
    r"^(<std::sys::pal::unix::time::Timespec>::now"
    r"|<std::time::(Instant|SystemTime)>::(now|elapsed)"
    r"|tokio::time::clock::(Clock::)?now"
    r"|tokio::time::instant::Instant::now)$"
)


def executions(profile):
    """Execution count of each (object, address), the function each address is in, and the
    calls made from each function to each other (caller, callee)."""
    names = {}
    obj = fn = callee = None
    counts = collections.Counter()
    function_of = {}
    calls = collections.Counter()
    address = 0
    inclusive = False  # the cost line after `calls=` is the call's inclusive cost
    with open(profile) as f:
        positions = None
        for line in f:
            first = line[:1]
            if first.isdigit() or first in "+-*":
                fields = line.split()
                if positions is None or len(fields) <= positions:
                    continue
                address = position(fields[0], address)
                if inclusive:
                    inclusive = False
                    continue
                counts[(obj, address)] += int(fields[positions])
                function_of[(obj, address)] = fn
                continue
            if line.startswith("positions:"):
                kinds = line.split()[1:]
                if kinds[0] != "instr":
                    sys.exit(f"{profile}: no instruction addresses (run callgrind with --dump-instr=yes)")
                positions = len(kinds)
                continue
            if line.startswith("calls="):
                inclusive = True
                if callee:
                    calls[(fn or "???", callee)] += int(line.split("=", 1)[1].split()[0])
                continue
            m = NAME.match(line.rstrip("\n"))
            if m:
                kind, ident, name = m.groups()
                kind = kind[-2:]  # cob names objects, cfn functions: one namespace each
                if name:
                    names[(kind, ident)] = name
                if m.group(1) == "ob":
                    obj = names.get((kind, ident))
                elif m.group(1) == "fn":
                    fn = names.get((kind, ident))
                elif m.group(1) == "cfn":
                    callee = names.get((kind, ident))
    return counts, function_of, calls


def clock_reads(calls):
    """Calls to `clock_gettime` by the function that wanted the time: through the plumbing
    (`Instant::now`, `elapsed`, Tokio's clock), each read is shared among the plumbing's callers
    in proportion to their calls."""
    callers_of = collections.defaultdict(list)
    for (caller, callee), n in calls.items():
        callers_of[callee].append((caller, n))
    by_caller = collections.Counter()

    def put_down(fn, n, depth):
        callers = callers_of.get(fn, [])
        total = sum(c for _, c in callers)
        if depth == 0 or not CLOCK_PLUMBING.match(fn) or total == 0:
            by_caller[fn] += n
            return
        for caller, c in callers:
            put_down(caller, n * c / total, depth - 1)

    for (caller, callee), n in calls.items():
        if CLOCK.match(callee):
            put_down(caller, n, 8)
    return by_caller


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("profile")
    ap.add_argument("--functions")
    ap.add_argument("--cache")
    ap.add_argument("--clocks")
    args = ap.parse_args()
    counts, function_of, calls = executions(args.profile)
    atomic = {}
    total = 0
    per_function = collections.Counter()
    for (obj, address), n in counts.items():
        if obj not in atomic:
            atomic[obj] = atomic_addresses(obj, args.cache) if obj else set()
        if address in atomic[obj]:
            total += n
            per_function[function_of[(obj, address)] or "???"] += n
    if args.functions:
        with open(args.functions, "w") as f:
            for name, n in per_function.most_common():
                f.write(f"{n}\t{name}\n")
    if args.clocks:
        reads = clock_reads(calls)
        with open(args.clocks, "w") as f:
            for name, n in reads.most_common():
                f.write(f"{n:.1f}\t{name}\n")
        print(total, round(sum(reads.values())))
    else:
        print(total)


if __name__ == "__main__":
    main()
