#!/usr/bin/env bash
# POP3 through a cluster of two replicas: direct to the domain's home replica beside
# forwarded by the other replica over the replica link, on the populate.sh data set with
# pop3load (the shared kit's load generator), old-new alternating as run.sh's A/B runs.
#
#   bench/mailgate/cluster.sh setup          # data set (populate.sh) for replica 0, link CA
#                                            # and certificate, secret, configs (~3 min)
#   bench/mailgate/cluster.sh ab [ROUNDS [FIRST]]  # ROUNDS (5) alternating rounds (numbered from
#                                            # FIRST, 1) of TLS login and TLS retrieve-all, c=16,
#                                            # direct and forwarded
#   bench/mailgate/cluster.sh one TARGET MODE SCENARIO CONC [DUR]   # TARGET direct|forwarded
#   bench/mailgate/cluster.sh perf TARGET MODE SCENARIO CONC [DUR]  # perf record of both replicas
#                                            # (PERF_CG=dwarf for call graphs, PERF_FREQ=499)
#   bench/mailgate/cluster.sh counts [N]     # fixed work (SESSIONS TLS retrieve-alls), perf stat
#                                            # per replica, direct/forwarded alternating, N rounds
#                                            # (COUNTS_EVENTS=more events, e.g. syscall tracepoints)
#   bench/mailgate/cluster.sh single [ROUNDS [FIRST]]  # the same TLS runs on replica 0's data dir
#                                            # served by one server without a cluster (target single)
#   bench/mailgate/cluster.sh perf-summary   # every profile in RAW: CPU per session by kind and phase
#   bench/mailgate/cluster.sh status         # start the cluster, print `cluster status`, stop
#   bench/mailgate/cluster.sh move [ROUNDS]  # ROUNDS (3) rounds of `mailgate domain move` of
#                                            # example.com mailgate-0 -> mailgate-1 and back, idle,
#                                            # then both again under TLS logins through the
#                                            # target (c=MOVE_CONC); the home checked after each
#
# The cluster: one redis-server (no persistence) and two `mailgate serve` replicas,
# mailgate-0 and mailgate-1, each with its own data dir, `[locks] backend = "redis"` and a
# `[cluster]` section; the replica link is mutual TLS with a private CA (one EC P-256 leaf
# naming both replicas, serverAuth + clientAuth) and a 48-byte secret file.  example.com
# lives on mailgate-0: populate.sh stores the data set into replica 0's data dir while
# nothing runs, and when the replicas start mailgate-0 announces its copy, which creates
# the home record (a `[cluster.pins]` entry names mailgate-0 too).  `ab` checks with
# `mailgate cluster status` that the record says home mailgate-0 before measuring.
# "direct" sends pop3load to mailgate-0's POP3S port, "forwarded" to mailgate-1's: that
# replica does the client's TLS handshake, reads the login name and relays the session to
# mailgate-0 over the link.  Each run also reads mailgate-1's
# mailgate_cluster_forwards_total, so a line shows how many sessions were forwarded.
#
# Everything listens on 127.0.0.1 only (ports below); every process this script starts is
# stopped by its saved pid (SIGTERM, then SIGKILL of that pid after 20 s), never by name.
# Noise rules as run.sh: before each run wait (up to QUIET_WAIT=180 s) for the host to be
# <= QUIET_PCT=15 % busy; a run with more than FOREIGN_MAX=5 % foreign CPU (host CPU used
# by neither the replicas, Redis nor pop3load) is logged as DISCARDED and repeated up to
# RETRIES=2 times.  Every pop3load run is bounded by -d/-n and --max-time.
#
# Output: OUT, bench/results/cluster-<date>/: result lines (pop3load's key=value line plus
# target, round, r0/r1/redis CPU and their sum per session, foreign CPU, pre-run busy,
# load average, sessions forwarded) in <target>-<mode>-<scenario>[-c<conc> unless 16].txt, summaries of the
# replica logs, the cluster status and host.txt; `move` writes a line per move to move.txt
# (the CLI's pre-copy and final-delta progress and its final line: MB, MB/s, freeze ms,
# messages; the home after it; for the runs under load pop3load's sessions, errors and
# latencies); RAW, bench/out/cluster-<date>/ (git-ignored): pop3load logs and discarded
# runs, replica and Redis logs, perf data, each move's stdout and stderr.
#
# A move runs through the admin socket of the domain's home; `cluster status --json` on
# the other replica must then show the target as home, active (polled up to 15 s).  Under
# load, pop3load (TLS login, c=MOVE_CONC) targets the replica the domain moves to, so its
# sessions are forwarded to the old home until the freeze, wait during it and are served
# locally after the switch; it starts MOVE_LEAD s before the move and runs for
# MOVE_LOAD_DUR s (default: three times the round's slowest idle move + 20 s), so it
# covers the whole move (each line says whether it did: load_covers_move); bounded by
# --max-time.  The r0/r1/redis CPU of a line spans the move and, under load, the whole
# pop3load run.  Each CLI call is bounded by
# MOVE_MAX s (600).  The copies that moves leave behind (`.moved-*`) are deleted with
# `cluster cleanup --older-than 0s` after the last round.
#
# Environment: CL_DATA (bench/mailgate/data/cluster), MAILGATE (release binary) and
# MG_COMMIT (what it was built from, for host.txt; not MAILGATE_*: those reach the
# server's configuration), POP3LOAD,
# OUT, RAW, DUR (20), MG_NICE / LOAD_NICE (-10), MG_LOG (info), SESSIONS (counts: 4000),
# MOVE_CONC (16), MOVE_LEAD (3), MOVE_LOAD_DUR, MOVE_MAX (600),
# PORT_BASE (23000: Redis PORT_BASE+379; replica i POP3 PORT_BASE+1000*i+110, POP3S +995,
# link +25, metrics +898).
set -uo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
. "$HERE/quiet.sh"
REPO="$(cd "$HERE/../.." && pwd)"
KIT="${KIT:-/work/shared/bench}"
CL_DATA="${CL_DATA:-$HERE/data/cluster}"
PT="$KIT/scripts/proctree.py"
L="${POP3LOAD:-/work/target-pop3load/release/pop3load}"
OUT="${OUT:-$REPO/bench/results/cluster-$(date +%F)}"
RAW="${RAW:-$REPO/bench/out/cluster-$(date +%F)}"
DUR="${DUR:-20}"
MG_NICE="${MG_NICE:--10}"
LOAD_NICE="${LOAD_NICE:--10}"
PASSWORD="${PASSWORD:-password}"
USERS='user{N}@example.com'
RANGE=0-199
DOMAIN=example.com
BASE="${PORT_BASE:-23000}"
REDIS_PORT=$((BASE + 379))
NAMES=(mailgate-0 mailgate-1)
pop3_port()  { echo $((BASE + 1000 * $1 + 110)); }
pop3s_port() { echo $((BASE + 1000 * $1 + 995)); }
link_port()  { echo $((BASE + 1000 * $1 + 25)); }
metrics_port() { echo $((BASE + 1000 * $1 + 898)); }
cfg() { echo "$CL_DATA/r$1.toml"; }
if [ -z "${MAILGATE:-}" ]; then
  for c in "${CARGO_TARGET_DIR:-/work/target-release}/release/mailgate" "$REPO/target/release/mailgate"; do
    [ -x "$c" ] && { MAILGATE="$c"; break; }
  done
