#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs the tools the tests drive
# (curl, python3, openssl, fetchmail, mpop, redis-server) when missing, then formatting, lints
# and every test. Used by the README and by .ci/run; the integration tests fail (never skip)
# when a tool is still missing, in CI and anywhere else.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v fetchmail >/dev/null 2>&1 || need+=(fetchmail)
command -v mpop >/dev/null 2>&1 || need+=(mpop)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v python3 >/dev/null 2>&1 || need+=(python3)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
# The replica tests start their own redis-server on free ports; a service the package may
# start on 6379 is not used.
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
if ((${#need[@]})); then
    echo "installing: ${need[*]}"
    if [ "$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
for tool in curl python3 openssl fetchmail mpop redis-server; do
    command -v "$tool" >/dev/null || { echo "missing required tool: $tool" >&2; exit 1; }
done

cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --all-targets --locked
