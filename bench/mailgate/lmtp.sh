#!/usr/bin/env bash
# LMTP delivery throughput: Postfix's smtp-source (package postfix) plays the MTA and
# delivers over LMTP into a fresh mailgate data dir; every message is committed and
# flushed before its 250, so this measures durable deliveries per second.
#
#   bench/mailgate/lmtp.sh                     # prints one line per (size, sessions)
#
# Environment: MAILGATE (release binary; default /work/target-release/release/mailgate,
# then ./target/release/mailgate), MSGS (messages per run, 5000), SIZES ("10240 102400"),
# SESSIONS ("1 16"), PORT (22024). One recipient per message (smtp-source makes the
# names of further recipients up, and they would be unknown users).
# Bounded: each run sends MSGS messages and stops; the server is stopped at the end.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
MAILGATE="${MAILGATE:-/work/target-release/release/mailgate}"
[ -x "$MAILGATE" ] || MAILGATE="$REPO/target/release/mailgate"
MSGS="${MSGS:-5000}"
SIZES="${SIZES:-10240 102400}"
SESSIONS="${SESSIONS:-1 16}"
PORT="${PORT:-22024}"
command -v smtp-source >/dev/null || { echo "smtp-source (package postfix) is required" >&2; exit 1; }

work="$(mktemp -d)"
pid=""
cleanup() {
    if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT
cat >"$work/mailgate.toml" <<TOML
data_dir = "$work/data"
hostname = "bench.test"
[pop3]
listen = ""
tls_listen = ""
[lmtp]
listen = "127.0.0.1:$PORT"
[metrics]
listen = ""
TOML
mg() { "$MAILGATE" --config "$work/mailgate.toml" "$@"; }
mg domain add example.com >/dev/null
printf 'password\n' | mg user add user0@example.com --password-stdin >/dev/null
MAILGATE_LOG=warn "$MAILGATE" --config "$work/mailgate.toml" serve &
pid=$!
server_rss() { awk '/VmRSS/ {print $2}' "/proc/$pid/status"; }
# shellcheck source=bench/mailgate/lmtp-runs.sh
. "$HERE/lmtp-runs.sh"
echo "mailgate $("$MAILGATE" --version 2>/dev/null || true), $MSGS messages per run, $(nproc) cores"
lmtp_runs server
stored=$(du -sk "$work/data/domains" | cut -f1)
echo "stored: ${stored} KiB on disk"