fi
[ -x "${MAILGATE:-}" ] || { echo "cluster: no release mailgate binary (set MAILGATE)" >&2; exit 1; }
[ -x "$L" ] || { echo "cluster: no pop3load at $L (see docs/BENCHMARKS.md to build it)" >&2; exit 1; }
mkdir -p "$OUT" "$RAW"
hard=$(ulimit -Hn); ulimit -n "$hard" 2>/dev/null || true

port_taken() {  # PORT on 127.0.0.1 -> 0 when something accepts connections there
  python3 - "$1" <<'PY'
import socket, sys
s = socket.socket(); s.settimeout(1)
sys.exit(0 if s.connect_ex(("127.0.0.1", int(sys.argv[1]))) == 0 else 1)
PY
}

# ---------------------------------------------------------------- setup
setup() {
  command -v openssl >/dev/null || { echo "cluster: openssl missing" >&2; exit 1; }
  if [ -f "$CL_DATA/pids" ]; then
    while read -r _ pid; do
      if kill -0 "$pid" 2>/dev/null; then echo "cluster: pid $pid of an earlier run still lives; stop it first" >&2; exit 1; fi
    done < "$CL_DATA/pids"
  fi
  mkdir -p "$CL_DATA"
  # Replica 0's data set: populate.sh's (same accounts, messages and client certificate as
  # the single-server runs), stored while no server runs; its mailgate.toml is not used.
  MG_DATA="$CL_DATA/r0" MAILGATE="$MAILGATE" PORT_PLAIN="$(pop3_port 0)" PORT_TLS="$(pop3s_port 0)" \
    "$HERE/populate.sh" || exit 1
  rm -rf "$CL_DATA/r1" "$CL_DATA/link"
  mkdir -p "$CL_DATA/r1/mailgate" "$CL_DATA/link"
  chmod 700 "$CL_DATA/r1/mailgate"
  # The replica link: a private CA and one leaf naming both replicas, for server and
  # client auth (what the chart's README makes with openssl too).
  local d="$CL_DATA/link"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
    -subj "/CN=mailgate bench cluster CA" -keyout "$d/ca.key" -out "$d/ca.crt" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=mailgate" \
    -keyout "$d/tls.key" -out "$d/tls.csr" 2>/dev/null
  openssl x509 -req -in "$d/tls.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" -CAcreateserial -days 825 \
    -out "$d/tls.crt" -extfile <(printf 'subjectAltName=DNS:mailgate-0,DNS:mailgate-1\nextendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n') 2>/dev/null
  head -c 48 /dev/urandom > "$d/secret"
  chmod 600 "$d"/*.key "$d/secret"
  local i
  for i in 0 1; do
    cat > "$(cfg $i)" <<TOML
# written by bench/mailgate/cluster.sh setup: replica ${NAMES[$i]}
data_dir = "$CL_DATA/r$i/mailgate"
hostname = "localhost"

[pop3]
listen = "127.0.0.1:$(pop3_port $i)"
tls_listen = "127.0.0.1:$(pop3s_port $i)"
allow_plaintext_auth = true

[lmtp]
listen = ""

[metrics]
listen = "127.0.0.1:$(metrics_port $i)"

[tls]
cert = "$CL_DATA/r0/certs/server.crt"
key = "$CL_DATA/r0/certs/server.key"

[limits]
max_connections = 10000
max_connections_per_ip = 5000
max_auth_failures_per_ip = 1000

[locks]
backend = "redis"
redis_url = "redis://127.0.0.1:$REDIS_PORT/0"

[cluster]
name = "${NAMES[$i]}"
listen = "127.0.0.1:$(link_port $i)"
cert = "$d/tls.crt"
key = "$d/tls.key"
ca = "$d/ca.crt"
secret_file = "$d/secret"

[cluster.peers]
"mailgate-0" = "127.0.0.1:$(link_port 0)"
"mailgate-1" = "127.0.0.1:$(link_port 1)"

[cluster.pins]
"$DOMAIN" = "mailgate-0"
TOML
  done
  echo "cluster: configs $(cfg 0) $(cfg 1) (\`$0 status\` starts the cluster and checks them)"
}

# The same data dir as mailgate-0, served by one server without a cluster (local locks):
# the single-server figure of the same sitting.
write_single_cfg() {
  sed -e '/^\[locks\]/,$d' -e 's/^# written by .*/# written by bench\/mailgate\/cluster.sh: replica 0'"'"'s data dir, no cluster/' \
    "$(cfg 0)" > "$CL_DATA/single.toml"
}

# ---------------------------------------------------------------- the cluster's processes
REDIS_PID=""
R_PID=("" "")
LABEL=""
R0_CFG=""
save_pids() { printf 'redis %s\nr0 %s\nr1 %s\n' "${REDIS_PID:-0}" "${R_PID[0]:-0}" "${R_PID[1]:-0}" > "$CL_DATA/pids"; }

