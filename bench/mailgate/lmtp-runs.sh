# shellcheck shell=bash
# Sourced by lmtp.sh and lmtp-dovecot.sh: the measured part, identical for both servers.
# Needs PORT, MSGS, SIZES, SESSIONS, and a function `server_rss` printing the server's
# RSS in KiB; `lmtp_runs LABEL` waits for the port, then prints one line per run.

lmtp_runs() {
    local label=$1 size s start end
    for _ in $(seq 50); do
        (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
        sleep 0.1
    done
    for size in $SIZES; do
        for s in $SESSIONS; do
            start=$(date +%s.%N)
            # -L LMTP, -d keep the connection for the next message, -s parallel sessions.
            smtp-source -L -d -s "$s" -m "$MSGS" -l "$size" -f bench@example.net \
                -t user0@example.com "127.0.0.1:$PORT"
            end=$(date +%s.%N)
            awk -v n="$MSGS" -v a="$start" -v b="$end" -v sz="$size" -v s="$s" \
                -v rss="$(server_rss)" -v label="$label" \
                'BEGIN { t = b - a; printf "size %7d B  sessions %3d  %6.0f msg/s  %7.1f MB/s  %.2f s  %s RSS %d KiB\n", sz, s, n / t, n * sz / t / 1e6, t, label, rss }'
        done
    done
}
