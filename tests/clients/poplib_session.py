#!/usr/bin/env python3
"""Drive mailgate with Python's poplib, the way a real client does, and print what it saw
as JSON: python3 poplib_session.py MODE HOST PORT CAFILE USER PASSWORD [--delete] [--apop]

MODE is ssl (POP3S), stls (cleartext + STLS) or plain (no TLS)."""
import hashlib
import json
import poplib
import ssl
import sys


def main():
    mode, host, port, cafile, user, password = sys.argv[1:7]
    flags = set(sys.argv[7:])
    ctx = ssl.create_default_context(cafile=cafile)
    if mode == "ssl":
        conn = poplib.POP3_SSL(host, int(port), context=ctx, timeout=20)
    else:
        conn = poplib.POP3(host, int(port), timeout=20)
        if mode == "stls":
            conn.stls(context=ctx)
    out = {"welcome": conn.getwelcome().decode(), "capa": sorted(conn.capa().keys())}
    if "--apop" in flags:
        out["login"] = conn.apop(user, password).decode()
    else:
        conn.user(user)
        out["login"] = conn.pass_(password).decode()
    count, size = conn.stat()
    out["stat"] = [count, size]
    _, listing, _ = conn.list()
    out["list"] = [line.decode() for line in listing]
    _, uidl, _ = conn.uidl()
    out["uidl"] = [line.decode() for line in uidl]
    out["sha256"] = []
    out["sizes"] = []
    for i in range(1, count + 1):
        _, lines, octets = conn.retr(i)
        # poplib strips CRLF and dot-stuffing; rebuild the CRLF form to checksum it.
        body = b"".join(line + b"\r\n" for line in lines)
        out["sha256"].append(hashlib.sha256(body).hexdigest())
        out["sizes"].append(len(body))
    if count:
        _, top, _ = conn.top(1, 0)
        out["top0"] = [line.decode("utf-8", "replace") for line in top]
    if "--delete" in flags:
        for i in range(1, count + 1):
            conn.dele(i)
    out["quit"] = conn.quit().decode()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
