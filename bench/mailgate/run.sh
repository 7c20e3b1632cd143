#!/usr/bin/env bash
# Measure mailgate with the shared POP3 kit's load generator (pop3load) on the data
# set made by populate.sh, with the same scenarios as the kit's run-bench.sh uses for
# Dovecot, so the two can be compared row by row.
#
#   bench/mailgate/run.sh all              # warm, matrix, big, nocache, idle (~20 min)
#   bench/mailgate/run.sh matrix|big|nocache|warm
#   bench/mailgate/run.sh idle LABEL MODE N HOLD
#   bench/mailgate/run.sh one LABEL MODE SCENARIO CONC [DUR] [-- extra pop3load args]
#   bench/mailgate/run.sh rss LABEL MODE SCENARIO CONC DUR   # server RSS sampled each second
#   bench/mailgate/run.sh perf LABEL MODE SCENARIO CONC DUR  # perf stat + perf record
#   MG_CACHE_TTL=0 bench/mailgate/run.sh one nocache tls login 16
#   bench/mailgate/run.sh same             # both servers up: every account shown alike?
#   SERVER=dovecot bench/mailgate/run.sh matrix|big|idle|one ...   # the same runs on Dovecot
#
# SERVER=dovecot measures, instead of mailgate, the private Dovecot 2.3 instance of
# dovecot-instance.sh (the kit's config on the Maildirs and passwd-file that
# populate.sh imported into mailgate; ports 21110/21995, DC_LOGIN_MODE secure|perf),
# with the same scenarios, noise rule and result lines (server=dovecot; server CPU is
# its whole process tree's).  MG_NICE applies to it too.
#
# Each invocation starts its own release server on 127.0.0.1 (ports from the
# populate.sh config, 22110/22995; it refuses to run if either port is taken),
# runs its scenarios and stops that server by its saved pid (SIGTERM, then SIGKILL
# of the same pid after 20 s; never by name).  Two places get output:
#   OUT, bench/results/mailgate-<date>/: the summaries that are evidence, i.e. result
#     lines (pop3load's key=value line plus server_cpu_s, server_cpu_ms_per_session,
#     foreign_cpu_pct, pre_run_host_busy_pct, attempt) in <label>.txt, a summary of each
#     server log in server-<label>.summary.txt, and host.txt;
#   RAW, bench/out/mailgate-<date>/ (git-ignored): pop3load's human summaries and the
#     discarded runs in <label>.log, the server's stderr in server-<label>.log, RSS
#     traces (<label>-rss.tsv) and everything of `perf` (data, stat, report, result lines).
# Commit from OUT only what docs/BENCHMARKS.md cites.
#
# As in the kit: before each run it waits (up to QUIET_WAIT=180 s) for the host to
# be <= QUIET_PCT=15 % busy; a run whose foreign CPU (host CPU used by neither the
# server nor pop3load) exceeds FOREIGN_MAX=5 % is logged as DISCARDED and repeated
# up to RETRIES=2 times.  Every pop3load run is bounded by -d/-n and --max-time.
#
# Environment: MG_DATA (bench/mailgate/data), MAILGATE (release binary), POP3LOAD
# (/work/target-pop3load/release/pop3load), OUT and RAW (above), DUR (20), MG_NICE /
# LOAD_NICE (-10, as the Dovecot runs), MG_CACHE_TTL (verified-login cache TTL;
# unset = mailgate's default 300 s), MG_LOG (server log filter, default info),
# MG_EXTRA_ENV (extra VAR=value words for the server's environment, diagnostics only).
set -uo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
. "$HERE/quiet.sh"
REPO="$(cd "$HERE/../.." && pwd)"
KIT="${KIT:-/work/shared/bench}"
MG_DATA="${MG_DATA:-$HERE/data}"
SERVER="${SERVER:-mailgate}"
case "$SERVER" in mailgate|dovecot) ;; *) echo "run: SERVER=mailgate|dovecot" >&2; exit 2;; esac
DC_DATA="$MG_DATA/dovecot"
. "$HERE/dovecot-instance.sh"
CFG="$MG_DATA/mailgate.toml"
PIDFILE="$MG_DATA/server.pid"
PT="$KIT/scripts/proctree.py"
L="${POP3LOAD:-/work/target-pop3load/release/pop3load}"
OUT="${OUT:-$REPO/bench/results/mailgate-$(date +%F)}"
RAW="${RAW:-$REPO/bench/out/mailgate-$(date +%F)}"
DUR="${DUR:-20}"
MG_NICE="${MG_NICE:--10}"
LOAD_NICE="${LOAD_NICE:--10}"
PASSWORD="${PASSWORD:-password}"
DEFAULT_USERS='user{N}@example.com'
if [ -z "${MAILGATE:-}" ]; then
  for c in "${CARGO_TARGET_DIR:-/work/target-release}/release/mailgate" "$REPO/target/release/mailgate"; do
    [ -x "$c" ] && { MAILGATE="$c"; break; }
  done
