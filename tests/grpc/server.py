#!/usr/bin/env python3
"""A real gRPC server for tests/grpc.rs (Debian's python3-grpcio), with generic handlers on
raw bytes so no protoc is needed. Listens on a free 127.0.0.1 port, plaintext (h2c), or TLS
(h2 by ALPN) with `--tls CERT KEY`, and prints "PORT <n>" once it serves.

/test.Echo/Unary takes a command as its request:
  echo:X        answers "echo:X"
  status:N      sends its response header, then ends the call with grpc-status N (trailers)
  only:N        ends the call with grpc-status N and no response header (trailers-only)
  sleep:MS      answers "slept" after MS milliseconds
  deadline      answers the time left of the call's deadline (grpc-timeout) in ms, or "none"
/test.Echo/Stream takes a count N and streams "msg-0" .. "msg-N-1".
/grpc.health.v1.Health/Check answers SERVING or NOT_SERVING as /test.Control/Serving
("1" or "0") last set it.
"""
import sys
import threading
import time
from concurrent import futures

import grpc

serving = threading.Event()
serving.set()


def unary(request, context):
    cmd = request.decode()
    if cmd.startswith("status:"):
        context.send_initial_metadata(())
        context.set_code(grpc.StatusCode(code_of(int(cmd[7:]))))
        context.set_details("asked for " + cmd)
        return b""
    if cmd.startswith("only:"):
        context.abort(grpc.StatusCode(code_of(int(cmd[5:]))), "asked for " + cmd)
    if cmd.startswith("sleep:"):
        time.sleep(int(cmd[6:]) / 1000)
        return b"slept"
    if cmd == "deadline":
        left = context.time_remaining()
        return b"none" if left is None or left > 1e6 else str(int(left * 1000)).encode()
    return request


def code_of(n):
    return next(c.value for c in grpc.StatusCode if c.value[0] == n)


def stream(request, context):
    for i in range(int(request.decode())):
        yield f"msg-{i}".encode()


def health(request, context):
    return b"\x08\x01" if serving.is_set() else b"\x08\x02"


def set_serving(request, context):
    if request == b"1":
        serving.set()
    else:
        serving.clear()
    return b"ok"


def main():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "test.Echo",
                {
                    "Unary": grpc.unary_unary_rpc_method_handler(unary),
                    "Stream": grpc.unary_stream_rpc_method_handler(stream),
                },
            ),
            grpc.method_handlers_generic_handler(
                "test.Control",
                {"Serving": grpc.unary_unary_rpc_method_handler(set_serving)},
            ),
            grpc.method_handlers_generic_handler(
                "grpc.health.v1.Health",
                {"Check": grpc.unary_unary_rpc_method_handler(health)},
            ),
        )
    )
    if sys.argv[1:2] == ["--tls"]:
        with open(sys.argv[2], "rb") as cert, open(sys.argv[3], "rb") as key:
            credentials = grpc.ssl_server_credentials([(key.read(), cert.read())])
        port = server.add_secure_port("127.0.0.1:0", credentials)
    else:
        port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"PORT {port}", flush=True)
    # Ends when the test closes our stdin (or kills us).
    sys.stdin.read()
    server.stop(0)


if __name__ == "__main__":
    main()