start_cluster() {  # LABEL
  LABEL=$1
  [ -f "$(cfg 0)" ] && [ -f "$(cfg 1)" ] || { echo "cluster: run '$0 setup' first" >&2; exit 1; }
  local p i
  for p in "$REDIS_PORT" "$(pop3_port 0)" "$(pop3s_port 0)" "$(link_port 0)" "$(metrics_port 0)" \
           "$(pop3_port 1)" "$(pop3s_port 1)" "$(link_port 1)" "$(metrics_port 1)"; do
    if port_taken "$p"; then echo "cluster: 127.0.0.1:$p is already taken; refusing to start" >&2; exit 1; fi
  done
  local log="$RAW/redis-$LABEL.log"
  nice -n "$MG_NICE" redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no \
    --dir "$RAW" --dbfilename "cluster-bench-unused.rdb" >> "$log" 2>&1 &
  REDIS_PID=$!; save_pids
  for _ in $(seq 1 100); do redis-cli -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG && break; sleep 0.1; done
  redis-cli -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG || { echo "cluster: redis did not answer; see $log" >&2; exit 1; }
  for i in 0 1; do  # the link certificates and the secret load (needs Redis up)
    "$MAILGATE" --config "$(cfg $i)" check-config > "$RAW/check-config-r$i.txt" 2>&1 \
      || { echo "cluster: check-config r$i failed:" >&2; cat "$RAW/check-config-r$i.txt" >&2; exit 1; }
  done
  R0_CFG="$(cfg 0)"
  for i in 0 1; do
    log="$RAW/r$i-$LABEL.log"
    echo "=== $(date -Is) start: nice $MG_NICE $MAILGATE serve --config $(cfg $i)" >> "$log"
    env MAILGATE_LOG="${MG_LOG:-info}" NO_COLOR=1 nice -n "$MG_NICE" "$MAILGATE" serve --config "$(cfg $i)" >> "$log" 2>&1 &
    R_PID[$i]=$!; save_pids
  done
  for i in 0 1; do
    local up=0
    for _ in $(seq 1 150); do
      kill -0 "${R_PID[$i]}" 2>/dev/null || { echo "cluster: r$i exited at start; see $RAW/r$i-$LABEL.log" >&2; tail -5 "$RAW/r$i-$LABEL.log" >&2; exit 1; }
      if grep -q 'listening.*pop3s\|pop3s.*listening' "$RAW/r$i-$LABEL.log" && port_taken "$(pop3s_port $i)" && port_taken "$(link_port $i)"; then up=1; break; fi
      sleep 0.1
    done
    [ "$up" = 1 ] || { echo "cluster: r$i did not listen within 15 s" >&2; exit 1; }
  done
  echo "cluster: redis pid $REDIS_PID, mailgate-0 pid ${R_PID[0]}, mailgate-1 pid ${R_PID[1]}" >&2
  wait_home
}

start_single() {  # LABEL: mailgate-0's data dir on its ports, without Redis and the cluster
  LABEL=$1
  write_single_cfg
  R0_CFG="$CL_DATA/single.toml"
  local p
  for p in "$(pop3_port 0)" "$(pop3s_port 0)" "$(metrics_port 0)"; do
    if port_taken "$p"; then echo "cluster: 127.0.0.1:$p is already taken; refusing to start" >&2; exit 1; fi
  done
  local log="$RAW/r0-$LABEL.log"
  echo "=== $(date -Is) start: nice $MG_NICE $MAILGATE serve --config $R0_CFG" >> "$log"
  env MAILGATE_LOG="${MG_LOG:-info}" NO_COLOR=1 nice -n "$MG_NICE" "$MAILGATE" serve --config "$R0_CFG" >> "$log" 2>&1 &
  R_PID[0]=$!; save_pids
  for _ in $(seq 1 150); do
    kill -0 "${R_PID[0]}" 2>/dev/null || { echo "cluster: the single server exited at start; see $log" >&2; exit 1; }
    if port_taken "$(pop3s_port 0)" && port_taken "$(pop3_port 0)"; then
      echo "cluster: single server (no cluster) pid ${R_PID[0]}" >&2; return 0
    fi
    sleep 0.1
  done
  echo "cluster: the single server did not listen within 15 s" >&2; exit 1
}

# Until both replicas answer over the link and the record of example.com names mailgate-0
# (active; HOME_ANY=1: either replica, for `move` after an interrupted run); the status
# goes to OUT.
wait_home() {
  local s ok=0
  for _ in $(seq 1 60); do
    s=$("$MAILGATE" --config "$(cfg 1)" cluster status --json 2>&1)
    if python3 - "$s" "$DOMAIN" "${HOME_ANY:-0}" <<'PY'
import json, sys
try:
    doc = json.loads(sys.argv[1].strip().splitlines()[-1])
except Exception:
    sys.exit(1)
reach = all(r.get("reachable") for r in doc["replicas"])
home = [d for d in doc["domains"] if d["name"] == sys.argv[2]]
sys.exit(0 if reach and home and home[0]["home"] in (("mailgate-0", "mailgate-1") if sys.argv[3] == "1" else ("mailgate-0",))
         and home[0]["state"] == "active" else 1)
PY
    then ok=1; break; fi
    sleep 0.5
  done
  { echo "# $(date -Is) $LABEL: mailgate --config r1.toml cluster status"; "$MAILGATE" --config "$(cfg 1)" cluster status; echo; } >> "$OUT/cluster-status.txt" 2>&1
  [ "$ok" = 1 ] || { echo "cluster: $DOMAIN is not homed on mailgate-0 with both replicas up:" >&2; echo "$s" >&2; exit 1; }
}