fi
[ -x "${MAILGATE:-}" ] || { echo "run: no release mailgate binary (set MAILGATE)" >&2; exit 1; }
[ -x "$L" ] || { echo "run: no pop3load at $L (see docs/BENCHMARKS.md to build it)" >&2; exit 1; }
[ -f "$CFG" ] || { echo "run: $CFG missing: run bench/mailgate/populate.sh first" >&2; exit 1; }
PLAIN_ADDR=$(sed -n 's/^listen = "\(.*\)"/\1/p' "$CFG")
TLS_ADDR=$(sed -n 's/^tls_listen = "\(.*\)"/\1/p' "$CFG")
MG_PLAIN_ADDR=$PLAIN_ADDR
if [ "$SERVER" = dovecot ]; then
  [ -f "$DC_DATA/users.passwd" ] || { echo "run: no Dovecot data in $DC_DATA: run populate.sh (FROM=dovecot)" >&2; exit 1; }
  PLAIN_ADDR="127.0.0.1:$DC_PORT_PLAIN" TLS_ADDR="127.0.0.1:$DC_PORT_TLS"
fi
case "$PLAIN_ADDR $TLS_ADDR" in 127.0.0.1:*\ 127.0.0.1:*) ;; *) echo "run: listeners must be on 127.0.0.1 ($PLAIN_ADDR $TLS_ADDR)" >&2; exit 1;; esac
mkdir -p "$OUT" "$RAW"

# 1000+ sessions need 1000+ descriptors in the server and in pop3load.
hard=$(ulimit -Hn)
ulimit -n "$hard" 2>/dev/null || true
[ "$(ulimit -n)" = unlimited ] || [ "$(ulimit -n)" -ge 2100 ] || echo "run: warning: ulimit -n is $(ulimit -n); the idle run needs > 2000" >&2

SERVER_PID=""
SERVER_LABEL=""
port_taken() {  # HOST:PORT -> 0 when something accepts connections there
  python3 - "$1" <<'PY'
import socket, sys
h, p = sys.argv[1].rsplit(":", 1)
s = socket.socket(); s.settimeout(1)
sys.exit(0 if s.connect_ex((h, int(p))) == 0 else 1)
PY
}

