# Sourced by run.sh and cluster.sh: the noise rule shared by their runs.
#
#   host_busy_1s   percent of host CPU busy over one second (/proc/stat)
#   wait_quiet     sleeps 1 s, then waits (up to QUIET_WAIT=180 s) until the host is at most
#                  QUIET_PCT=15 % busy; sets QUIET_PRE (the last reading) and QUIET_WAITED (s)

host_busy_1s() { python3 -c '
import time
def r():
    v=[int(x) for x in open("/proc/stat").readline().split()[1:9]]
    return sum(v), v[3]+v[4]
t0,i0=r(); time.sleep(1); t1,i1=r()
print("%.0f" % (100*(1-(i1-i0)/max(1,t1-t0))))'; }

wait_quiet() {
  sleep 1
  QUIET_WAITED=0
  QUIET_PRE=$(host_busy_1s)
  while [ "$QUIET_PRE" -gt "${QUIET_PCT:-15}" ] && [ "$QUIET_WAITED" -lt "${QUIET_WAIT:-180}" ]; do
    QUIET_WAITED=$((QUIET_WAITED + 1)); QUIET_PRE=$(host_busy_1s)
  done
}
