# Sourced by populate.sh and run.sh: a private Dovecot 2.3 POP3 instance serving the
# Dovecot side of the data set (DC_DATA: passwd-file, Maildirs, certificate), configured
# from the shared kit's own template ($KIT/dovecot/dovecot.conf.in, rendered as its
# start-dovecot.sh renders it: raised process limits, auth cache on) so that it is the
# kit's Dovecot on this data.  Loopback only.
#
#   dc_start          starts it (DC_NICE, default 0) and sets DC_PID; refuses taken ports
#   dc_stop           stops it by DC_PID (checked against our config), SIGKILL after 20 s
#
# Environment: KIT, DC_DATA, DC_PORT_PLAIN (21110), DC_PORT_TLS (21995),
# DC_LOGIN_MODE (secure: the Dovecot default, a login process per connection; perf:
# login processes reused), DC_RUN (runtime dir, default $DC_DATA/run).

DC_PORT_PLAIN="${DC_PORT_PLAIN:-21110}"
DC_PORT_TLS="${DC_PORT_TLS:-21995}"
DC_LOGIN_MODE="${DC_LOGIN_MODE:-secure}"
DC_RUN="${DC_RUN:-$DC_DATA/run}"
DC_CONF="$DC_RUN/dovecot.conf"
DC_PID=""

dc_port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

dc_start() {
  local sc minavail p
  command -v dovecot >/dev/null || { echo "dovecot missing: apt-get install dovecot-core dovecot-pop3d" >&2; return 1; }
  case "$DC_LOGIN_MODE" in secure) sc=1; minavail=0;; perf) sc=0; minavail=2;; *) echo "DC_LOGIN_MODE=secure|perf" >&2; return 2;; esac
  for p in "$DC_PORT_PLAIN" "$DC_PORT_TLS"; do
    if dc_port_open "$p"; then echo "dovecot: 127.0.0.1:$p is already in use" >&2; return 1; fi
  done
  mkdir -p "$DC_RUN/run" "$DC_RUN/state"
  sed -e "s|@DATA@|$DC_DATA|g" -e "s|@RUN@|$DC_RUN|g" -e "s|@PASSWD@|$DC_DATA/users.passwd|g" \
      -e "s|@AUTH_CACHE_SIZE@|10M|g" -e "s|@LOGIN_SERVICE_COUNT@|$sc|g" \
      -e "s|@LOGIN_MIN_AVAIL@|$minavail|g" -e "s|@PORT_PLAIN@|$DC_PORT_PLAIN|g" \
      -e "s|@PORT_TLS@|$DC_PORT_TLS|g" -e "s|@DEFAULT_PROCESS_LIMIT@|1200|g" \
      -e "s|@DEFAULT_CLIENT_LIMIT@|5000|g" -e "s|@LOGIN_PROCESS_LIMIT@|1200|g" \
      -e "s|@POP3_PROCESS_LIMIT@|1200|g" \
      "$KIT/dovecot/dovecot.conf.in" > "$DC_CONF"
  doveconf -c "$DC_CONF" -n > "$DC_RUN/doveconf-n.txt" || return 1
  : > "$DC_RUN/dovecot.log"
  (ulimit -n "$(ulimit -Hn)"; exec nice -n "${DC_NICE:-0}" dovecot -c "$DC_CONF" -F > "$DC_RUN/dovecot.stdout" 2>&1 < /dev/null) &
  DC_PID=$!
  local _
  for _ in $(seq 1 150); do
    if ! kill -0 "$DC_PID" 2>/dev/null; then
      echo "dovecot exited; see $DC_RUN/dovecot.log" >&2; tail -5 "$DC_RUN/dovecot.log" >&2; DC_PID=""; return 1
    fi
    if dc_port_open "$DC_PORT_PLAIN" && dc_port_open "$DC_PORT_TLS"; then
      echo "dovecot $(dovecot --version | cut -d' ' -f1) pid $DC_PID on 127.0.0.1:$DC_PORT_PLAIN/$DC_PORT_TLS (login $DC_LOGIN_MODE)" >&2
      return 0
    fi
    sleep 0.1
  done
  echo "dovecot did not listen within 15 s" >&2; dc_stop; return 1
}

dc_stop() {
  local pid="$DC_PID" _
  [ -n "$pid" ] || return 0
  DC_PID=""
  if ! tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "-c $DC_CONF"; then
    echo "dovecot: pid $pid is not our instance any more; not signalling it" >&2; return 0
  fi
  kill -TERM "$pid"
  for _ in $(seq 1 200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then echo "dovecot: pid $pid ignored SIGTERM for 20 s; SIGKILL" >&2; kill -KILL "$pid"; fi
  wait "$pid" 2>/dev/null
  return 0
}
