#!/usr/bin/env python3
"""Prints one signed JWT for the load tests: Python's standard library and the `openssl`
command, no packages to install.

    mint_jwt.py HS256 SECRET_FILE [--sub S] [--exp UNIX]
    mint_jwt.py RS256|ES256 PRIVATE_KEY_PEM [--sub S] [--exp UNIX]

The secret file's trailing newlines are dropped, as Breakwater's `secret_file` does. The
token expires in 2100 unless --exp says otherwise.
"""
import argparse
import base64
import hashlib
import hmac
import json
import subprocess
import sys


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def der_ecdsa_to_raw(der: bytes, size: int = 32) -> bytes:
    """openssl writes ECDSA signatures as DER SEQUENCE {r INTEGER, s INTEGER}; JWS wants
    r || s, each a fixed-size big-endian number."""
    def read_len(i):
        n = der[i]
        if n < 0x80:
            return n, i + 1
        k = n & 0x7F
        return int.from_bytes(der[i + 1:i + 1 + k], "big"), i + 1 + k

    if der[0] != 0x30:
        raise ValueError("not a DER sequence")
    _, i = read_len(1)
    out = b""
    for _ in range(2):
        if der[i] != 0x02:
            raise ValueError("not a DER integer")
        n, i = read_len(i + 1)
        out += int.from_bytes(der[i:i + n], "big").to_bytes(size, "big")
        i += n
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("alg", choices=["HS256", "RS256", "ES256"])
    ap.add_argument("key", help="HS256: the secret file; RS256/ES256: the private key (PEM)")
    ap.add_argument("--sub", default="bench-user")
    ap.add_argument("--exp", type=int, default=4102444800)  # 2100-01-01
    args = ap.parse_args()

    header = {"alg": args.alg, "typ": "JWT"}
    claims = {"sub": args.sub, "exp": args.exp, "iat": 1700000000, "scope": "users:read"}
    signing_input = (b64url(json.dumps(header, separators=(",", ":")).encode()) + "." +
                     b64url(json.dumps(claims, separators=(",", ":")).encode())).encode()
    if args.alg == "HS256":
        with open(args.key, "rb") as f:
            secret = f.read().rstrip(b"\r\n")
        sig = hmac.new(secret, signing_input, hashlib.sha256).digest()
    else:
        sig = subprocess.run(["openssl", "dgst", "-sha256", "-sign", args.key, "-binary"],
                             input=signing_input, capture_output=True, check=True).stdout
        if args.alg == "ES256":
            sig = der_ecdsa_to_raw(sig)
    print(signing_input.decode() + "." + b64url(sig))
    return 0


if __name__ == "__main__":
    sys.exit(main())