stop_one() {  # PID CMDLINE-FRAGMENT
  local pid=$1 frag=$2
  [ -n "$pid" ] && [ "$pid" != 0 ] || return 0
  if ! tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$frag"; then
    return 0   # gone, or no longer ours: never signal it
  fi
  kill -TERM "$pid"
  for _ in $(seq 1 200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then echo "cluster: pid $pid ignored SIGTERM for 20 s; SIGKILL" >&2; kill -KILL "$pid"; fi
  wait "$pid" 2>/dev/null
}

stop_cluster() {
  [ -n "$LABEL" ] || return 0
  stop_one "${R_PID[1]}" "--config $(cfg 1)"; R_PID[1]=""
  stop_one "${R_PID[0]}" "--config $R0_CFG"; R_PID[0]=""
  stop_one "$REDIS_PID" "127.0.0.1:$REDIS_PORT"; REDIS_PID=""
  rm -f "$CL_DATA/pids"
  local i
  for i in 0 1; do
    [ -f "$RAW/r$i-$LABEL.log" ] && summarize_log "$RAW/r$i-$LABEL.log" > "$OUT/server-r$i-$LABEL.summary.txt"
  done
  LABEL=""
}
trap 'stop_cluster' EXIT
trap 'exit 130' INT TERM

# Session outcomes and every WARN/ERROR kind of a replica log (a line per session, in RAW).
summarize_log() {
  [ -f "$1" ] || return 0
  python3 - "$1" <<'PY'
import collections, re, sys
outcomes, levels, first, fwd = collections.Counter(), collections.Counter(), {}, 0
for line in open(sys.argv[1], errors="replace"):
    m = re.search(r'session end outcome="?(\w+)', line)
    if m:
        outcomes[m.group(1)] += 1
    if "session forwarded to the domain's home" in line:
        fwd += 1
    m = re.search(r'\b(WARN|ERROR)\b.*?: (.*)$', line)
    if m:
        kind = re.sub(r'\d+', 'N', m.group(2))[:120]
        levels[(m.group(1), kind)] += 1
        first.setdefault((m.group(1), kind), line.strip())
print("sessions by outcome:", dict(outcomes), "forwarded log lines:", fwd)
for (lvl, kind), n in levels.most_common():
    print("%s x%d: %s" % (lvl, n, first[(lvl, kind)]))
print("starts/stops:", [l.strip() for l in open(sys.argv[1], errors="replace") if l.startswith("===") or " stopped" in l or "listening" in l])
PY
}

# ---------------------------------------------------------------- measuring
cpu_of() { if [ -n "$1" ]; then python3 "$PT" cpu "$1" | cut -d= -f2; else echo 0; fi; }
forwards_ok() {  # mailgate-1's count of POP3 sessions forwarded to mailgate-0 with result ok
  [ -n "${R_PID[1]}" ] || { echo 0; return; }
  python3 - "$(metrics_port 1)" <<'PY'
import sys, urllib.request
text = urllib.request.urlopen("http://127.0.0.1:%s/metrics" % sys.argv[1], timeout=5).read().decode()
n = 0.0
for line in text.splitlines():
    if line.startswith("mailgate_cluster_forwards_total{") and 'protocol="pop3"' in line and 'result="ok"' in line:
        n += float(line.rsplit(" ", 1)[1])
print("%d" % n)
PY
}

# one TARGET MODE SCENARIO CONC DUR [ROUND]: a run, repeated while the host was noisy.
one() {
  local target=$1 mode=$2 scen=$3 label="$1-$2-$3" attempt line fpct
  [ "$4" = 16 ] || label="$label-c$4"
  for attempt in $(seq 1 $(( ${RETRIES:-2} + 1 ))); do
    line="$(one_attempt "$@") attempt=$attempt"
    fpct=$(sed -n 's/.* foreign_cpu_pct=\([0-9.]*\).*/\1/p' <<<"$line")
    if python3 -c "import sys; sys.exit(0 if float('${fpct:-0}') <= float('${FOREIGN_MAX:-5}') else 1)"; then break; fi
    [ "$attempt" -le "${RETRIES:-2}" ] && echo "DISCARDED (noisy): $line" | tee -a "$RAW/$label.log" >&2
  done
  echo "$line" | tee -a "$OUT/$label.txt"
}

one_attempt() {
  local target=$1 mode=$2 scen=$3 conc=$4 dur=$5 round=${6:-0}
  local label="$target-$mode-$scen" pre waited=0 load line port
  [ "$conc" = 16 ] || label="$label-c$conc"
  local r=0; [ "$target" = forwarded ] && r=1
  if [ "$mode" = tls ]; then port=$(pop3s_port $r); else port=$(pop3_port $r); fi
  wait_quiet; pre=$QUIET_PRE waited=$QUIET_WAITED
  load=$(cut -d' ' -f1 /proc/loadavg)
  local a0 b0 c0 f0 a1 b1 c1 f1
  a0=$(cpu_of "${R_PID[0]}"); b0=$(cpu_of "${R_PID[1]}"); c0=$(cpu_of "$REDIS_PID"); f0=$(forwards_ok)
  line=$(nice -n "$LOAD_NICE" "$L" -t "127.0.0.1:$port" -m "$mode" -s "$scen" -c "$conc" -d "$dur" --max-time $((dur * 3 + 60)) \
         -u "$USERS" -r "$RANGE" -p "$PASSWORD" --label "$label" 2>>"$RAW/$label.log" | tail -1)
  sleep 0.5   # the relays of the last sessions end (and are counted) just after their QUIT reply
  a1=$(cpu_of "${R_PID[0]}"); b1=$(cpu_of "${R_PID[1]}"); c1=$(cpu_of "$REDIS_PID"); f1=$(forwards_ok)
  [ -n "$line" ] || line="label=$label mode=$mode scenario=$scen conc=$conc sessions=0 errors=pop3load-failed"
  echo "$line $(python3 - "$line" "$a0" "$a1" "$b0" "$b1" "$c0" "$c1" <<'PY'
import os, sys
kv = dict(t.split("=", 1) for t in sys.argv[1].split() if "=" in t)
a0, a1, b0, b1, c0, c1 = map(float, sys.argv[2:8])
r0, r1, rd = a1 - a0, b1 - b0, c1 - c0
srv = r0 + r1 + rd
sess = max(1, int(kv.get("sessions", "0")))
el, busy, cli = float(kv.get("elapsed_s", 0)), float(kv.get("host_cpu_busy_pct", 0)), float(kv.get("client_cpu_s", 0))
n = os.cpu_count()
foreign = busy / 100 * el * n - srv - cli
ms = lambda s: s * 1000 / sess
print("r0_cpu_s=%.2f r1_cpu_s=%.2f redis_cpu_s=%.2f r0_cpu_ms_per_session=%.3f r1_cpu_ms_per_session=%.3f "
      "redis_cpu_ms_per_session=%.3f server_cpu_s=%.2f server_cpu_ms_per_session=%.3f foreign_cpu_pct=%.1f"
      % (r0, r1, rd, ms(r0), ms(r1), ms(rd), srv, ms(srv), max(0.0, 100 * foreign / max(1e-9, el * n))))
PY
) forwarded_sessions=$((f1 - f0)) target=$target round=$round pre_run_host_busy_pct=$pre quiet_wait_s=$waited loadavg1=$load server=mailgate-cluster"
}