start_server() {  # LABEL
  local label=$1 log="$RAW/server-$1.log"
  SERVER_LABEL=$label
  if [ "$SERVER" = dovecot ]; then
    DC_NICE="$MG_NICE" dc_start || exit 1
    SERVER_PID=$DC_PID
    return 0
  fi
  for a in "$PLAIN_ADDR" "$TLS_ADDR"; do
    if port_taken "$a"; then echo "run: $a is already taken; refusing to start (another server?)" >&2; exit 1; fi
  done
  if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
    echo "run: a server from an earlier run (pid $(cat "$PIDFILE")) is still running; stop it first" >&2; exit 1
  fi
  local envs=(MAILGATE_LOG="${MG_LOG:-info}" NO_COLOR=1)
  [ -n "${MG_CACHE_TTL:-}" ] && envs+=(MAILGATE_AUTH__CACHE_TTL_SECS="$MG_CACHE_TTL")
  # MG_EXTRA_ENV: more VAR=value words for the server (diagnostics, e.g. MALLOC_ARENA_MAX=1)
  [ -n "${MG_EXTRA_ENV:-}" ] && read -ra extra <<<"$MG_EXTRA_ENV" && envs+=("${extra[@]}")
  echo "=== $(date -Is) start: ${envs[*]} nice $MG_NICE $MAILGATE serve --config $CFG" >> "$log"
  env "${envs[@]}" nice -n "$MG_NICE" "$MAILGATE" serve --config "$CFG" >> "$log" 2>&1 &
  SERVER_PID=$!
  echo "$SERVER_PID" > "$PIDFILE"
  local i
  for i in $(seq 1 150); do
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then echo "run: server exited at start; see $log" >&2; tail -5 "$log" >&2; exit 1; fi
    if port_taken "$PLAIN_ADDR" && port_taken "$TLS_ADDR"; then
      echo "run: mailgate pid $SERVER_PID up ($(grep -c 'listening' "$log") listening lines in $log)" >&2
      return 0
    fi
    sleep 0.1
  done
  echo "run: server did not listen within 15 s" >&2; stop_server; exit 1
}

