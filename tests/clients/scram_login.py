#!/usr/bin/env python3
"""A SCRAM-SHA-256 (RFC 5802/7677) POP3 client over implicit TLS, written from the RFC with
hashlib/hmac, to check mailgate's server side against an independent implementation.
python3 scram_login.py HOST PORT CAFILE USER PASSWORD [AUTHZID] -> prints OK or FAIL <reply>
USER and PASSWORD are used as given: pass them SASLprep-ed, as RFC 5802 asks of a client."""
import base64
import hashlib
import hmac
import os
import socket
import ssl
import sys


def saslname(name):
    return name.replace("=", "=3D").replace(",", "=2C")


def main():
    host, port, cafile, user, password = sys.argv[1:6]
    authzid = sys.argv[6] if len(sys.argv) > 6 else ""
    ctx = ssl.create_default_context(cafile=cafile)
    sock = ctx.wrap_socket(socket.create_connection((host, int(port)), timeout=20), server_hostname="localhost")
    f = sock.makefile("rwb")

    def line():
        return f.readline().decode().rstrip("\r\n")

    def send(s):
        f.write(s.encode() + b"\r\n")
        f.flush()

    assert line().startswith("+OK")
    nonce = base64.b64encode(os.urandom(18)).decode()
    first_bare = "n=" + saslname(user) + ",r=" + nonce
    gs2_header = "n," + ("a=" + saslname(authzid) if authzid else "") + ","
    send("AUTH SCRAM-SHA-256 " + base64.b64encode((gs2_header + first_bare).encode()).decode())
    challenge = line()
    if not challenge.startswith("+ "):
        print("FAIL " + challenge)
        return
    server_first = base64.b64decode(challenge[2:]).decode()
    attrs = dict(kv.split("=", 1) for kv in server_first.split(","))
    assert attrs["r"].startswith(nonce)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(attrs["s"]), int(attrs["i"]))
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    final_wo_proof = "c=" + base64.b64encode(gs2_header.encode()).decode() + ",r=" + attrs["r"]
    auth_message = ",".join([first_bare, server_first, final_wo_proof]).encode()
    signature = hmac.new(stored_key, auth_message, hashlib.sha256).digest()
    proof = bytes(a ^ b for a, b in zip(client_key, signature))
    send(base64.b64encode((final_wo_proof + ",p=" + base64.b64encode(proof).decode()).encode()).decode())
    reply = line()
    if not reply.startswith("+ "):
        print("FAIL " + reply)
        return
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    expected = "v=" + base64.b64encode(hmac.new(server_key, auth_message, hashlib.sha256).digest()).decode()
    if base64.b64decode(reply[2:]).decode() != expected:
        print("FAIL bad server signature")
        return
    send("")
    reply = line()
    if not reply.startswith("+OK"):
        print("FAIL " + reply)
        return
    send("STAT")
    stat = line()
    send("QUIT")
    line()
    print("OK " + stat)


if __name__ == "__main__":
    main()
