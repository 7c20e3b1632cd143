#!/usr/bin/env python3
"""Deliver one message to mailgate with Python's smtplib, the way an MTA or script does,
and print every reply it got as JSON:

    python3 smtp_send.py MODE TARGET CAFILE MESSAGE_FILE FROM RCPT [RCPT...]

MODE is lmtp (TARGET host:port), lmtp-unix (TARGET a socket path), smtp (host:port, no
TLS) or starttls (host:port, STARTTLS verified against CAFILE with SNI mail.test).

smtplib reads only the first of LMTP's per-recipient replies after DATA, so the rest are
read here with getreply(), one per accepted recipient (RFC 2033 section 4.2)."""
import json
import smtplib
import ssl
import sys


def reply(code_msg):
    code, msg = code_msg
    return [code, msg.decode("utf-8", "replace")]


def main():
    mode, target, cafile, message_file, sender, *rcpts = sys.argv[1:]
    with open(message_file, "rb") as f:
        message = f.read()
    out = {}
    if mode == "lmtp-unix":
        conn = smtplib.LMTP(target, timeout=20)
    else:
        host, port = target.rsplit(":", 1)
        cls = smtplib.LMTP if mode == "lmtp" else smtplib.SMTP
        conn = cls(host, int(port), timeout=20)
    # smtplib.LMTP sends LHLO for ehlo().
    out["hello"] = reply(conn.ehlo("client.test"))
    out["features"] = sorted(conn.esmtp_features.keys())
    if mode == "starttls":
        ctx = ssl.create_default_context(cafile=cafile)
        out["starttls"] = reply(conn.starttls(context=ctx))
        out["tls_version"] = conn.sock.version()
        conn.ehlo("client.test")
        out["tls_features"] = sorted(conn.esmtp_features.keys())
    opts = ["SMTPUTF8"] if any(ord(c) > 127 for c in sender + "".join(rcpts)) else []
    if "size" in conn.esmtp_features:
        opts.append("SIZE=%d" % len(message))
    out["mail"] = reply(conn.mail(sender, opts))
    out["rcpt"] = [reply(conn.rcpt(r)) for r in rcpts]
    accepted = sum(1 for code, _ in out["rcpt"] if code == 250)
    if accepted:
        out["data"] = [reply(conn.data(message))]
        if mode.startswith("lmtp"):
            out["data"] += [reply(conn.getreply()) for _ in range(accepted - 1)]
    out["quit"] = reply(conn.quit())
    print(json.dumps(out))


if __name__ == "__main__":
    main()
