#!/usr/bin/env bash
# Make the shared POP3 benchmark data set (the Dovecot kit in /work/shared/bench, see
# its README) for both servers: 200 users user0..user199@example.com with 20 messages
# of ~10 KB each, plus big@example.com with 5 messages of ~5 MiB, all with password
# "password"; and a self-signed ECDSA P-256 certificate like the kit's.
#
# FROM=dovecot (the default) makes it as a Dovecot installation has it, then imports it:
#   1. MG_DATA/dovecot: the kit's Maildirs (its own generator, scripts/genmail.py, same
#      seeds, so the same octets) owned by uid 5000 as the kit's, and a passwd-file whose
#      hashes `doveadm pw -s ARGON2ID` made (Dovecot's argon2id, m=65536 KiB t=3 p=1);
#   2. a private Dovecot (dovecot-instance.sh: the kit's config template on this data)
#      reads every maildrop once, which writes the dovecot-uidlist files that hold the
#      UIDs its POP3 UIDLs come from (as on any Dovecot that has served the mail);
#   3. `mailgate import dovecot` copies passwords, mail and UIDLs into mailgate's data
#      dir (server stopped: the CLI opens the data dir itself); its report and timing
#      go to OUT/import.txt.  Both servers then serve the same data: run.sh measures
#      mailgate, `SERVER=dovecot run.sh ...` the Dovecot instance on the Maildirs the
#      import read, and `run.sh same` checks that both show every account alike.
# FROM=deliver stores the generated messages with `mailgate deliver`, one call per
# message, and hashes the passwords with mailgate's own argon2id cost (m=19456 KiB,
# t=2, p=1) instead: the data set of the results before 2026-11-30.
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
# KIT (/work/shared/bench), FROM (dovecot), PORT_PLAIN (22110), PORT_TLS (22995),
# NUSERS (200), NMSGS (20), MSGSIZE (10240), BIGMSGS (5), BIGSIZE (5242880),
# PASSWORD (password), IDLE_USERS (1000), BIG_COPIES (16), OUT (results dir of the
# import's report, bench/results/import-<date>).
# Re-runnable: it deletes and rebuilds MG_DATA/{mailgate,certs,maildirs,dovecot}.
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
FROM="${FROM:-dovecot}"
OUT="${OUT:-$REPO/bench/results/import-$(date +%F)}"
case "$FROM" in dovecot|deliver) ;; *) echo "populate: FROM=dovecot|deliver" >&2; exit 2;; esac
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
rm -rf "$DATA" "$MG_DATA/certs" "$MG_DATA/maildirs" "$MG_DATA/dovecot"
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

users=()
for ((i = 0; i < NUSERS; i++)); do users+=("user$i@example.com"); done
users+=("$BIGUSER")
extra=()
for ((i = NUSERS; i < IDLE_USERS; i++)); do extra+=("user$i@example.com"); done
bigs=()
for ((i = 0; i < BIG_COPIES; i++)); do bigs+=("big$i@example.com"); done
elapsed() { python3 -c "import time;print('%.1f'%(time.time()-$1))"; }

