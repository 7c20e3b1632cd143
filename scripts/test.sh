#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs the tools the tests drive
# (curl, python3, openssl, fetchmail, mpop, redis-server; promtool and prometheus from
# Debian's prometheus package; postfix and swaks; node and npm, and the npm packages
# that validate the Grafana dashboard and generate the chart README's parameters table,
# into the gitignored .tools/npm; the pinned Python packages that check the Helm chart,
# into the gitignored .tools/venv; cargo-audit, into the gitignored .tools/cargo-audit)
# when missing, then formatting, lints, every test, the offline dependency audit and a
# bounded run of every fuzz target (scripts/fuzz.sh; g++ for libFuzzer's sources).
# Used by the README and by .ci/run; the integration tests fail (never skip) when a tool
# is still missing, in CI and anywhere else.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v fetchmail >/dev/null 2>&1 || need+=(fetchmail)
command -v mpop >/dev/null 2>&1 || need+=(mpop)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v python3 >/dev/null 2>&1 || need+=(python3)
# The Helm chart checks run in a venv (Debian's python3 needs python3-venv for it).
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need+=(python3-venv)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
# libfuzzer-sys builds libFuzzer's C++ sources for scripts/fuzz.sh.
command -v c++ >/dev/null 2>&1 || need+=(g++)
# The replica tests start their own redis-server on free ports; a service the package may
# start on 6379 is not used. Likewise the metrics test starts its own prometheus on a free
# port.
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
{ command -v promtool && command -v prometheus; } >/dev/null 2>&1 || need+=(prometheus)
command -v node >/dev/null 2>&1 || need+=(nodejs)
command -v npm >/dev/null 2>&1 || need+=(npm)
# The LMTP tests run private Postfix instances (their own config, queue and ports) and
# never the system one: preseeded "No configuration", the package writes no main.cf, so
# no system MTA starts on port 25. swaks needs Net::SSLeay for STARTTLS and
# IO::Socket::INET6 for ::1.
command -v postfix >/dev/null 2>&1 || need+=(postfix)
command -v swaks >/dev/null 2>&1 || need+=(swaks)
perl -MNet::SSLeay -e1 >/dev/null 2>&1 || need+=(libnet-ssleay-perl)
perl -MIO::Socket::INET6 -e1 >/dev/null 2>&1 || need+=(libio-socket-inet6-perl)
# The Dovecot import test (tests/integration/import.rs) runs a private Dovecot 2.3
# (tests/dovecot/dovecot.sh: its own config, base_dir and loopback ports), never the
# system one: policy-rc.d refuses every service start during the install.
command -v dovecot >/dev/null 2>&1 || need+=(dovecot-core)
[ -x /usr/lib/dovecot/pop3 ] || need+=(dovecot-pop3d)
[ -x /usr/lib/dovecot/lmtp ] || need+=(dovecot-lmtpd)
if ((${#need[@]})); then
    echo "installing: ${need[*]}"
    if [ "$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi
    export DEBIAN_FRONTEND=noninteractive
    echo "postfix postfix/main_mailer_type select No configuration" | $sudo debconf-set-selections
    policy=/usr/sbin/policy-rc.d
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
        $sudo chmod 755 "$policy"
        trap '$sudo rm -f "$policy"' EXIT
    fi
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq --no-install-recommends "${need[@]}"
    if [ "$(cat "$policy" 2>/dev/null)" = "$(printf '#!/bin/sh\nexit 101')" ]; then
        $sudo rm -f "$policy"
        trap - EXIT
    fi
fi
for tool in c++ curl python3 openssl fetchmail mpop redis-server promtool prometheus node npm \
    postfix postconf postqueue swaks dovecot doveadm /usr/lib/dovecot/pop3 \
    /usr/lib/dovecot/lmtp; do
    command -v "$tool" >/dev/null || { echo "missing required tool: $tool" >&2; exit 1; }
done
for module in Net::SSLeay IO::Socket::INET6; do
    perl "-M$module" -e1 || { echo "missing required perl module: $module" >&2; exit 1; }
done

# The dashboard's schema comes from Grafana's own types, and the chart README's
# parameters table from Bitnami's readme generator; versions are pinned so the checks do
# not change under us. Reinstalled when the pins change.
npm_pins="@grafana/schema@13.2.3 ts-json-schema-generator@2.4.0 ajv@8.20.0 @bitnami/readme-generator-for-helm@2.7.2"
npm_dir=.tools/npm
if [ "$(cat "$npm_dir/.pins" 2>/dev/null)" != "$npm_pins" ]; then
    echo "installing into $npm_dir: $npm_pins"
    rm -rf "$npm_dir"
    mkdir -p "$npm_dir"
    # shellcheck disable=SC2086 # the pins are separate words
    npm install --prefix "$npm_dir" --no-audit --no-fund --loglevel=error $npm_pins
    echo "$npm_pins" >"$npm_dir/.pins"
fi

# The chart checks (tests/helm/check_chart.py) use Helm's Go SDK and the Kubernetes
# schemas from PyPI, pinned in tests/helm/requirements.txt. Reinstalled when it changes.
py_dir=.tools/venv
py_pins=$(sha256sum tests/helm/requirements.txt)
if [ "$(cat "$py_dir/.pins" 2>/dev/null)" != "$py_pins" ]; then
    echo "installing into $py_dir: tests/helm/requirements.txt"
    rm -rf "$py_dir"
    python3 -m venv "$py_dir"
    "$py_dir/bin/pip" install --quiet --disable-pip-version-check -r tests/helm/requirements.txt
    echo "$py_pins" >"$py_dir/.pins"
fi

# The dependency audit: cargo-audit, pinned, offline against the RustSec snapshot in
# ../shared/advisory-db (MAILGATE_ADVISORY_DB overrides), with the accepted warnings in
# .cargo/audit.toml (explained in docs/SECURITY.md). It is built once into the gitignored
# .tools/cargo-audit; that build takes about 9 minutes of CPU, so on a fresh machine it
# runs in the background at the lowest priority while the tests below run and leave the
# cores idle much of the time, and is waited for at the end.
audit_pin="cargo-audit 0.22.2"
audit_dir=.tools/cargo-audit
audit_db="${MAILGATE_ADVISORY_DB:-../shared/advisory-db}"
[ -d "$audit_db/crates" ] || { echo "missing RustSec advisory database: $audit_db" >&2; exit 1; }
audit_build=""
if [ "$(cat "$audit_dir/.pins" 2>/dev/null)" != "$audit_pin" ]; then
    echo "building $audit_pin into $audit_dir in the background"
    rm -rf "$audit_dir"
    mkdir -p "$audit_dir"
    # In its own session, so that a failing run below stops the whole build with it.
    AUDIT_DIR="$audit_dir" AUDIT_PIN="$audit_pin" setsid bash -c '
        CARGO_TARGET_DIR="$AUDIT_DIR/target" nice -n 19 cargo install --locked --quiet \
            --no-default-features --root "$AUDIT_DIR" --version "${AUDIT_PIN#* }" cargo-audit &&
            rm -rf "$AUDIT_DIR/target" && echo "$AUDIT_PIN" >"$AUDIT_DIR/.pins"
    ' >"$audit_dir/install.log" 2>&1 &
    audit_build=$!
    trap 'kill -- "-$audit_build" 2>/dev/null || true' EXIT
fi

cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --all-targets --locked

# Every fuzz target for a bounded time on the stable toolchain, reusing the dependencies
# just built (docs/SECURITY.md, "Fuzzing"). libFuzzer is compiled from libfuzzer-sys's
# bundled sources by the system C++ compiler. Before the audit, so that a cargo-audit
# build still under way keeps using the core a fuzzer leaves.
./scripts/fuzz.sh

if [ -n "$audit_build" ]; then
    wait "$audit_build" || { cat "$audit_dir/install.log" >&2; echo "cargo-audit build failed" >&2; exit 1; }
fi
"$audit_dir/bin/cargo-audit" audit --db "$audit_db"
"$audit_dir/bin/cargo-audit" audit --db "$audit_db" --file fuzz/Cargo.lock