stop_server() {
  local pid="${SERVER_PID:-}"
  [ -n "$pid" ] || return 0
  if [ "$SERVER" = dovecot ]; then
    dc_stop; SERVER_PID=""
    cp "$DC_RUN/dovecot.log" "$RAW/server-$SERVER_LABEL.log"
    summarize_log
    return 0
  fi
  # Only signal our own server: the saved pid, running our binary with our config.
  if ! tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "--config $CFG"; then
    echo "run: pid $pid is not our server any more; not signalling it" >&2; SERVER_PID=""; rm -f "$PIDFILE"; return 0
  fi
  kill -TERM "$pid"
  local i
  for i in $(seq 1 200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then echo "run: server pid $pid ignored SIGTERM for 20 s; SIGKILL" >&2; kill -KILL "$pid"; fi
  wait "$pid" 2>/dev/null
  SERVER_PID=""; rm -f "$PIDFILE"
  summarize_log
}

# The server log has a line per session (hundreds of MB, in RAW); keep a summary in OUT:
# session outcomes, and every WARN/ERROR line kind with its first occurrence.
summarize_log() {
  local log="$RAW/server-$SERVER_LABEL.log"
  [ -f "$log" ] || return 0
  python3 - "$log" > "$OUT/server-$SERVER_LABEL.summary.txt" <<'PY'
import collections, re, sys
outcomes, levels, first = collections.Counter(), collections.Counter(), {}
for line in open(sys.argv[1], errors="replace"):
    m = re.search(r'session end outcome="?(\w+)', line) or re.search(r'pop3\(.*?\): (Disconnected: \w+)', line)
    if m:
        outcomes[m.group(1)] += 1
    m = re.search(r'\b(WARN|ERROR)\b.*?: (.*)$', line)
    if m:
        kind = re.sub(r'\d+', 'N', m.group(2))[:120]
        levels[(m.group(1), kind)] += 1
        first.setdefault((m.group(1), kind), line.strip())
print("sessions by outcome:", dict(outcomes))
for (lvl, kind), n in levels.most_common():
    print("%s x%d: %s" % (lvl, n, first[(lvl, kind)]))
print("starts/stops:", [l.strip() for l in open(sys.argv[1], errors="replace") if l.startswith("===") or " stopped" in l or "listening" in l or "starting up" in l])
PY
}
trap 'stop_server; dc_stop' EXIT
trap 'exit 130' INT TERM

addr_for() { if [ "$1" = tls ]; then echo "$TLS_ADDR"; else echo "$PLAIN_ADDR"; fi; }
srv_cpu() { python3 "$PT" cpu "$SERVER_PID" | cut -d= -f2; }

# one LABEL MODE SCENARIO CONC DUR [USERS RANGE] -- [extra args]; same retry rule as the kit.
one() {
  local attempt line fpct
  for attempt in $(seq 1 $(( ${RETRIES:-2} + 1 ))); do
    line="$(one_attempt "$@") attempt=$attempt"
    fpct=$(sed -n 's/.* foreign_cpu_pct=\([0-9.]*\).*/\1/p' <<<"$line")
    if python3 -c "import sys; sys.exit(0 if float('${fpct:-0}') <= float('${FOREIGN_MAX:-5}') else 1)"; then break; fi
    [ "$attempt" -le "${RETRIES:-2}" ] && echo "DISCARDED (noisy): $line" | tee -a "$RAW/$1.log" >&2
  done
  echo "$line" | tee -a "$OUT/$1.txt"
}

one_attempt() {
  local label=$1 mode=$2 scen=$3 conc=$4 dur=$5; shift 5
  local users="${USERS:-$DEFAULT_USERS}" range="${RANGE:-0-199}"
  local c0 c1 line pre waited=0
  wait_quiet; pre=$QUIET_PRE waited=$QUIET_WAITED
  c0=$(srv_cpu)
  line=$(nice -n "$LOAD_NICE" "$L" -t "$(addr_for "$mode")" -m "$mode" -s "$scen" -c "$conc" -d "$dur" --max-time $((dur * 3 + 60)) \
         -u "$users" -r "$range" -p "$PASSWORD" --label "$label" "$@" 2>>"$RAW/$label.log" | tail -1)
  c1=$(srv_cpu)
  [ -n "$line" ] || line="label=$label mode=$mode scenario=$scen conc=$conc sessions=0 errors=pop3load-failed"
  echo "$line $(python3 - "$line" "$c0" "$c1" <<'PY'
import os, sys
kv = dict(t.split("=", 1) for t in sys.argv[1].split() if "=" in t)
srv = float(sys.argv[3]) - float(sys.argv[2])
sess = max(1, int(kv.get("sessions", "0")))
el, busy, cli = float(kv.get("elapsed_s", 0)), float(kv.get("host_cpu_busy_pct", 0)), float(kv.get("client_cpu_s", 0))
n = os.cpu_count()
foreign = busy / 100 * el * n - srv - cli
print("server_cpu_s=%.2f server_cpu_ms_per_session=%.2f foreign_cpu_pct=%.1f" % (srv, srv * 1000 / sess, max(0.0, 100 * foreign / max(1e-9, el * n))))
PY
) pre_run_host_busy_pct=$pre server=$SERVER cache_ttl=${MG_CACHE_TTL:-default}"
}

warm() {  # one retr-all pass over every mailbox (pages in the store, fills the login cache)
  "$L" -t "$PLAIN_ADDR" -s retr-all -c 4 -n 200 -u 'user{N}@example.com' -r 0-199 -p "$PASSWORD" --label warm --max-time 300 2>&1 | tail -3
  "$L" -t "$PLAIN_ADDR" -s retr-all -c 1 -n 1 -u big@example.com -p "$PASSWORD" --label warm-big --max-time 120 2>&1 | tail -1
}

matrix() {  # LABEL: {login,retr-all} x {plain,stls,tls} x c={1,16,128}
  local scen mode conc
  for scen in login retr-all; do
    for mode in plain stls tls; do
      for conc in 1 16 128; do one "$1" "$mode" "$scen" "$conc" "$DUR"; done
    done
  done
}

