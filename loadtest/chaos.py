"""The chaos scenario: orders dies under load and comes back; users must not notice.

Started by `loadtest/chaos.sh`, which builds the binaries and prepares the venv. This script
starts users (2 instances) and orders (1 instance) sample services on ephemeral ports and
Breakwater in front of them, sends GET /users/1 and GET /orders/1 at a fixed rate each
(open loop: a request leaves at its scheduled time whatever earlier ones are doing, up to a
concurrency cap), SIGKILLs orders at 1/3 of the run and restarts it on the same port at 2/3,
polls /admin/circuits, records every request, and writes:

  results/chaos-latest.md    the summary (also printed)
  results/chaos-latest.png   the timeline
  results/chaos-latest.csv   every request: t_s, route, status, latency_ms, error
"""

import argparse
import asyncio
import csv
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import aiohttp

ROUTES = {"users": "/users/1", "orders": "/orders/1"}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Run:
    """Everything observed, in seconds since the load started."""

    t0: float = 0.0
    requests: list = field(default_factory=list)  # (t_sent, route, status, latency_ms, error)
    polls: list = field(default_factory=list)  # (t, state, healthy) of the orders upstream
    kill: float | None = None
    restart: float | None = None
    listening: float | None = None
    skipped: dict = field(default_factory=lambda: {r: 0 for r in ROUTES})

    def now(self):
        return time.monotonic() - self.t0


class Processes:
    """The processes this run started; `stop_all` ends each of them, whatever happened."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.procs = []

    def start(self, name, args, wait_lines=0, timeout=10.0):
        out = open(os.path.join(self.tmp, f"{name}-{len(self.procs)}.out"), "w+")
        # stdin is a pipe the sample services watch (--exit-on-stdin-eof): if this script is
        # killed outright they still exit.
        p = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT)
        self.procs.append(p)
        addrs = []
        deadline = time.monotonic() + timeout
        while len(addrs) < wait_lines:
            out.seek(0)
            addrs = [l.split()[-1] for l in out.read().splitlines() if l.startswith("listening on ")]
            if p.poll() is not None:
                out.seek(0)
                raise RuntimeError(f"{name} exited ({p.returncode}): {out.read()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start in {timeout}s")
            time.sleep(0.02)
        return p, addrs

    def stop_all(self):
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + 5
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def gateway_config(tmp, listen, admin, users, orders):
    return f"""
server:
  listen: ["{listen}"]
  threads: 1
  upgrade_sock: {tmp}/upgrade.sock
  pid_file: {tmp}/breakwater.pid
  grace_period: 1s
admin: {{listen: "{admin}"}}
access_log: true
services:
  users:
    routes: [{{path_prefix: /users}}]
    upstreams: ["{users[0]}", "{users[1]}"]
    timeouts: {{connect: 500ms, read: 2s, total: 3s}}
    health_check: {{path: /health, interval: 500ms, timeout: 300ms}}
  orders:
    routes: [{{path_prefix: /orders}}]
    upstreams: ["{orders}"]
    timeouts: {{connect: 500ms, read: 2s, total: 3s}}
    health_check: {{path: /health, interval: 500ms, timeout: 300ms}}
    circuit_breaker: {{failure_threshold: 3, reset_timeout: 1s, max_reset_timeout: 4s}}
    fallback: {{status: 503}}
