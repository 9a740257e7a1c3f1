#!/usr/bin/env python3
"""Idle keep-alive clients for loadtest/idle.sh: opens N connections to one loopback server,
each sends one HTTP/1.1 request, reads the answer and then stays open doing nothing. The
server's resident memory (VmRSS of --pid, read from /proc) is taken before the first client
and at each checkpoint, once every connection so far has had its answer and a settle delay has
passed. Prints one JSON object on stdout, closes every connection and exits.

    idle_clients.py --port 8000 --pid 1234 --connections 8000 --checkpoints 2000,8000

Standard library only. Loopback only, bounded: at most --connections sockets (and the
process's file limit), at most --concurrency connecting at once, and --timeout seconds in
all, after which it gives up (exit 2).
"""
import argparse
import asyncio
import json
import resource
import socket
import struct
import sys
import time


def rss_kib(pids):
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


async def read_response(reader):
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length, chunked = None, False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value.strip())
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if length is not None:
        await reader.readexactly(length)
    elif chunked:
        await reader.readuntil(b"0\r\n\r\n")
    return status


class Client:
    def __init__(self, args):
        self.args = args
        self.request = (f"GET {args.path} HTTP/1.1\r\nHost: {args.host}:{args.port}\r\n"
                        "User-Agent: idle-clients\r\n\r\n").encode()
        self.conns = []  # (reader, writer)
        self.closed_by_server = 0
        self.errors = {}
        self.non_2xx = 0
        self.watchers = []

    def error(self, kind):
        self.errors[kind] = self.errors.get(kind, 0) + 1

    async def watch(self, reader):
        # An idle connection reads nothing until the server closes it.
        try:
            data = await reader.read(1)
            if not data:
                self.closed_by_server += 1
        except (ConnectionError, OSError):
            self.closed_by_server += 1

    async def one(self, sem):
        async with sem:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(self.args.host, self.args.port), 10)
            except (OSError, asyncio.TimeoutError) as e:
                self.error(f"connect: {type(e).__name__}")
                return
            try:
                writer.write(self.request)
                await writer.drain()
                status = await asyncio.wait_for(read_response(reader), 10)
                if not 200 <= status < 300:
                    self.non_2xx += 1
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError,
                    asyncio.LimitOverrunError, ValueError) as e:
                self.error(f"request: {type(e).__name__}")
                writer.close()
                return
            self.conns.append((reader, writer))
            self.watchers.append(asyncio.ensure_future(self.watch(reader)))

    async def warm_up(self):
        # A few requests on connections closed at once: the server's lazy set-up (upstream
        # pool, first allocations) is done before the baseline is taken.
        for _ in range(self.args.warmup):
            reader, writer = await asyncio.open_connection(self.args.host, self.args.port)
            writer.write(self.request)
            await writer.drain()
            await asyncio.wait_for(read_response(reader), 10)
            writer.close()
            await writer.wait_closed()

    async def run(self):
        args = self.args
        sem = asyncio.Semaphore(args.concurrency)
        await self.warm_up()
        await asyncio.sleep(args.settle)
        out = {"before": {"connections": 0, "rss_kib": rss_kib(args.pid)}, "checkpoints": []}
        t0 = time.monotonic()
        opened_target = 0
        for cp in args.checkpoints:
            await asyncio.gather(*(self.one(sem) for _ in range(cp - opened_target)))
            opened_target = cp
            seconds = round(time.monotonic() - t0, 2)
            await asyncio.sleep(args.settle)
            out["checkpoints"].append({"target": cp, "connections": len(self.conns) - self.closed_by_server,
                                       "rss_kib": rss_kib(args.pid), "seconds": seconds})
        await asyncio.sleep(args.hold)
        out["open_at_end"] = len(self.conns) - self.closed_by_server
        out["closed_by_server"] = self.closed_by_server
        out["errors"] = self.errors
        out["non_2xx"] = self.non_2xx
        return out

    def close(self):
        for w in self.watchers:
            w.cancel()
        # Reset rather than close: thousands of client-side TIME_WAIT sockets per run would
        # otherwise use up the loopback's ephemeral ports for the next server and run.
        linger = struct.pack("ii", 1, 0)
        for _, writer in self.conns:
            sock = writer.get_extra_info("socket")
            if sock is not None:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                except OSError:
                    pass
            writer.close()


async def main_async(args):
    client = Client(args)
    try:
        return await asyncio.wait_for(client.run(), args.timeout)
    finally:
        client.close()
        await asyncio.sleep(0)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--path", default="/users/1")
    ap.add_argument("--pid", type=int, action="append", required=True,
                    help="server process whose VmRSS is read (repeat to sum several)")
    ap.add_argument("--connections", type=int, default=8000)
    ap.add_argument("--checkpoints", default="", help="comma-separated counts (default N/4,N)")
    ap.add_argument("--concurrency", type=int, default=100, help="connections being opened at once")
    ap.add_argument("--warmup", type=int, default=20, help="requests on short-lived connections first")
    ap.add_argument("--settle", type=float, default=1.0, help="seconds to wait before reading RSS")
    ap.add_argument("--hold", type=float, default=2.0, help="seconds to stay idle after the last checkpoint")
    ap.add_argument("--timeout", type=float, default=120.0, help="gives up after this many seconds")
    args = ap.parse_args()
    if args.host not in ("127.0.0.1", "::1", "localhost"):
        ap.error("loopback only")
    n = args.connections
    args.checkpoints = sorted({int(c) for c in args.checkpoints.split(",") if c} or {max(1, n // 4), n})
    if args.checkpoints[-1] != n or args.checkpoints[0] < 1:
        ap.error("checkpoints must be positive and end at --connections")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and n + 100 > hard:
        ap.error(f"{n} connections need more files than this process may open (hard limit {hard})")
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        out = asyncio.run(main_async(args))
    except asyncio.TimeoutError:
        print(f"idle_clients: gave up after {args.timeout}s", file=sys.stderr)
        return 2
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