big() {  # LABEL: 5 x ~5 MiB messages, retr-all, c=1 and 4, each mode
  # c=1 reads big@example.com as the kit does; c=4 reads big0..big15 (same messages)
  # round-robin, since mailgate, unlike Dovecot's default, locks the maildrop for the
  # session (4 sessions on one mailbox would be refused [IN-USE]).
  local mode
  for mode in plain stls tls; do
    USERS=big@example.com RANGE=0 one "$1" "$mode" retr-all 1 "${BIG_DUR:-$DUR}"
    USERS='big{N}@example.com' RANGE=0-15 one "$1" "$mode" retr-all 4 "${BIG_DUR:-$DUR}"
  done
}

idle() {  # LABEL MODE N HOLD: N logged-in idle sessions; server RSS/PSS before and while held
  local label=$1 mode=$2 n=$3 hold=${4:-30}
  local ready="$RAW/.idle-ready.$$" res="$RAW/.idle-result.$$" base held lpid
  # mailgate locks a maildrop from PASS to the end of the session (RFC 1939), so
  # every idle session needs its own account: populate.sh makes user0..user(N-1).
  local range="0-$((n - 1))"
  rm -f "$ready"
  sleep 2
  base=$(python3 "$PT" mem "$SERVER_PID")
  nice -n "$LOAD_NICE" "$L" -t "$(addr_for "$mode")" -m "$mode" -s idle -c "$n" --hold "$hold" -u 'user{N}@example.com' -r "$range" \
       -p "$PASSWORD" --label "$label" --ready-file "$ready" --max-time $((hold + 300)) > "$res" 2>>"$RAW/$label.log" &
  lpid=$!
  for _ in $(seq 1 $(( (hold + 300) * 10 ))); do
    [ -f "$ready" ] && break
    kill -0 "$lpid" 2>/dev/null || break
    sleep 0.1
  done
  sleep 3
  held=$(python3 "$PT" mem "$SERVER_PID")
  local threads fds
  threads=$(awk '/^Threads:/{print $2}' "/proc/$SERVER_PID/status")
  fds=$(ls "/proc/$SERVER_PID/fd" | wc -l)
  wait "$lpid"
  local line; line=$(tail -1 "$res"); rm -f "$ready" "$res"
  local b_rss b_pss h_rss h_pss
  b_rss=$(sed -n 's/.* rss_kb=\([0-9]*\) .*/\1/p' <<<"$base"); b_pss=$(sed -n 's/.* pss_kb=\([0-9]*\) .*/\1/p' <<<"$base")
  h_rss=$(sed -n 's/.* rss_kb=\([0-9]*\) .*/\1/p' <<<"$held"); h_pss=$(sed -n 's/.* pss_kb=\([0-9]*\) .*/\1/p' <<<"$held")
  {
    echo "$line"
    echo "label=$label idle_baseline: $base"
    echo "label=$label idle_held_$n: $held server_threads=$threads server_fds=$fds"
    echo "label=$label mode=$mode idle_conns=$n rss_kb_delta=$((h_rss - b_rss)) pss_kb_delta=$((h_pss - b_pss)) rss_kb_per_conn=$(python3 -c "print('%.1f' % (($h_rss - $b_rss) / $n))") pss_kb_per_conn=$(python3 -c "print('%.1f' % (($h_pss - $b_pss) / $n))")"
  } | tee -a "$OUT/$label.txt"
}

