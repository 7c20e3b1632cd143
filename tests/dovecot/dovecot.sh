#!/usr/bin/env bash
# A private Dovecot 2.3 (Debian dovecot-core, dovecot-pop3d, dovecot-lmtpd) for the
# import test and the benchmarks: its own config, base_dir, state and log under DIR, POP3,
# POP3S and LMTP on 127.0.0.1 only, never the system instance.
#
#   tests/dovecot/dovecot.sh start DIR POP3_PORT POP3S_PORT LMTP_PORT
#   tests/dovecot/dovecot.sh stop DIR
#
# DIR holds `passwd` (a Dovecot passwd-file, the passdb and the userdb: each line names
# the mail uid, gid and home; mail goes to ~/Maildir), `server.crt` and `server.key`.
# Run as root (Dovecot drops to the mail uid itself). `start` returns once every port
# answers and prints the master's pid; `stop` ends that pid (recorded by Dovecot in
# DIR/run/master.pid) and waits until it is gone.
set -euo pipefail
cmd="${1:?usage: dovecot.sh start|stop DIR ...}"
dir="$(cd "${2:?usage: dovecot.sh start|stop DIR ...}" && pwd)"

wait_port() {
    for _ in $(seq 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    echo "dovecot: port $1 did not open; see $dir/dovecot.log" >&2
    cat "$dir/dovecot.log" >&2 || true
    return 1
}

case "$cmd" in
start)
    pop3="${3:?POP3 port}" pop3s="${4:?POP3S port}" lmtp="${5:?LMTP port}"
    mkdir -p "$dir/run" "$dir/state"
    cat >"$dir/dovecot.conf" <<CONF
instance_name = mailgate-test-$pop3
base_dir = $dir/run
state_dir = $dir/state
log_path = $dir/dovecot.log
protocols = pop3 lmtp
listen = 127.0.0.1
ssl = yes
ssl_cert = <$dir/server.crt
ssl_key = <$dir/server.key
disable_plaintext_auth = no
auth_mechanisms = plain
passdb {
  driver = passwd-file
  args = username_format=%u $dir/passwd
}
userdb {
  driver = passwd-file
  args = username_format=%u $dir/passwd
}
mail_location = maildir:~/Maildir
first_valid_uid = 1
lmtp_save_to_detail_mailbox = no
protocol pop3 {
  pop3_uidl_format = %08Xu%08Xv
}
service pop3-login {
  inet_listener pop3 {
    address = 127.0.0.1
    port = $pop3
  }
  inet_listener pop3s {
    address = 127.0.0.1
    port = $pop3s
    ssl = yes
  }
}
service lmtp {
  inet_listener lmtp {
    address = 127.0.0.1
    port = $lmtp
  }
  unix_listener lmtp {
    mode = 0
  }
}
CONF
    # The daemon must not keep the caller's stdout open (a caller reading it to the end,
    # as Rust's Command::output does, would wait for Dovecot to exit); it logs to log_path.
    dovecot -c "$dir/dovecot.conf" </dev/null >>"$dir/dovecot.log" 2>&1
    for port in "$pop3" "$pop3s" "$lmtp"; do wait_port "$port"; done
    cat "$dir/run/master.pid"
    ;;
stop)
    pid="$(cat "$dir/run/master.pid" 2>/dev/null || true)"
    [ -n "$pid" ] || exit 0
    kill "$pid" 2>/dev/null || exit 0
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || exit 0
        sleep 0.1
    done
    echo "dovecot: master $pid still runs after 10 s" >&2
    exit 1
    ;;
*)
    echo "usage: dovecot.sh start DIR POP3_PORT POP3S_PORT LMTP_PORT | stop DIR" >&2
    exit 64
    ;;
esac
