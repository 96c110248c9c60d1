#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 10; the CI smoke run gives 3) and prints how
# many executions each survived. `make fuzz` runs them longer (FUZZ_SECONDS, 600).
#   vmm/fuzz/run.sh [SECONDS] [TARGET...]
# Needs the nightly toolchain (cargo fuzz builds with sanitizer flags) and cargo-fuzz,
# which it installs once into ~/.cargo/bin. Corpora grow under target/fuzz-corpus (not
# committed); a crash leaves its input in vmm/fuzz/artifacts/<target>/ and fails.
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-10}
shift || true
toolchain=nightly
if ! cargo +"$toolchain" --version >/dev/null 2>&1; then
    echo "fuzz: the $toolchain toolchain is missing (rustup toolchain install $toolchain)" >&2
    exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz" >&2
    cargo install --locked cargo-fuzz >&2
fi
targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cargo +"$toolchain" fuzz list)
# One build for all targets; without ASan in the smoke run (Rust checks bounds; the
# build is minutes shorter), with it in longer runs.
sanitizer=address
[ "$seconds" -le 60 ] && sanitizer=none
cargo +"$toolchain" fuzz build -O -s "$sanitizer" >&2
corpora=../../target/fuzz-corpus
status=0
for t in "${targets[@]}"; do
    mkdir -p "$corpora/$t"
    log=$(mktemp)
    if cargo +"$toolchain" fuzz run -O -s "$sanitizer" "$t" "$corpora/$t" -- \
        -max_total_time="$seconds" -max_len=65536 -rss_limit_mb=2048 >"$log" 2>&1; then
        runs=$(grep -oE 'Done [0-9]+ runs' "$log" | tail -1 | grep -oE '[0-9]+' || echo "?")
        echo "fuzz: $t: $runs executions in ${seconds}s, no crash"
    else
        echo "fuzz: $t: FAILED" >&2
        tail -40 "$log" >&2
        status=1
    fi
    rm -f "$log"
done
exit $status
