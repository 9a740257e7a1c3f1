#!/usr/bin/env python3
"""Idle keep-alive clients for loadtest/idle.sh: opens N connections to one loopback server,
each sends one HTTP/1.1 request, reads the answer and then stays open doing nothing. The
server's resident memory (VmRSS of --pid, read from /proc) is taken before the first client
and at each checkpoint, once every connection so far has had its answer and a settle delay has
passed. Prints one JSON object on stdout, closes every connection and exits.

    idle_clients.py --port 8000 --pid 1234 --connections 8000 --checkpoints 2000,8000

With --h2c each client speaks HTTP/2 with prior knowledge instead: the connection preface, an
empty SETTINGS frame and one GET on stream 1 (a literal HPACK header block), answering the
server's SETTINGS and PING frames, then idle.

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


H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
H2_DATA, H2_HEADERS, H2_SETTINGS, H2_PING, H2_GOAWAY = 0x0, 0x1, 0x4, 0x6, 0x7
H2_END_STREAM, H2_ACK = 0x1, 0x1


def h2_frame(kind, flags, stream, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def hpack_literal(index, value):
    # A literal header field without indexing, its name from the static table (RFC 7541 6.2.2);
    # values here are short, so a one-byte length without Huffman coding.
    value = value.encode()
    assert len(value) < 127
    return bytes([index, len(value)]) + value


def h2_request(path, authority):
    block = (b"\x82"  # :method GET
             + b"\x86"  # :scheme http
             + hpack_literal(4, path)  # :path
             + hpack_literal(1, authority))  # :authority
    return (H2_PREFACE + h2_frame(H2_SETTINGS, 0, 0)
            + h2_frame(H2_HEADERS, 0x4 | H2_END_STREAM, 1, block))  # END_HEADERS | END_STREAM


async def h2_read_frame(reader, writer):
    """Reads one frame, answering SETTINGS and PING as a client must; returns it."""
    head = await reader.readexactly(9)
    length = int.from_bytes(head[:3], "big")
    kind, flags = head[3], head[4]
    stream = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
    payload = await reader.readexactly(length) if length else b""
    if kind == H2_SETTINGS and not flags & H2_ACK:
        writer.write(h2_frame(H2_SETTINGS, H2_ACK, 0))
    elif kind == H2_PING and not flags & H2_ACK:
        writer.write(h2_frame(H2_PING, H2_ACK, 0, payload))
    return kind, flags, stream, payload


async def h2_read_response(reader, writer):
    status = None
    while True:
        kind, flags, stream, payload = await h2_read_frame(reader, writer)
        if kind == H2_GOAWAY:
            raise ConnectionError("GOAWAY")
        if stream != 1 or kind not in (H2_HEADERS, H2_DATA):
            continue
        if kind == H2_HEADERS and status is None:
            # The first field of a response is :status; 0x88 is its indexed form for 200
            # (RFC 7541 appendix A), which is all a 2xx check needs here.
            status = 200 if payload[:1] == b"\x88" else 500
        if flags & H2_END_STREAM:
            return status or 500


class Client:
    def __init__(self, args):
        self.args = args
        if args.h2c:
            self.request = h2_request(args.path, f"{args.host}:{args.port}")
        else:
            self.request = (f"GET {args.path} HTTP/1.1\r\nHost: {args.host}:{args.port}\r\n"
                            "User-Agent: idle-clients\r\n\r\n").encode()
        self.conns = []  # (reader, writer)
        self.closed_by_server = 0
        self.errors = {}
        self.non_2xx = 0
        self.watchers = []

    def error(self, kind):
        self.errors[kind] = self.errors.get(kind, 0) + 1

    async def watch(self, reader, writer):
        # An idle HTTP/1.1 connection reads nothing until the server closes it; an HTTP/2 one
        # may still get frames (a SETTINGS acknowledgement, PINGs), answered as they come.
        try:
            if self.args.h2c:
                while True:
                    await h2_read_frame(reader, writer)
            data = await reader.read(1)
            if not data:
                self.closed_by_server += 1
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            self.closed_by_server += 1

    async def exchange(self, reader, writer):
        writer.write(self.request)
        await writer.drain()
        if self.args.h2c:
            return await asyncio.wait_for(h2_read_response(reader, writer), 10)
        return await asyncio.wait_for(read_response(reader), 10)

    async def one(self, sem):
        async with sem:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(self.args.host, self.args.port), 10)
            except (OSError, asyncio.TimeoutError) as e:
                self.error(f"connect: {type(e).__name__}")
                return
            try:
                status = await self.exchange(reader, writer)
                if not 200 <= status < 300:
                    self.non_2xx += 1
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError,
                    asyncio.LimitOverrunError, ValueError) as e:
                self.error(f"request: {type(e).__name__}")
                writer.close()
                return
            self.conns.append((reader, writer))
            self.watchers.append(asyncio.ensure_future(self.watch(reader, writer)))

    async def warm_up(self):
        # A few requests on connections closed at once: the server's lazy set-up (upstream
        # pool, first allocations) is done before the baseline is taken.
        for _ in range(self.args.warmup):
            reader, writer = await asyncio.open_connection(self.args.host, self.args.port)
            await self.exchange(reader, writer)
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
    ap.add_argument("--h2c", action="store_true", help="HTTP/2 with prior knowledge instead of HTTP/1.1")
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
