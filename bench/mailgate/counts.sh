#!/usr/bin/env bash
# Fixed-work comparison of mailgate builds: for each binary given (alternate them, e.g.
# OLD NEW OLD NEW), start it on the populate.sh data set, warm the login cache, run
# SESSIONS TLS retrieve-all sessions at c=16 and count the server's context switches and
# CPU time with perf's software events (no hardware counters needed), then stop it by
# its pid. Prints one line per run:
#   bench/mailgate/counts.sh /path/old/mailgate /path/new/mailgate /path/old/mailgate ...
# Environment: MG_DATA (bench/mailgate/data), POP3LOAD, SESSIONS (4000), PASSWORD.
set -uo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
MG_DATA="${MG_DATA:-$HERE/data}"
CFG="$MG_DATA/mailgate.toml"
L="${POP3LOAD:-/work/target-pop3load/release/pop3load}"
SESSIONS="${SESSIONS:-4000}"
PASSWORD="${PASSWORD:-password}"
USERS='user{N}@example.com'
[ -f "$CFG" ] || { echo "counts: $CFG missing: run bench/mailgate/populate.sh first" >&2; exit 1; }
[ -x "$L" ] || { echo "counts: no pop3load at $L" >&2; exit 1; }
command -v perf >/dev/null || { echo "counts: perf is needed (Debian's linux-perf)" >&2; exit 1; }
TLS_ADDR=$(sed -n 's/^tls_listen = "\(.*\)"/\1/p' "$CFG")
log=$(mktemp); stat=$(mktemp)
trap 'rm -f "$log" "$stat"' EXIT
for bin in "$@"; do
  "$bin" --config "$CFG" serve >"$log" 2>&1 &
  pid=$!
  for _ in $(seq 1 60); do grep -q 'listener="\?pop3s' "$log" && break; sleep 0.5; done
  "$L" -t "$TLS_ADDR" -m tls -s login -c 4 -n 200 --max-time 120 -u "$USERS" -r 0-199 \
    -p "$PASSWORD" >/dev/null 2>&1
  perf stat -e context-switches,task-clock -p "$pid" -o "$stat" &
  perf_pid=$!
  line=$("$L" -t "$TLS_ADDR" -m tls -s retr-all -c 16 -n "$SESSIONS" --max-time 300 \
    -u "$USERS" -r 0-199 -p "$PASSWORD" 2>/dev/null | tail -1)
  kill -INT "$perf_pid"; wait "$perf_pid" 2>/dev/null
  kill -TERM "$pid"; wait "$pid"
  python3 - "$bin" "$line" "$stat" <<'PY'
import re, sys
bin, line, stat = sys.argv[1:4]
f = dict(re.findall(r"(\w+)=(\S+)", line))
text = open(stat).read()
cs = float(re.search(r"([\d,.]+)\s+context-switches", text).group(1).replace(",", ""))
ms = float(re.search(r"([\d,.]+)\s+msec task-clock", text).group(1).replace(",", ""))
n = int(f.get("sessions", "0")) or 1
print(f"{bin} sessions={n} errors={f.get('errors')} sessions_per_s={f.get('sessions_per_s')} "
      f"ctxsw_per_session={cs / n:.1f} server_cpu_ms_per_session={ms / n:.3f}")
PY
done