warm() {  # one retr-all pass over every mailbox through each replica (store pages, login cache, link tickets)
  "$L" -t "127.0.0.1:$(pop3_port 0)" -s retr-all -c 4 -n 200 -u "$USERS" -r "$RANGE" -p "$PASSWORD" --label warm-direct --max-time 300 2>&1 | tail -1
  [ -n "${R_PID[1]}" ] || return 0
  "$L" -t "127.0.0.1:$(pop3s_port 1)" -m tls -s retr-all -c 4 -n 200 -u "$USERS" -r "$RANGE" -p "$PASSWORD" --label warm-forwarded --max-time 300 2>&1 | tail -1
}

ab() {  # ROUNDS: rounds of {tls login, tls retr-all} x {direct, forwarded}; the order of the
        # two targets flips every round (A B, B A, ...), so a drift of the host hits both.
  local rounds=${1:-5} first=${2:-1} r scen order t
  for r in $(seq "$first" $((first + rounds - 1))); do
    if [ $((r % 2)) = 1 ]; then order="direct forwarded"; else order="forwarded direct"; fi
    for scen in login retr-all; do
      for t in $order; do one "$t" tls "$scen" 16 "$DUR" "$r"; done
    done
  done
}

perf_profile() {  # TARGET MODE SCENARIO CONC DUR: perf record (cpu-clock, software) of both
                  # replicas over one load run; everything in RAW (perf slows the servers)
  local target=$1 mode=$2 scen=$3 conc=$4 dur=$5 lpid port i
  command -v perf >/dev/null || { echo "cluster: perf not installed" >&2; return 1; }
  if [ "$mode" = tls ]; then port=$( [ "$target" = direct ] && pop3s_port 0 || pop3s_port 1 )
  else port=$( [ "$target" = direct ] && pop3_port 0 || pop3_port 1 ); fi
  local cg="${PERF_CG:-}"; local tag="perf-$target-$mode-$scen${cg:+-${cg%%,*}}"
  nice -n "$LOAD_NICE" "$L" -t "127.0.0.1:$port" -m "$mode" -s "$scen" -c "$conc" -d "$dur" --max-time $((dur * 3 + 60)) \
       -u "$USERS" -r "$RANGE" -p "$PASSWORD" --label "$tag" 2>>"$RAW/$tag.log" >> "$RAW/$tag.txt" &
  lpid=$!
  sleep 1
  local ppids=()
  for i in 0 1; do
    # PERF_CG=dwarf: call graphs through tokio and rustls (frame pointers are absent there)
    perf record -e cpu-clock -F "${PERF_FREQ:-499}" --call-graph "${PERF_CG:-fp}" -p "${R_PID[$i]}" -o "$RAW/$tag-r$i.data" -- sleep $((dur - 2)) 2>>"$RAW/$tag.log" &
    ppids+=($!)
  done
  wait "$lpid" "${ppids[@]}"   # only these: the cluster's processes are children too
  echo "recorded_s=$((dur - 2)) freq=${PERF_FREQ:-499}" > "$RAW/$tag.meta"
  for i in 0 1; do
    {
      echo "# perf report --no-children --sort dso,symbol (self time), r$i, $target $mode $scen c=$conc"
      perf report -i "$RAW/$tag-r$i.data" --no-children --sort dso,symbol --stdio -g none --percent-limit 0.7 2>/dev/null | grep -v '^$'
      echo
      echo "# perf report --sort dso (self time by library)"
      perf report -i "$RAW/$tag-r$i.data" --no-children --sort dso --stdio -g none 2>/dev/null | grep -v '^#' | grep -v '^$' | head -15
    } > "$RAW/$tag-r$i.report.txt"
  done
  tail -1 "$RAW/$tag.txt" | cut -c1-200
}

# Every profile in RAW, summarized: per replica, the self time by kind (key exchange,
# signatures, hashing, AES-GCM, kernel, ...) in ms of CPU per session; for DWARF profiles
# also the share of each phase of a forwarded session (client TLS accept, link connect,
# link handshake on the home, relay, session).  What docs/BENCHMARKS.md cites as profile.txt.
perf_summary() {
  local meta tag i
  for meta in "$RAW"/perf-*.meta; do
    [ -f "$meta" ] || continue
    tag=$(basename "$meta" .meta)
    for i in 0 1; do
      [ -f "$RAW/$tag-r$i.data" ] || continue
      perf report -i "$RAW/$tag-r$i.data" --no-children --sort dso,symbol --stdio -g none -F sample,dso,sym 2>/dev/null > "$RAW/.self.$$"
      case "$tag" in *-dwarf) perf script -i "$RAW/$tag-r$i.data" -F comm,ip,sym 2>/dev/null > "$RAW/.stacks.$$" ;; *) : > "$RAW/.stacks.$$" ;; esac
      python3 - "$tag-r$i" "$RAW/$tag.txt" "$meta" "$RAW/.self.$$" "$RAW/.stacks.$$" <<'PY'
import collections, re, sys
name, result, meta, self_file, stacks_file = sys.argv[1:6]
kv = dict(re.findall(r"(\w+)=(\S+)", open(result).read().strip().splitlines()[-1]))
m = dict(re.findall(r"(\w+)=(\S+)", open(meta).read()))
rate, rec, freq = float(kv["sessions_per_s"]), float(m["recorded_s"]), float(m["freq"])
kinds = [("x25519 (ECDHE)", r"curve25519|x25519|fe4_|fe_|ge_|scalarmult"),
         ("P-256 (ECDSA)", r"nistz256|p256|ecp_"),
         ("SHA-2 (HKDF, transcript)", r"sha512|sha256"),
         ("AES-GCM", r"aes_|aes|gcm|ghash|clmul"),
         ("memcpy/memmove", r"memmove|memcpy|memset"),
         ("malloc/free", r"malloc|free|_int_|realloc|tcache")]