"""


async def wait_http(session, url, timeout=15.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            async with session.get(url) as r:
                if r.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} not ready in {timeout}s")
        await asyncio.sleep(0.1)


async def drive(run, session, base, route, rate, duration, cap, sem_state):
    """Open loop: request i leaves at t0 + i/rate. When `cap` are in flight it is skipped
    (counted), so a stalled target can neither slow the schedule nor pile up without bound."""
    path = ROUTES[route]
    tasks = set()

    async def one():
        t = run.now()
        status, err = 0, ""
        try:
            async with session.get(base + path) as r:
                await r.read()
                status = r.status
        except asyncio.TimeoutError:
            err = "timeout"
        except aiohttp.ClientError as e:
            err = type(e).__name__
        run.requests.append((t, route, status, (run.now() - t) * 1000.0, err))
        sem_state[route] -= 1

    n = int(duration * rate)
    for i in range(n):
        delay = i / rate - run.now()
        if delay > 0:
            await asyncio.sleep(delay)
        if sem_state[route] >= cap:
            run.skipped[route] += 1
            continue
        sem_state[route] += 1
        task = asyncio.create_task(one())
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks)


async def poll_circuits(run, admin, stop):
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as s:
        while not stop.is_set():
            t = run.now()
            try:
                async with s.get(f"http://{admin}/admin/circuits") as r:
                    body = await r.json()
                up = body.get("services", body)["orders"]["upstreams"][0]
                run.polls.append((t, up["state"], up["healthy"]))
            except (aiohttp.ClientError, asyncio.TimeoutError, KeyError, ValueError):
                pass
            await asyncio.sleep(0.1)


async def chaos(run, procs, orders_addr, duration):
    port = orders_addr.rsplit(":", 1)[1]
    await asyncio.sleep(max(0.0, duration / 3 - run.now()))
    orders = procs.orders
    orders.send_signal(signal.SIGKILL)
    run.kill = run.now()
    await asyncio.get_running_loop().run_in_executor(None, orders.wait)
    print(f"  t={run.kill:6.2f}s  orders SIGKILLed", flush=True)
    await asyncio.sleep(max(0.0, 2 * duration / 3 - run.now()))
    run.restart = run.now()
    loop = asyncio.get_running_loop()
    # The port may sit in TIME_WAIT a moment; try again until it binds.
    for attempt in range(50):
        try:
            procs.orders, _ = await loop.run_in_executor(None, lambda: procs.start(
                "orders", procs.sample_cmd("orders", f"127.0.0.1:{port}"), wait_lines=1, timeout=5))
            break
        except RuntimeError as e:
            if attempt == 49:
                raise
            await asyncio.sleep(0.1)
    run.listening = run.now()
    print(f"  t={run.restart:6.2f}s  orders restarted on :{port} (listening at t={run.listening:.2f}s)",
          flush=True)


async def main_async(args, procs, tmp):
    bindir = args.bin
    sample = os.path.join(bindir, "sample-service")
    procs.sample_cmd = lambda name, addr: [sample, "--listen", addr, "--name", name,
                                           "--exit-on-stdin-eof"]
    _, users = procs.start("users", [sample, "--service", "users=127.0.0.1:0",
                                     "--service", "users=127.0.0.1:0", "--exit-on-stdin-eof"],
                           wait_lines=2)
    procs.orders, (orders,) = procs.start("orders", procs.sample_cmd("orders", "127.0.0.1:0"),
                                          wait_lines=1)
    listen, admin = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    cfg = os.path.join(tmp, "gateway.yaml")
    with open(cfg, "w") as f:
        f.write(gateway_config(tmp, listen, admin, users, orders))
    gw = subprocess.Popen([os.path.join(bindir, "breakwater"), "-c", cfg],
                          stdin=subprocess.DEVNULL,
                          stdout=open(os.path.join(tmp, "access.log"), "w"),
                          stderr=open(os.path.join(tmp, "breakwater.err"), "w"))
    procs.procs.append(gw)
    print(f"users {users[0]} {users[1]}, orders {orders}, Breakwater {listen} (admin {admin})")

    timeout = aiohttp.ClientTimeout(total=args.timeout)
    conn = aiohttp.TCPConnector(limit=2 * args.concurrency, limit_per_host=2 * args.concurrency)
    async with aiohttp.ClientSession(timeout=timeout, connector=conn) as session:
        await wait_http(session, f"http://{admin}/ready")
        for path in ROUTES.values():  # warm the connections, and fail early if misrouted
            async with session.get(f"http://{listen}{path}") as r:
                if r.status != 200:
                    raise RuntimeError(f"{path}: {r.status} before the run")
        print(f"load: {args.rate}/s on each of {', '.join(ROUTES.values())} for {args.duration}s "
              f"(open loop, at most {args.concurrency} in flight per route, {args.timeout}s timeout)",
              flush=True)
        run = Run(t0=time.monotonic())
        stop = asyncio.Event()
        sem_state = {r: 0 for r in ROUTES}
        poller = asyncio.create_task(poll_circuits(run, admin, stop))
        chaos_task = asyncio.create_task(chaos(run, procs, orders, args.duration))
        drivers = [drive(run, session, f"http://{listen}", r, args.rate, args.duration,
                         args.concurrency, sem_state) for r in ROUTES]
        # Hard stop: the schedule, plus one timeout for the last requests, plus slack.
        await asyncio.wait_for(asyncio.gather(*drivers, chaos_task),
                               timeout=args.duration + args.timeout + 10)
        stop.set()
        await poller
    return run


def pct(values, q):
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q / 100 * (len(v) - 1))))]


def analyse(run, args):
    reqs = sorted(run.requests)
    end = lambda r: r[0] + r[3] / 1000.0  # noqa: E731  (when the answer arrived)
    ok = lambda r: 200 <= r[2] < 300  # noqa: E731
    fallback = lambda r: r[2] == 503  # noqa: E731
    orders = [r for r in reqs if r[1] == "orders"]

    # Trip: the first poll showing the breaker open after the kill, and the first fallback 503.
    trip_poll = next((t for t, s, _ in run.polls if t >= run.kill and s == "open"), None)
    first_fb = min((end(r) for r in orders if r[0] >= run.kill and fallback(r)), default=None)
    trip = min(x for x in (trip_poll, first_fb, float("inf")) if x is not None)
    trip = None if trip == float("inf") else trip
    # Recovery: the first 200 on orders sent after the restart, and the first poll closed.
    first_ok = min((end(r) for r in orders if r[0] >= run.restart and ok(r)), default=None)
    closed_poll = next((t for t, s, h in run.polls if t >= run.restart and s == "closed"), None)
    last_fail = max((end(r) for r in orders if r[0] >= run.restart and not ok(r)), default=None)

    phases = [("before kill", 0.0, run.kill), ("orders down", run.kill, run.restart),
              ("after restart", run.restart, float("inf"))]

    def stats(rows):
        lat = [r[3] for r in rows]
        n = len(rows)
        good = sum(1 for r in rows if ok(r))
        return n, (100.0 * good / n if n else float("nan")), pct(lat, 50), pct(lat, 99)

    lines = []
    w = lines.append
    w("## Chaos: orders killed under load, then restarted")
    w("")
    w(f"- machine: {args.machine}")
    w(f"- load: {args.rate} req/s on each of GET /users/1 and GET /orders/1 for {args.duration:g}s, "
      f"open loop (Python asyncio + aiohttp, at most {args.concurrency} in flight per route, "
      f"{args.timeout:g}s timeout; latencies include the Python client's own overhead)")
    w("- Breakwater: 1 thread; users = 2 instances, orders = 1; health checks every 500ms; orders "
      "breaker failure_threshold 3, reset_timeout 1s")
    w(f"- orders SIGKILLed at t={run.kill:.2f}s, restarted on the same port at t={run.restart:.2f}s "
      f"(listening at t={run.listening:.2f}s)")
    w("")
    w("| route | requests | 2xx | success | 503 fallback | 502 | 504 | other | client errors | skipped (cap) |")
    w("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for route in ROUTES:
        rows = [r for r in reqs if r[1] == route]
        c = lambda f: sum(1 for r in rows if f(r))  # noqa: E731
        n2 = c(ok)
        other = c(lambda r: r[2] and not ok(r) and r[2] not in (502, 503, 504))
        w(f"| {route} | {len(rows)} | {n2} | {100.0 * n2 / max(1, len(rows)):.2f}% | "
          f"{c(fallback)} | {c(lambda r: r[2] == 502)} | {c(lambda r: r[2] == 504)} | {other} | "
          f"{c(lambda r: r[2] == 0)} | {run.skipped[route]} |")
    w("")
    fb_lat = [r[3] for r in orders if fallback(r)]
    fmt = lambda x, unit="s": "never" if x is None else f"{x:.2f} {unit}"  # noqa: E731
    w("| event | value |")
    w("|---|---|")
    w(f"| time to trip (kill → breaker open) | {fmt(None if trip is None else trip - run.kill)} "
      f"(admin poll: {fmt(None if trip_poll is None else trip_poll - run.kill)}; first fallback 503: "
      f"{fmt(None if first_fb is None else first_fb - run.kill)}) |")
    w(f"| orders answers between kill and trip | "
      f"{sum(1 for r in orders if run.kill <= r[0] and end(r) < (trip or float('inf')))} "
      f"({', '.join(f'{s}: {n}' for s, n in sorted(count_status(orders, run.kill, trip).items()))}) |")
    w(f"| fallback latency (503s) | p50 {pct(fb_lat, 50):.2f} ms, p99 {pct(fb_lat, 99):.2f} ms, "
      f"n={len(fb_lat)} |")
    w(f"| time to recover (restart → first 200 on orders) | "
      f"{fmt(None if first_ok is None else first_ok - run.restart)} |")
    w(f"| time to recover (restart → breaker closed, admin poll) | "
      f"{fmt(None if closed_poll is None else closed_poll - run.restart)} |")
    w(f"| last non-2xx on orders after restart | "
      f"{'none' if last_fail is None else f'{last_fail - run.restart:.2f} s after restart'} |")
    w("")
    w("| route | phase | requests | success | p50 ms | p99 ms |")
    w("|---|---|---:|---:|---:|---:|")
    for route in ROUTES:
        for name, a, b in phases:
            n, s, p50, p99 = stats([r for r in reqs if r[1] == route and a <= r[0] < b])
            w(f"| {route} | {name} | {n} | {s:.2f}% | {p50:.2f} | {p99:.2f} |")
    events = {"kill": run.kill, "trip": trip, "restart": run.restart, "recovered": first_ok}
    return "\n".join(lines) + "\n", events


def count_status(rows, a, b):
    out = {}
    for r in rows:
        if r[0] >= a and r[0] + r[3] / 1000.0 < (b or float("inf")):
            key = r[2] if r[2] else (r[4] or "error")
            out[key] = out.get(key, 0) + 1
    return out


def plot(run, events, args, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    from matplotlib.patches import Patch

    secs = int(args.duration + 0.999)
    classes = [("2xx", "#2e9d4a", lambda r: 200 <= r[2] < 300),
               ("503 fallback", "#f0a020", lambda r: r[2] == 503),
               ("502 / 504 / other 5xx", "#d62728", lambda r: r[2] >= 500 and r[2] != 503),
               ("4xx", "#9467bd", lambda r: 400 <= r[2] < 500),
               ("client error / timeout", "#555555", lambda r: r[2] == 0)]
    fig, axes = plt.subplots(3, 1, figsize=(13, 9.5), sharex=True,
                             gridspec_kw={"height_ratios": [1, 1, 1.1]})
    fig.suptitle(f"Breakwater chaos run: orders SIGKILLed at t={run.kill:.1f}s, restarted at "
                 f"t={run.restart:.1f}s ({args.rate} req/s per route)", fontsize=13)
    x = list(range(secs))
    for ax, route in zip(axes[:2], ROUTES):
        rows = [r for r in run.requests if r[1] == route]
        bottom = [0] * secs
        for label, color, pred in classes:
            counts = [0] * secs
            for r in rows:
                s = int(r[0])
                if s < secs and pred(r):
                    counts[s] += 1
            if any(counts):
                ax.bar(x, counts, width=0.9, bottom=bottom, color=color, label=label, align="edge")
                bottom = [b + c for b, c in zip(bottom, counts)]
        ax.set_ylabel(f"{ROUTES[route]}\nresponses / s", fontsize=11)
        ax.set_ylim(0, max(max(bottom, default=0), args.rate) * 1.35)
        ax.grid(axis="y", alpha=0.3)
    # Breaker state and health of the orders upstream (admin polls), as two bands along the
    # top of its panel.
    state_colors = {"open": "#d62728", "half_open": "#f0d020", "closed": "#2e9d4a"}
    health_colors = {True: "#2e9d4a", False: "#d62728"}
    ax = axes[1]
    top = ax.get_ylim()[1]
    polls = run.polls + [(run.polls[-1][0] + 0.1, None, None)] if run.polls else []
    for (t, state, healthy), nxt in zip(polls, polls[1:]):
        ax.axvspan(t, nxt[0], ymin=0.92, ymax=1.0, color=state_colors.get(state, "#999999"), lw=0)
        ax.axvspan(t, nxt[0], ymin=0.83, ymax=0.91, color=health_colors.get(healthy, "#999999"),
                   lw=0)
    for y, label in ((0.96, "breaker state"), (0.87, "health check")):
        ax.text(0.15, top * y, label, fontsize=8.5, va="center", color="white", fontweight="bold")
    handles, labels = [], []
    for a in axes[:2]:
        for h, l in zip(*a.get_legend_handles_labels()):
            if l not in labels:
                handles.append(h)
                labels.append(l)
    for label, color in (("breaker/health: closed, healthy", state_colors["closed"]),
                         ("breaker half-open", state_colors["half_open"]),
                         ("breaker open / unhealthy", state_colors["open"])):
        handles.append(Patch(color=color))
        labels.append(label)

    # Latency per second, p50 and p99 per route.
    ax = axes[2]
    styles = {"users": "#1f77b4", "orders": "#ff7f0e"}
    for route in ROUTES:
        for q, ls in ((50, "-"), (99, "--")):
            xs, ys = [], []
            for s in range(secs):
                lat = [r[3] for r in run.requests if r[1] == route and int(r[0]) == s]
                if lat:
                    xs.append(s + 0.5)
                    ys.append(max(pct(lat, q), 0.05))
            ax.plot(xs, ys, ls, color=styles[route], label=f"{ROUTES[route]} p{q}", lw=1.8)
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_ylabel("latency ms (log)", fontsize=11)
    ax.set_xlabel("seconds since the load started", fontsize=11)
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="upper left", fontsize=9, ncol=4)

    marks = [("kill", "#000000"), ("trip", "#d62728"), ("restart", "#1f77b4"),
             ("recovered", "#2e9d4a")]
    for name, color in marks:
        t = events.get(name)
        if t is None:
            continue
        for a in axes:
            a.axvline(t, color=color, lw=1.5, ls=":")
        offset = {"kill": -0.15, "trip": 0.15, "restart": -0.15, "recovered": 0.15}[name]
        axes[0].text(t + offset, axes[0].get_ylim()[1] * 0.97, f"{name}\n{t:.2f}s",
                     ha="right" if offset < 0 else "left", va="top", fontsize=9, color=color,
                     fontweight="bold")
    axes[2].set_xlim(0, secs)
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=9.5, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=30.0, help="seconds")
    ap.add_argument("--rate", type=int, default=200, help="requests per second per route")
    ap.add_argument("--concurrency", type=int, default=200, help="max in flight per route")
    ap.add_argument("--timeout", type=float, default=2.0, help="per request, seconds")
    ap.add_argument("--bin", required=True)
    ap.add_argument("--results", required=True)
    ap.add_argument("--machine", default="")
    args = ap.parse_args()

    # SIGTERM (the wrapper's cleanup) unwinds through `finally` like Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    tmp = tempfile.mkdtemp(prefix="breakwater-chaos.")
    procs = Processes(tmp)
    try:
        run = asyncio.run(main_async(args, procs, tmp))
    finally:
        procs.stop_all()
    report, events = analyse(run, args)
    print()
    print(report)
    os.makedirs(args.results, exist_ok=True)
    with open(os.path.join(args.results, "chaos-latest.md"), "w") as f:
        f.write(report)
    with open(os.path.join(args.results, "chaos-latest.csv"), "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["t_s", "route", "status", "latency_ms", "error"])
        for r in sorted(run.requests):
            wr.writerow([f"{r[0]:.4f}", r[1], r[2], f"{r[3]:.3f}", r[4]])
    png = os.path.join(args.results, "chaos-latest.png")
    plot(run, events, args, png)
    print(f"written: {png}, chaos-latest.md, chaos-latest.csv")
    import shutil
    shutil.rmtree(tmp, ignore_errors=True)
    users = [r for r in run.requests if r[1] == "users"]
    users_ok = sum(1 for r in users if 200 <= r[2] < 300) / max(1, len(users))
    if users_ok < 0.999:
        print(f"FAIL: users success {100 * users_ok:.2f}% < 99.9%")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
