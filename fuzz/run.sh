#!/usr/bin/env bash
# Bounded libFuzzer run of every cargo-fuzz target on the stable toolchain (no sanitizer:
# `--sanitizer none`, Rust's own bounds and overflow checks plus debug assertions catch the
# bugs; -Zsanitizer would need nightly). Usage: fuzz/run.sh SECONDS_PER_TARGET.
# Starts from a copy of the committed corpus (fuzz/corpus/TARGET), prints each target's
# execution count, and fails on the first crash (the input is left in fuzz/artifacts/).
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-30}
cargo fuzz build --sanitizer none -O
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for t in header_and_extensions bitmap_directory bitmap_table open_cycle; do
    cp -r "corpus/$t" "$work/$t"
    log="$work/$t.log"
    if ! cargo fuzz run --sanitizer none -O "$t" "$work/$t" -- \
            -max_total_time="$secs" -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1; then
        tail -50 "$log"
        echo "fuzz target $t: CRASH"
        exit 1
    fi
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')
    echo "fuzz target $t: $runs executions in ${secs}s, no crash"
done