rss_trace() {  # LABEL MODE SCENARIO CONC DUR [RANGE]: a load run while the server's RSS is sampled each second
  local label=$1 mode=$2 scen=$3 conc=$4 dur=$5 range=${6:-0-199} lpid t=0
  local trace="$RAW/$label-rss.tsv"
  echo "# $(date -Is) $mode $scen c=$conc ${dur}s range=$range cache_ttl=${MG_CACHE_TTL:-default}" >> "$trace"
  echo -e "t_s\trss_kb\tthreads" >> "$trace"
  nice -n "$LOAD_NICE" "$L" -t "$(addr_for "$mode")" -m "$mode" -s "$scen" -c "$conc" -d "$dur" --max-time $((dur * 3 + 60)) \
       -u "$DEFAULT_USERS" -r "$range" -p "$PASSWORD" --label "$label" 2>>"$RAW/$label.log" >> "$OUT/$label.txt" &
  lpid=$!
  while kill -0 "$lpid" 2>/dev/null; do
    echo -e "$t\t$(awk '/^VmRSS:/{print $2}' "/proc/$SERVER_PID/status")\t$(awk '/^Threads:/{print $2}' "/proc/$SERVER_PID/status")" >> "$trace"
    sleep 1; t=$((t + 1))
  done
  wait "$lpid"
  sleep 5
  echo -e "after+5s\t$(awk '/^VmRSS:/{print $2}' "/proc/$SERVER_PID/status")\t$(awk '/^Threads:/{print $2}' "/proc/$SERVER_PID/status")" >> "$trace"
  tail -1 "$OUT/$label.txt"
}

perf_profile() {  # LABEL MODE SCENARIO CONC DUR: perf stat, then perf record, each over a load run (all in RAW:
  # perf slows the server, so its runs' figures are not results)
  local label=$1 mode=$2 scen=$3 conc=$4 dur=$5 lpid
  command -v perf >/dev/null || { echo "run: perf not installed" >&2; return 1; }
  local data="${PERF_DATA:-$RAW/perf-$label.data}"
  nice -n "$LOAD_NICE" "$L" -t "$(addr_for "$mode")" -m "$mode" -s "$scen" -c "$conc" -d "$dur" --max-time $((dur * 3 + 60)) \
       -u "$DEFAULT_USERS" -r 0-199 -p "$PASSWORD" --label "$label-stat" 2>>"$RAW/$label.log" >> "$RAW/$label.txt" &
  lpid=$!
  sleep 1
  perf stat -e task-clock,context-switches,cpu-migrations,page-faults,cycles,instructions \
       -p "$SERVER_PID" -o "$RAW/perf-$label.stat.txt" -- sleep $((dur - 2))
  wait "$lpid"
  sleep 1
  nice -n "$LOAD_NICE" "$L" -t "$(addr_for "$mode")" -m "$mode" -s "$scen" -c "$conc" -d "$dur" --max-time $((dur * 3 + 60)) \
       -u "$DEFAULT_USERS" -r 0-199 -p "$PASSWORD" --label "$label-record" 2>>"$RAW/$label.log" >> "$RAW/$label.txt" &
  lpid=$!
  sleep 1
  perf record -F 499 -g -p "$SERVER_PID" -o "$data" -- sleep $((dur - 2)) 2>>"$RAW/$label.log"
  wait "$lpid"
  {
    echo "# perf report --no-children --sort dso,symbol (self time), $mode $scen c=$conc"
    perf report -i "$data" --no-children --sort dso,symbol --stdio -g none --percent-limit 0.7 2>/dev/null | grep -v '^$'
    echo
    echo "# perf report --sort dso (self time by library)"
    perf report -i "$data" --no-children --sort dso --stdio -g none 2>/dev/null | grep -v '^#' | grep -v '^$' | head -15
  } > "$RAW/perf-$label.report.txt"
  tail -2 "$RAW/$label.txt" | cut -c1-200
}

host_info() {
  {
    echo "date=$(date -Is) host=$(hostname) nproc=$(nproc) kernel=$(uname -r)"
    echo "cpu=$(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1) mem=$(awk '/MemTotal/{print $2 " kB"}' /proc/meminfo)"
    echo "mailgate=$MAILGATE ($(cd "$REPO" && git rev-parse --short HEAD 2>/dev/null)) rustc=$(rustc --version 2>/dev/null)"
    echo "pop3load=$L ulimit_n=$(ulimit -n) MG_NICE=$MG_NICE LOAD_NICE=$LOAD_NICE DUR=$DUR"
    echo "loadavg=$(cat /proc/loadavg)"
  } >> "$OUT/host.txt"
}