c, total = collections.Counter(), 0
for line in open(self_file):
    g = re.match(r"\s*(\d+)\s+(\S+)\s+\[(.)\]\s+(.*)", line)
    if not g:
        continue
    n, dso, k, sym = int(g.group(1)), g.group(2), g.group(3), g.group(4)
    total += n
    if k == "k" or dso.startswith("[kernel"):
        c["kernel (TCP, scheduler, futex)"] += n
        continue
    c[next((kind for kind, rx in kinds if re.search(rx, sym, re.I)), "other user")] += n
ms = lambda n: n / freq * 1000 / (rate * rec)
if total == 0:
    print("## %s: no samples (idle in this run)\n" % name)
    sys.exit(0)
print("## %s: %.0f sessions/s under perf, %d samples at %.0f Hz over %.0f s" % (name, rate, total, freq, rec))
for k, v in c.most_common():
    print("  %-32s %7.3f ms/session %5.1f %%" % (k, ms(v), 100 * v / max(1, total)))
print("  %-32s %7.3f ms/session" % ("total", ms(total)))
phases = [("link connect (TCP + TLS client side, front)", r"mailgate::cluster::Cluster::connect|cluster::link::.*dial"),
          ("relay (both ways, front)", r"mailgate::pop3::forward::pipe|forward::relay"),
          ("client TLS accept", r"mailgate::net::tls_accept"),
          ("TLS server handshake (the link, on the home)", r"rustls::server::hs|rustls::server::tls13|MidHandshake|tokio_rustls::server::Accept"),
          ("session (commands, store, locks)", r"mailgate::pop3::")]
samples, cur = [], None
for line in open(stacks_file, errors="replace"):
    if line.strip() and not line.startswith("\t"):
        if cur is not None:
            samples.append(cur)
        cur = []
    elif line.strip() and cur is not None:
        parts = line.strip().split(None, 1)
        cur.append(parts[1] if len(parts) > 1 else "")
if cur:
    samples.append(cur)
if samples:
    pc, cell = collections.Counter(), collections.Counter()
    for st in samples:
        ph = next((p for p, rx in phases if any(re.search(rx, f) for f in st)), "other (accept loop, runtime, logging, teardown)")
        leaf = st[0] if st else ""
        if any("entry_SYSCALL" in f or "do_syscall_64" in f for f in st):
            kind = "kernel"
        else:
            kind = next((k.split(" ")[0] for k, rx in kinds[:4] if re.search(rx, leaf, re.I)), "other")
        pc[ph] += 1
        cell[(ph, kind)] += 1
    print("  phases of the %d stacks (outermost matching frame; split by the leaf's kind):" % len(samples))
    for ph, v in pc.most_common():
        split = ", ".join("%s %.1f %%" % (k, 100 * n / len(samples)) for (p, k), n in cell.most_common() if p == ph)
        print("  %5.1f %%  %s: %s" % (100 * v / len(samples), ph, split))
print()
PY
    done
  done
  rm -f "$RAW/.self.$$" "$RAW/.stacks.$$"
}

counts() {  # N: fixed work, SESSIONS TLS retrieve-alls at c=16, direct and forwarded alternating,
            # with perf stat (software events) on each replica: CPU and context switches per session
  local rounds=${1:-2} r t port i
  command -v perf >/dev/null || { echo "cluster: perf not installed" >&2; return 1; }
  for r in $(seq 1 "$rounds"); do
    for t in direct forwarded; do
      port=$( [ "$t" = direct ] && pop3s_port 0 || pop3s_port 1 )
      local ppids=()
      for i in 0 1; do
        perf stat -e "context-switches,task-clock${COUNTS_EVENTS:+,$COUNTS_EVENTS}" -p "${R_PID[$i]}" -o "$RAW/counts-$t-r$i.stat" &
        ppids+=($!)
      done
      local pre; pre=$(host_busy_1s)
      local line
      line=$(nice -n "$LOAD_NICE" "$L" -t "127.0.0.1:$port" -m tls -s retr-all -c 16 -n "${SESSIONS:-4000}" --max-time 300 \
             -u "$USERS" -r "$RANGE" -p "$PASSWORD" --label "counts-$t" 2>>"$RAW/counts.log" | tail -1)
      for p in "${ppids[@]}"; do kill -INT "$p"; done
      for p in "${ppids[@]}"; do wait "$p" 2>/dev/null; done
      python3 - "$t" "$r" "$line" "$RAW/counts-$t-r0.stat" "$RAW/counts-$t-r1.stat" "$pre" <<'PY' | tee -a "$OUT/counts.txt"
import re, sys
t, r, line, s0, s1, pre = sys.argv[1:7]
f = dict(re.findall(r"(\w+)=(\S+)", line))
n = int(f.get("sessions", "0")) or 1
out, extra = [], []
for name, path in (("r0", s0), ("r1", s1)):
    text = open(path).read()
    cs = float(re.search(r"([\d,.]+)\s+context-switches", text).group(1).replace(",", ""))
    ms = float(re.search(r"([\d,.]+)\s+msec task-clock", text).group(1).replace(",", ""))
    out.append((cs / n, ms / n))
    # COUNTS_EVENTS (e.g. syscalls:sys_enter_writev): per session too
    for count, ev in re.findall(r"^\s*([\d,.]+)\s+(\S+:\S+)", text, re.M):
        extra.append("%s_%s_per_session=%.1f" % (name, ev.split(":")[-1], float(count.replace(",", "")) / n))
print(f"target={t} round={r} sessions={n} errors={f.get('errors')} sessions_per_s={f.get('sessions_per_s')} "
      f"p50_ms={f.get('p50_ms')} p99_ms={f.get('p99_ms')} client_cpu_s={f.get('client_cpu_s')} "
      f"r0_ctxsw_per_session={out[0][0]:.1f} r0_cpu_ms_per_session={out[0][1]:.3f} "
      f"r1_ctxsw_per_session={out[1][0]:.1f} r1_cpu_ms_per_session={out[1][1]:.3f} "
      f"server_cpu_ms_per_session={out[0][1] + out[1][1]:.3f} pre_run_host_busy_pct={pre} " + " ".join(extra))
PY
    done
  done
}

