#!/usr/bin/env python3
"""Do two POP3 servers show the same maildrops?  run.sh `same` runs it with Dovecot
and mailgate serving the same imported data set.

usage: same.py A_HOST:PORT B_HOST:PORT PASSWORD USER_PATTERN NUSERS BIG_COPIES

For user0..user(NUSERS-1), big and big0..big(BIG_COPIES-1) (USER_PATTERN with {N};
the big ones under the same domain) it logs in to both with USER/PASS and compares
the UIDL lines, the LIST lines and the SHA-256 of every RETR'd message (dot-unstuffed
as poplib returns them, line ends included).  Prints each difference and a final
key=value line; exits 1 when anything differs.  Bounded: one session per account and
server, 60 s socket timeout.
"""
import hashlib
import poplib
import sys


def show(addr, user, password):
    host, port = addr.rsplit(":", 1)
    c = poplib.POP3(host, int(port), timeout=60)
    try:
        c.user(user)
        c.pass_(password)
        uidl = [l.decode() for l in c.uidl()[1]]
        listing = [l.decode() for l in c.list()[1]]
        digests, octets = [], 0
        for i in range(1, len(listing) + 1):
            _, lines, _ = c.retr(i)
            body = b"\r\n".join(lines) + b"\r\n"
            octets += len(body)
            digests.append(hashlib.sha256(body).hexdigest())
        return uidl, listing, digests, octets
    finally:
        c.quit()


def main():
    a, b, password, pattern, nusers, bigs = sys.argv[1:7]
    domain = pattern.split("@", 1)[1]
    users = [pattern.replace("{N}", str(i)) for i in range(int(nusers))]
    users += ["big@" + domain] + ["big%d@%s" % (i, domain) for i in range(int(bigs))]
    accounts = messages = octets = differ = 0
    for user in users:
        left, right = show(a, user, password), show(b, user, password)
        accounts += 1
        messages += len(left[0])
        octets += left[3]
        for what, x, y in zip(("UIDL", "LIST", "bodies"), left[:3], right[:3]):
            if x != y:
                differ += 1
                print("%s: %s differ: %s ... vs %s ..." % (user, what, x[:3], y[:3]))
    print("same accounts=%d messages=%d octets=%d differences=%d a=%s b=%s"
          % (accounts, messages, octets, differ, a, b))
    sys.exit(1 if differ else 0)


main()
