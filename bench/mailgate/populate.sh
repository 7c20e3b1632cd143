#!/usr/bin/env bash
# Make mailgate's copy of the shared POP3 benchmark data set (the Dovecot kit in
# /work/shared/bench, see its README): 200 users user0..user199@example.com with
# 20 messages of ~10 KB each, plus big@example.com with 5 messages of ~5 MiB, all
# with password "password"; and a self-signed ECDSA P-256 certificate like the kit's.
#
# The messages come from the kit's own generator (scripts/genmail.py, same seeds, so
# the same octets) and are stored with `mailgate deliver`, one call per message, while
# the server is stopped (the CLI then opens the data dir itself).  Passwords get
# mailgate's default argon2id cost (m=19456 KiB, t=2, p=1), not Dovecot's
# (m=65536 KiB, t=3, p=1): mailgate hashes its own passwords and has no passwd-file
# import.
#
#   bench/mailgate/populate.sh                 # -> bench/mailgate/data (git-ignored)
#   MG_DATA=/tmp/mg ./populate.sh              # elsewhere
#
# The idle-memory run holds 1000 sessions at once, and mailgate locks a maildrop from
# PASS to the end of the session (RFC 1939; Dovecot's default pop3_lock_session=no
# does not), so it needs 1000 distinct accounts: user200..user999 are added too,
# with empty maildrops (IDLE_USERS=1000); the load runs use only user0..user199.
#
# Likewise the 5 MiB runs at concurrency 4 need distinct mailboxes (Dovecot's ran 4
# sessions on big@example.com at once): big0..big15@example.com get copies of
# big@example.com's 5 messages (BIG_COPIES=16; 16 rather than 4 so that, with
# pop3load's round-robin user choice, a slow session never overlaps the next one
# of the same mailbox).
#
# Environment: MG_DATA (data root), MAILGATE (binary; default
# $CARGO_TARGET_DIR or /work/target-release, then ./target, release build),
# KIT (/work/shared/bench), PORT_PLAIN (22110), PORT_TLS (22995), NUSERS (200),
# NMSGS (20), MSGSIZE (10240), BIGMSGS (5), BIGSIZE (5242880), PASSWORD (password),
# IDLE_USERS (1000), BIG_COPIES (16).
# Re-runnable: it deletes and rebuilds MG_DATA/{mailgate,certs,maildirs}.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
KIT="${KIT:-/work/shared/bench}"
MG_DATA="${MG_DATA:-$HERE/data}"
PASSWORD="${PASSWORD:-password}"
NUSERS="${NUSERS:-200}"
NMSGS="${NMSGS:-20}"
IDLE_USERS="${IDLE_USERS:-1000}"
BIG_COPIES="${BIG_COPIES:-16}"
MSGSIZE="${MSGSIZE:-10240}"
BIGUSER="big@example.com"
BIGMSGS="${BIGMSGS:-5}"
BIGSIZE="${BIGSIZE:-5242880}"
PORT_PLAIN="${PORT_PLAIN:-22110}"
PORT_TLS="${PORT_TLS:-22995}"
if [ -z "${MAILGATE:-}" ]; then
  for c in "${CARGO_TARGET_DIR:-/work/target-release}/release/mailgate" "$REPO/target/release/mailgate"; do
    [ -x "$c" ] && { MAILGATE="$c"; break; }
  done
fi
[ -x "${MAILGATE:-}" ] || { echo "populate: no mailgate binary; build with: CARGO_TARGET_DIR=/work/target-release cargo build --release" >&2; exit 1; }
[ -f "$KIT/scripts/genmail.py" ] || { echo "populate: $KIT/scripts/genmail.py missing (set KIT)" >&2; exit 1; }
command -v openssl >/dev/null || { echo "populate: openssl missing" >&2; exit 1; }

DATA="$MG_DATA/mailgate"          # mailgate's data_dir
CFG="$MG_DATA/mailgate.toml"
# Refuse to rebuild a data dir a running server holds (its admin socket answers).
if [ -S "$DATA/admin.sock" ] && [ -f "$MG_DATA/server.pid" ] && kill -0 "$(cat "$MG_DATA/server.pid")" 2>/dev/null; then
  echo "populate: a mailgate server (pid $(cat "$MG_DATA/server.pid")) is using $DATA; stop it first" >&2; exit 1
