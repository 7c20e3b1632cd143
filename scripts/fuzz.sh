#!/usr/bin/env bash
# Builds the libFuzzer targets in fuzz/ on the stable toolchain and runs each for a bounded
# time, one after the other: scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
# (default 8 s each, every target). Each run starts from the committed seeds
# (fuzz/seeds/<target>/) and grows its corpus in a temporary directory; RSS, per-input
# time and input length (libFuzzer's default: 4096 octets or the largest seed) are
# bounded. Prints per target: executions, exec/s, corpus size (units) and crashes.
# Fails if any target crashes, times out or runs out of memory; the input that did it
# is kept under <target dir>/fuzz-artifacts/<target>/, to replay with
# `<target dir>/debug/<target> FILE`.
# scripts/fuzz.sh --seeds rewrites fuzz/seeds/ from fuzz/examples/seeds.rs.
#
# The targets are plain `cargo build` binaries of the fuzz crate: scripts/fuzz-rustc adds
# the coverage instrumentation to mailgate and the targets only, and the fuzz crate uses
# the main build's target dir and dev profile, so the dependencies the main tests built
# are reused (a cold build compiles them too).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
target_dir=${CARGO_TARGET_DIR:-$root/target}
case "$target_dir" in /*) ;; *) target_dir=$root/$target_dir ;; esac

build() {
    (cd fuzz && RUSTC_WRAPPER="$root/scripts/fuzz-rustc" CARGO_TARGET_DIR="$target_dir" \
        cargo build --locked "$@")
}

if [ "${1:-}" = "--seeds" ]; then
    build --example seeds
    rm -rf fuzz/seeds
    "$target_dir/debug/examples/seeds" fuzz/seeds
    find fuzz/seeds -type f | sort
    exit 0
fi

seconds=${1:-8}
shift || true
if (($#)); then
    targets=("$@")
else
    mapfile -t targets < <(sed -n 's/^name = "\(.*\)"$/\1/p' fuzz/Cargo.toml | grep -v '^mailgate-fuzz$')
fi

start=$(date +%s)
build --bins
echo "fuzz build: $(($(date +%s) - start)) s"

# A figure libFuzzer printed at the end, "-" when it stopped first (a crash).
stat() {
    local v
    v=$(sed -n "s/^stat::$1: *//p" "$work/$t.log")
    echo "${v:--}"
}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
failed=()
printf '%-18s %12s %9s %8s %8s\n' target executions exec/s corpus crashes
for t in "${targets[@]}"; do
    artifacts=$target_dir/fuzz-artifacts/$t
    rm -rf "$artifacts"
    mkdir -p "$work/$t" "$artifacts"
    status=0
    # 1 GiB of RSS and malloc at most, 10 s per input, seeds read from their own dir.
    "$target_dir/debug/$t" "$work/$t" "fuzz/seeds/$t" \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=1024 -malloc_limit_mb=1024 \
        -print_final_stats=1 -artifact_prefix="$artifacts/" >"$work/$t.log" 2>&1 || status=$?
    crashes=$(find "$artifacts" -type f | wc -l)
    # libFuzzer's own count: the seeds it kept plus what it found.
    corpus=$(grep -oE 'corp: [0-9]+' "$work/$t.log" | tail -n 1 | cut -d' ' -f2 || true)
    printf '%-18s %12s %9s %8s %8s\n' "$t" "$(stat number_of_executed_units)" \
        "$(stat average_exec_per_sec)" "${corpus:--}" "$crashes"
    if [ "$status" -ne 0 ] || [ "$crashes" -ne 0 ]; then
        failed+=("$t")
        echo "--- $t failed (exit $status); its log ends:" >&2
        tail -n 40 "$work/$t.log" >&2
        find "$artifacts" -type f >&2
    fi
done
echo "fuzzing: ${#targets[@]} targets, ${seconds} s each, $(($(date +%s) - start)) s in all"
if ((${#failed[@]})); then
    echo "fuzz targets failed: ${failed[*]}" >&2
    exit 1
fi
