#!/usr/bin/env python3
"""One poll of a client that keeps mail on the server, as old clients do: ask LAST (RFC
1460) and fetch the messages after it; when LAST is refused, fall back to UIDL and fetch
the messages whose UIDs are not in STATE. Prints JSON: how it decided and what it fetched.

python3 keep_poll.py HOST PORT CAFILE USER PASSWORD STATE"""
import json
import os
import poplib
import ssl
import sys


def main():
    host, port, cafile, user, password, state = sys.argv[1:7]
    ctx = ssl.create_default_context(cafile=cafile)
    conn = poplib.POP3_SSL(host, int(port), context=ctx, timeout=20)
    conn.user(user)
    conn.pass_(password)
    count, _ = conn.stat()
    try:
        last = int(conn._shortcmd("LAST").split()[1])
        mode, wanted = "last", list(range(last + 1, count + 1))
    except poplib.error_proto:
        known = set()
        if os.path.exists(state):
            with open(state) as f:
                known = set(f.read().split())
        _, listing, _ = conn.uidl()
        uids = dict(line.decode().split(" ", 1) for line in listing)
        mode = "uidl"
        wanted = [int(n) for n, uid in uids.items() if uid not in known]
        with open(state, "w") as f:
            f.write("\n".join(sorted(known | set(uids.values()))))
    subjects = []
    for n in wanted:
        _, lines, _ = conn.retr(n)
        subjects += [l.decode()[9:] for l in lines if l.startswith(b"Subject: ")]
    conn.quit()
    print(json.dumps({"mode": mode, "fetched": subjects}))


if __name__ == "__main__":
    sys.exit(main())