# The whole command dispatch is one function, called on the file's last line, so bash
# has read all of it before anything runs (editing this file during a run is safe).
main() {
  cmd="${1:-}"; shift || true
  case "$cmd" in
    warm)   start_server warm; warm; stop_server ;;
    same)
      # Both servers at once on the same data: each account's UIDL and LIST lines, and a
      # digest of every message, from Dovecot and from mailgate (plain POP3, USER/PASS).
      [ "$SERVER" = mailgate ] || { echo "run: same starts both servers; unset SERVER" >&2; exit 2; }
      start_server same
      dc_start || exit 1
      python3 "$HERE/same.py" "127.0.0.1:$DC_PORT_PLAIN" "$MG_PLAIN_ADDR" "$PASSWORD" \
        "$DEFAULT_USERS" "${NUSERS:-200}" "${BIG_COPIES:-16}" | tee -a "$OUT/same.txt"
      rc=${PIPESTATUS[0]}
      dc_stop; stop_server
      exit "$rc" ;;
    matrix) start_server matrix; warm; matrix "${1:-matrix}"; stop_server ;;
    big)    start_server big; warm; big "${1:-big}"; stop_server ;;
    idle)   start_server idle; idle "${1:-idle}" "${2:-tls}" "${3:-1000}" "${4:-30}"; stop_server ;;
    nocache)
      # Every login pays argon2id (m=19456 KiB, t=2): the row to hold against Dovecot's
      # argon2id matrix (whose auth cache never skips the hash).
      MG_CACHE_TTL=0 start_server nocache
      for mode in plain tls; do for conc in 1 16 128; do MG_CACHE_TTL=0 one nocache "$mode" login "$conc" "$DUR"; done; done
      MG_CACHE_TTL=0 one nocache tls retr-all 16 "$DUR"
      stop_server ;;
    one)
      label=$1 mode=$2 scen=$3 conc=$4; shift 4
      dur=$DUR
      if [ $# -gt 0 ] && [ "$1" != "--" ]; then dur=$1; shift; fi
      [ "${1:-}" = "--" ] && shift
      start_server "$label"; [ "${NOWARM:-0}" = 1 ] || warm >/dev/null; one "$label" "$mode" "$scen" "$conc" "$dur" "$@"; stop_server ;;
    rss)
      # RSS over time under load, e.g. MG_CACHE_TTL=0 run.sh rss rss-nocache plain login 2 30
      start_server "$1"; rss_trace "$@"; stop_server ;;
    perf)
      # perf stat + perf record of the server under one scenario, e.g. run.sh perf perf-tls-login tls login 16 15
      start_server "$1"; warm >/dev/null; perf_profile "$@"; stop_server ;;
    all)
      host_info
      start_server matrix; warm; matrix matrix; stop_server
      start_server big; warm; BIG_DUR="${BIG_DUR:-10}" big big; stop_server
      MG_CACHE_TTL=0 start_server nocache
      for mode in plain tls; do for conc in 1 16 128; do MG_CACHE_TTL=0 one nocache "$mode" login "$conc" "$DUR"; done; done
      MG_CACHE_TTL=0 one nocache tls retr-all 16 "$DUR"
      stop_server
      start_server idle; idle idle tls 1000 30; idle idle plain 1000 30; stop_server
      # Diagnostic: the same with glibc's mmap threshold pinned at 128 KiB, so argon2id's
      # 19 MiB blocks go back to the kernel on free (see docs/BENCHMARKS.md, memory).
      MG_EXTRA_ENV="MALLOC_MMAP_THRESHOLD_=131072" start_server idle-mmapthr
      idle idle-mmapthr tls 1000 30; idle idle-mmapthr plain 1000 30; stop_server
      host_info ;;
    *) awk 'NR > 1 && !/^#/ { exit } NR > 1' "$0"; exit 2 ;;
  esac
}

main "$@"; exit $?
