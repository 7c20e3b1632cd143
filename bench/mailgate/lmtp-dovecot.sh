#!/usr/bin/env bash
# The Dovecot side of bench/mailgate/lmtp.sh: Dovecot 2.3's LMTP server (Debian packages
# dovecot-core and dovecot-lmtpd) in a private instance under a temporary directory,
# delivering to one maildir user, measured with the same smtp-source runs. Dovecot's
# defaults otherwise (mail_fsync = optimized: a delivery is fsynced before its 250).
#
#   bench/mailgate/lmtp-dovecot.sh
#
# Environment: MSGS (5000), SIZES ("10240 102400"), SESSIONS ("1 16"), PORT (22124).
# Bounded like lmtp.sh; the instance is stopped and removed at the end.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
MSGS="${MSGS:-5000}"
SIZES="${SIZES:-10240 102400}"
SESSIONS="${SESSIONS:-1 16}"
PORT="${PORT:-22124}"
for tool in dovecot smtp-source; do
    command -v "$tool" >/dev/null || { echo "$tool is required (dovecot-core, dovecot-lmtpd, postfix)" >&2; exit 1; }
done
[ -x /usr/lib/dovecot/lmtp ] || { echo "dovecot-lmtpd is required" >&2; exit 1; }

work="$(mktemp -d)"
chmod 755 "$work"
master=""
cleanup() {
    if [ -n "$master" ]; then kill "$master" 2>/dev/null || true; sleep 1; fi
    rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/run" "$work/mail"
chown dovenull:dovenull "$work/mail" 2>/dev/null || true
cat >"$work/dovecot.conf" <<CONF
instance_name = lmtpbench
base_dir = $work/run
state_dir = $work/state
log_path = $work/dovecot.log
protocols = lmtp
listen = 127.0.0.1
ssl = no
lmtp_save_to_detail_mailbox = no
passdb {
  driver = static
  args = nopassword=y
}
userdb {
  driver = static
  args = uid=$(id -u dovenull) gid=$(id -g dovenull) home=$work/mail/%u
}
mail_location = maildir:~/Maildir
first_valid_uid = 1
service lmtp {
  inet_listener lmtp {
    address = 127.0.0.1
    port = $PORT
  }
  unix_listener lmtp {
    mode = 0
  }
}
CONF
dovecot -c "$work/dovecot.conf"
sleep 1
master="$(cat "$work/run/master.pid")"
# All Dovecot processes: master, lmtp workers, auth, log, config, anvil.
server_rss() {
    ps -o rss= --ppid "$master" | awk -v m="$(ps -o rss= -p "$master")" '{t += $1} END {print t + m}'
}
# shellcheck source=bench/mailgate/lmtp-runs.sh
. "$HERE/lmtp-runs.sh"
echo "dovecot $(dovecot --version), $MSGS messages per run, $(nproc) cores"
lmtp_runs dovecot
count=$(find "$work/mail" -path '*/new/*' -type f | wc -l)
echo "stored: $count messages"
grep -m3 -i "error\|fatal" "$work/dovecot.log" || true