fi
mkdir -p "$MG_DATA"
rm -rf "$DATA" "$MG_DATA/certs" "$MG_DATA/maildirs"
mkdir -p "$DATA" "$MG_DATA/certs" "$MG_DATA/maildirs"
chmod 700 "$DATA"

# ---- certificate: ECDSA P-256, self-signed, CN=localhost (as the kit's populate.sh)
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
  -keyout "$MG_DATA/certs/server.key" -out "$MG_DATA/certs/server.crt" -days 3650 \
  -subj "/CN=localhost" -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" 2>/dev/null
chmod 600 "$MG_DATA/certs/server.key"

# ---- configuration shared by populate.sh and run.sh.  All load comes from
# 127.0.0.1, so the per-IP caps are raised; plaintext auth is allowed so the
# `plain` mode of pop3load (USER/PASS in clear) can run, as Dovecot's
# disable_plaintext_auth = no does in the kit.
cat > "$CFG" <<TOML
# written by bench/mailgate/populate.sh
data_dir = "$DATA"
hostname = "localhost"

[pop3]
listen = "127.0.0.1:$PORT_PLAIN"
tls_listen = "127.0.0.1:$PORT_TLS"
allow_plaintext_auth = true

[tls]
cert = "$MG_DATA/certs/server.crt"
key = "$MG_DATA/certs/server.key"

[limits]
max_connections = 10000
max_connections_per_ip = 5000
max_auth_failures_per_ip = 1000
TOML
MG=("$MAILGATE" --config "$CFG")

# ---- domain and accounts (default argon2id cost; the CLI hashes)
"${MG[@]}" domain add example.com
t0=$(date +%s.%N)
users=()
for ((i = 0; i < NUSERS; i++)); do users+=("user$i@example.com"); done
users+=("$BIGUSER")
extra=()
for ((i = NUSERS; i < IDLE_USERS; i++)); do extra+=("user$i@example.com"); done
bigs=()
for ((i = 0; i < BIG_COPIES; i++)); do bigs+=("big$i@example.com"); done
for u in "${users[@]}" "${extra[@]}" "${bigs[@]}"; do
  printf '%s\n' "$PASSWORD" | "${MG[@]}" user add "$u" --password-stdin >/dev/null
done
echo "populate: $(( ${#users[@]} + ${#extra[@]} + ${#bigs[@]} )) accounts in $(python3 -c "import time;print('%.1f'%(time.time()-$t0))") s"

# ---- messages: the kit's generator (deterministic), then one `deliver` per file.
# One domain is one sled store, which only one process may open at a time, so the
# deliveries run one after another (in delivery order per user, oldest first).
python3 "$KIT/scripts/genmail.py" "$MG_DATA/maildirs" "$NUSERS" "$NMSGS" "$MSGSIZE" "$BIGUSER" "$BIGMSGS" "$BIGSIZE"
t0=$(date +%s.%N)
n=0
for u in "${users[@]}" "${bigs[@]}"; do
  local_part="${u%@*}"
  case "$u" in big[0-9]*) local_part="${BIGUSER%@*}";; esac   # copies of big@'s messages
  while IFS= read -r f; do
    "${MG[@]}" deliver "$u" < "$f" >/dev/null
    n=$((n + 1))
  done < <(ls "$MG_DATA/maildirs/example.com/$local_part/Maildir/cur/" | sort -t. -k1,1n | sed "s|^|$MG_DATA/maildirs/example.com/$local_part/Maildir/cur/|")
done
echo "populate: $n messages delivered in $(python3 -c "import time;print('%.1f'%(time.time()-$t0))") s"
"${MG[@]}" user list example.com | wc -l | sed 's/^/populate: accounts listed: /'
du -sh "$DATA" | sed 's/^/populate: data dir /'
echo "populate: config $CFG"