if [ "$FROM" = dovecot ]; then
  command -v doveadm >/dev/null || { echo "populate: doveadm missing: apt-get install dovecot-core dovecot-pop3d" >&2; exit 1; }
  DC_DATA="$MG_DATA/dovecot"
  MAIL="$DC_DATA/mail"
  mkdir -p "$DC_DATA/certs" "$MAIL" "$OUT"
  cp "$MG_DATA/certs/server.crt" "$MG_DATA/certs/server.key" "$DC_DATA/certs/"
  # ---- Maildirs: the kit's generator, then empty ones and copies of big@'s
  python3 "$KIT/scripts/genmail.py" "$MAIL" "$NUSERS" "$NMSGS" "$MSGSIZE" "$BIGUSER" "$BIGMSGS" "$BIGSIZE"
  for u in "${extra[@]}"; do mkdir -p "$MAIL/example.com/${u%@*}/Maildir/"{cur,new,tmp}; done
  for u in "${bigs[@]}"; do mkdir -p "$MAIL/example.com/${u%@*}"; cp -a "$MAIL/example.com/${BIGUSER%@*}/Maildir" "$MAIL/example.com/${u%@*}/"; done
  chown -R 5000:5000 "$MAIL"
  # ---- passwd-file as the kit's: user:{ARGON2ID}hash:uid:gid::home::, one hash per user
  t0=$(date +%s.%N)
  printf '%s\n' "${users[@]}" "${extra[@]}" "${bigs[@]}" |
    xargs -P "$(nproc)" -I{} sh -c 'printf "%s:%s:5000:5000::%s::\n" "$1" "$(doveadm pw -s ARGON2ID -p "$2")" "$3/example.com/${1%@*}"' _ {} "$PASSWORD" "$MAIL" \
    > "$DC_DATA/users.passwd.tmp"
  sort -V "$DC_DATA/users.passwd.tmp" > "$DC_DATA/users.passwd"; rm "$DC_DATA/users.passwd.tmp"
  chmod 644 "$DC_DATA/users.passwd"
  echo "populate: $(wc -l < "$DC_DATA/users.passwd") Dovecot accounts ({ARGON2ID}) in $(elapsed "$t0") s"
  # ---- Dovecot reads every maildrop once: dovecot-uidlist files with UIDs and UIDVALIDITY
  . "$HERE/dovecot-instance.sh"
  dc_start
  trap 'dc_stop' EXIT
  t0=$(date +%s.%N)
  doveadm -c "$DC_CONF" mailbox status -A messages INBOX | awk '{sub(/.*messages=/, ""); n += $0} END {print "populate: Dovecot indexed " NR " maildrops, " n " messages"}'
  dc_stop
  trap - EXIT
  echo "populate: indexed in $(elapsed "$t0") s; $(find "$MAIL" -name dovecot-uidlist | wc -l) dovecot-uidlist files"
  # ---- the import (server stopped: the CLI opens the data dir itself)
  t0=$(date +%s.%N)
  set +e
  "${MG[@]}" import dovecot --domain example.com --passwd-file "$DC_DATA/users.passwd" \
    --maildir "maildir:~/Maildir" > "$OUT/import-report.txt" 2> "$OUT/import-progress.txt"
  rc=$?
  set -e
  secs=$(elapsed "$t0")
  tail -1 "$OUT/import-report.txt" | sed 's/^/populate: /'
  { echo "date=$(date -Is) mailgate=$(cd "$REPO" && git rev-parse --short HEAD) exit=$rc wall_s=$secs"
    echo "source: $(du -sb "$MAIL" | cut -f1) bytes in $(find "$MAIL" -path '*/cur/*' -type f | wc -l) files"
    tail -1 "$OUT/import-report.txt"
  } >> "$OUT/import.txt"
  [ "$rc" = 0 ] || { echo "populate: import failed (exit $rc); see $OUT/import-report.txt" >&2; exit 1; }
else
  # ---- domain and accounts (default argon2id cost; the CLI hashes)
  "${MG[@]}" domain add example.com
  t0=$(date +%s.%N)
  for u in "${users[@]}" "${extra[@]}" "${bigs[@]}"; do
    printf '%s\n' "$PASSWORD" | "${MG[@]}" user add "$u" --password-stdin >/dev/null
  done
  echo "populate: $(( ${#users[@]} + ${#extra[@]} + ${#bigs[@]} )) accounts in $(elapsed "$t0") s"
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
  echo "populate: $n messages delivered in $(elapsed "$t0") s"
fi
"${MG[@]}" user list example.com | wc -l | sed 's/^/populate: accounts listed: /'
du -sh "$DATA" | sed 's/^/populate: data dir /'
echo "populate: config $CFG"