# ---------------------------------------------------------------- moves
# move_once ROUND KIND FROM TO: move example.com from replica FROM (its home) to TO through
# FROM's admin socket, KIND idle or load; a key=value line to OUT/move.txt.
move_once() {
  local round=$1 kind=$2 from=$3 to=$4
  local tag="move-$round-$kind-r$from-r$to" pre waited=0 load lpid="" t0 t1 rc status
  wait_quiet; pre=$QUIET_PRE waited=$QUIET_WAITED
  load=$(cut -d' ' -f1 /proc/loadavg)
  : > "$RAW/$tag.load.txt"
  local a0 b0 c0 a1 b1 c1 l0=0
  a0=$(cpu_of "${R_PID[0]}"); b0=$(cpu_of "${R_PID[1]}"); c0=$(cpu_of "$REDIS_PID")
  if [ "$kind" = load ]; then
    l0=$(date +%s.%N)
    nice -n "$LOAD_NICE" "$L" -t "127.0.0.1:$(pop3s_port "$to")" -m tls -s login -c "${MOVE_CONC:-16}" \
      -d "$MOVE_LOAD_S" --max-time $((MOVE_LOAD_S + 60)) -u "$USERS" -r "$RANGE" -p "$PASSWORD" \
      --label "$tag" > "$RAW/$tag.load.txt" 2> "$RAW/$tag.load.log" &
    lpid=$!
    sleep "${MOVE_LEAD:-3}"
  fi
  echo "# $(date -Is) $MAILGATE --config $(cfg "$from") domain move $DOMAIN --to ${NAMES[$to]}" > "$RAW/$tag.err"
  t0=$(date +%s.%N)
  timeout "${MOVE_MAX:-600}" "$MAILGATE" --config "$(cfg "$from")" domain move "$DOMAIN" --to "${NAMES[$to]}" \
    > "$RAW/$tag.out" 2>> "$RAW/$tag.err"
  rc=$?
  t1=$(date +%s.%N)
  # the record must name the target, active (asked through the other replica)
  local s home="?" state="?" epoch="?" waited_home
  for waited_home in $(seq 0 30); do
    s=$("$MAILGATE" --config "$(cfg "$from")" cluster status --json 2>&1)
    read -r home state epoch < <(python3 - "$s" "$DOMAIN" <<'PY'
import json, sys
try:
    doc = json.loads(sys.argv[1].strip().splitlines()[-1])
    d = [d for d in doc["domains"] if d["name"] == sys.argv[2]][0]
    print(d["home"], d["state"], d.get("epoch", "?"))
except Exception:
    print("? ? ?")
PY
)
    [ "$home" = "${NAMES[$to]}" ] && [ "$state" = active ] && break
    sleep 0.5
  done
  { echo "# $(date -Is) after $tag (rc=$rc): mailgate --config r$from.toml cluster status"
    "$MAILGATE" --config "$(cfg "$from")" cluster status; echo; } >> "$OUT/cluster-status.txt" 2>&1
  [ -n "$lpid" ] && wait "$lpid"
  a1=$(cpu_of "${R_PID[0]}"); b1=$(cpu_of "${R_PID[1]}"); c1=$(cpu_of "$REDIS_PID")
  python3 - "$RAW/$tag" "$round" "$kind" "${NAMES[$from]}" "${NAMES[$to]}" "$rc" "$t0" "$t1" \
      "$home" "$state" "$epoch" "$((waited_home * 500))" "$pre" "$waited" "$load" \
      "$a0" "$a1" "$b0" "$b1" "$c0" "$c1" "$l0" <<'PY' | tee -a "$OUT/move.txt"
import re, sys
(base, rnd, kind, frm, to, rc, t0, t1, home, state, epoch, home_wait_ms, pre, waited, load,
 a0, a1, b0, b1, c0, c1, l0) = sys.argv[1:23]
out, err = open(base + ".out").read(), open(base + ".err").read()
f = [f"label=move-{kind}", f"round={rnd}", f"from={frm}", f"to={to}", f"rc={rc}",
     f"wall_s={float(t1) - float(t0):.2f}"]
m = re.search(r"moved to \S+ \(epoch (\d+)\): (\d+) accounts, (\d+) messages, (\d+) octets; unavailable for (\d+) ms", out)
if m:
    f += [f"epoch={m[1]}", f"accounts={m[2]}", f"messages={m[3]}", f"octets={m[4]}", f"freeze_ms={m[5]}"]
else:
    said = out.strip() or (err.strip().splitlines() or ["none"])[-1]
    f += ["freeze_ms=none", "result=" + said.replace(" ", "_")[:200]]
pre_lines = re.findall(r"^pre-copy: .*$", err, re.M)
m = re.search(r"^pre-copy done: (\d+) accounts, (\d+) messages, ([\d.]+) MB in ([\d.]+) s \(([\d.]+) MB/s\)", err, re.M)
if m:
    f += [f"precopy_accounts={m[1]}", f"precopy_messages={m[2]}", f"precopy_mb={m[3]}",
          f"precopy_s={m[4]}", f"precopy_mb_per_s={m[5]}"]
f.append(f"precopy_progress_lines={len(pre_lines)}")
m = re.search(r"^final delta: (\d+) messages sent; verified (\d+) accounts, (\d+) messages", err, re.M)
if m:
    f += [f"delta_messages={m[1]}", f"verified_accounts={m[2]}", f"verified_messages={m[3]}"]
m = re.search(r"^grace over: ending (\S+) open sessions", err, re.M)
f.append(f"grace_evicted={m[1] if m else 0}")
m = re.search(r"unavailable for ([\d.]+) s; epoch", err)
if m:
    f.append(f"freeze_s_progress={m[1]}")
f += [f"home_after={home}", f"state_after={state}", f"epoch_after={epoch}", f"home_wait_ms={home_wait_ms}",
      "home_ok=%s" % ("yes" if home == to and state == "active" else "NO")]
f += ["r0_cpu_s=%.2f" % (float(a1) - float(a0)), "r1_cpu_s=%.2f" % (float(b1) - float(b0)),
      "redis_cpu_s=%.2f" % (float(c1) - float(c0))]
if kind == "load":
    lines = open(base + ".load.txt").read().strip().splitlines()
    kv = dict(t.split("=", 1) for t in (lines[-1].split() if lines else []) if "=" in t)
    log = open(base + ".load.log").read()
    codes = sorted(set(re.findall(r"\[([A-Z][A-Z/-]+)\]", "\n".join(l for l in log.splitlines() if l.strip().startswith("[")))))
    f += ["load_" + k + "=" + kv.get(k, "none") for k in
          ("conc", "sessions", "errors", "error_kinds", "elapsed_s", "sessions_per_s", "p50_ms", "p99_ms", "max_ms", "aborted")]
    f.append("load_error_codes_in_samples=" + (",".join(codes) or "none"))
    # the load must run from before the move to after it (so through the freeze)
    started, ended = float(l0), float(l0) + float(kv.get("elapsed_s", 0))
    f += ["load_started_before_move_s=%.1f" % (float(t0) - started),
          "load_ran_after_move_s=%.1f" % (ended - float(t1)),
          "load_covers_move=%s" % ("yes" if started < float(t0) and ended > float(t1) else "NO")]
f += [f"pre_run_host_busy_pct={pre}", f"quiet_wait_s={waited}", f"loadavg1={load}"]
print(" ".join(f))
PY
}

