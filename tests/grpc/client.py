#!/usr/bin/env python3
"""A real gRPC client for tests/grpc.rs (Debian's python3-grpcio): makes the calls given as
a JSON list on argv[2] to argv[1] (host:port, h2c) and prints one JSON list of results.

A call: {"method": "/test.Echo/Unary", "request": "echo:x", "stream": false,
         "timeout": seconds or null, "metadata": [[key, value], ...]}
A result: {"code": "OK" | "UNAVAILABLE" | ..., "details": str, "responses": [str, ...],
           "trailing": {key: value}}
"""
import json
import sys

import grpc


def call(channel, c):
    method = c["method"]
    kwargs = {"timeout": c.get("timeout"), "metadata": [tuple(m) for m in c.get("metadata", [])]}
    request = c["request"].encode()
    try:
        if c.get("stream"):
            it = channel.unary_stream(method)(request, **kwargs)
            responses = [r.decode() for r in it]
            trailing = it.trailing_metadata()
        else:
            response, rpc = channel.unary_unary(method).with_call(request, **kwargs)
            responses = [response.decode()]
            trailing = rpc.trailing_metadata()
        return {"code": "OK", "details": "", "responses": responses,
                "trailing": {k: v for k, v in (trailing or ())}}
    except grpc.RpcError as e:
        return {"code": e.code().name, "details": e.details() or "", "responses": [],
                "trailing": {k: v for k, v in (e.trailing_metadata() or ())
                             if isinstance(v, str)}}


def main():
    target, calls = sys.argv[1], json.loads(sys.argv[2])
    with grpc.insecure_channel(target) as channel:
        print(json.dumps([call(channel, c) for c in calls]))


if __name__ == "__main__":
    main()