moves() {  # ROUNDS: per round idle there and back, then the same under load
  local rounds=${1:-3} r pair t_idle t_max
  # an interrupted run may have left the domain on mailgate-1: back to mailgate-0 first,
  # not measured
  if "$MAILGATE" --config "$(cfg 1)" cluster status --json 2>/dev/null | tail -1 | python3 -c '
import json, sys
d = [d for d in json.load(sys.stdin)["domains"] if d["name"] == sys.argv[1]]
sys.exit(0 if d and d[0]["home"] == "mailgate-1" else 1)' "$DOMAIN"; then
    echo "cluster: $DOMAIN is on mailgate-1 (an interrupted run); moving it back first, not measured" >&2
    timeout "${MOVE_MAX:-600}" "$MAILGATE" --config "$(cfg 1)" domain move "$DOMAIN" --to mailgate-0 \
      > "$RAW/move-0-reset.out" 2> "$RAW/move-0-reset.err" || { echo "cluster: that failed; see $RAW/move-0-reset.err" >&2; return 1; }
  fi
  for r in $(seq 1 "$rounds"); do
    t_max=0
    for pair in "0 1" "1 0"; do
      move_once "$r" idle $pair
      t_idle=$(tail -1 "$OUT/move.txt" | sed -n 's/.* wall_s=\([0-9]*\).*/\1/p')
      [ "${t_idle:-0}" -gt "$t_max" ] && t_max=$t_idle
      tail -1 "$OUT/move.txt" | grep -q 'home_ok=yes' || { echo "cluster: move failed; see $RAW/move-$r-idle-r${pair% *}-r${pair#* }.err" >&2; return 1; }
    done
    MOVE_LOAD_S=${MOVE_LOAD_DUR:-$(( 3 * t_max + 20 ))}
    for pair in "0 1" "1 0"; do
      move_once "$r" load $pair
      tail -1 "$OUT/move.txt" | grep -q 'home_ok=yes' || { echo "cluster: move failed; see $RAW/move-$r-load-r${pair% *}-r${pair#* }.err" >&2; return 1; }
    done
  done
  "$MAILGATE" --config "$(cfg 0)" cluster cleanup --older-than 0s > "$RAW/move-cleanup.txt" 2>&1
}

host_info() {
  {
    echo "date=$(date -Is) host=$(hostname) nproc=$(nproc) kernel=$(uname -r)"
    echo "cpu=$(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1) mem=$(awk '/MemTotal/{print $2 " kB"}' /proc/meminfo)"
    echo "mailgate=$MAILGATE (built from ${MG_COMMIT:-the working tree; set MG_COMMIT}; repo HEAD now $(cd "$REPO" && git rev-parse --short HEAD 2>/dev/null)) rustc=$(rustc --version 2>/dev/null) redis=$(redis-server --version | cut -d' ' -f3)"
    echo "pop3load=$L ulimit_n=$(ulimit -n) MG_NICE=$MG_NICE LOAD_NICE=$LOAD_NICE DUR=$DUR"
    echo "loadavg=$(cat /proc/loadavg)"
  } >> "$OUT/host.txt"
}

# The whole dispatch is one function called on the last line, so bash has read the file
# before anything runs.
main() {
  local cmd="${1:-}"; shift || true
  case "$cmd" in
    setup)  setup ;;
    status) start_cluster status; "$MAILGATE" --config "$(cfg 1)" cluster status; stop_cluster ;;
    ab)     host_info; start_cluster ab; warm; ab "${1:-5}" "${2:-1}"; stop_cluster; host_info ;;
    one)
      local target=$1 mode=$2 scen=$3 conc=$4 dur=${5:-$DUR}
      start_cluster "one-$target"; warm >/dev/null; one "$target" "$mode" "$scen" "$conc" "$dur" 0; stop_cluster ;;
    single)
      # ROUNDS [FIRST]: the same runs on one server without a cluster (replica 0's data dir,
      # local locks): what the cluster costs a session that is not forwarded
      local r
      for r in $(seq "${2:-1}" $(( ${2:-1} + ${1:-3} - 1 ))); do
        start_single "single-$r"; warm >/dev/null
        one single tls login 16 "$DUR" "$r"; one single tls retr-all 16 "$DUR" "$r"
        stop_cluster
      done ;;
    perf)   start_cluster "perf-$1"; warm >/dev/null; perf_profile "$1" "$2" "$3" "$4" "${5:-15}"; stop_cluster ;;
    counts) start_cluster counts; warm >/dev/null; counts "${1:-2}"; stop_cluster ;;
    perf-summary) perf_summary ;;
    move)   host_info; HOME_ANY=1 start_cluster move; moves "${1:-3}"; stop_cluster; host_info ;;
    *) awk 'NR > 1 && !/^#/ { exit } NR > 1' "$0"; exit 2 ;;
  esac
}

main "$@"; exit $?
