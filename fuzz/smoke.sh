#!/usr/bin/env bash
# Run every fuzz target for SECONDS (default 30) from the committed corpus,
# with the nightly toolchain (or RUSTC_BOOTSTRAP=1 on the pinned one).
# New inputs go to a temporary folder; a crash fails the run and leaves its
# input under fuzz/artifacts/. Prints SKIPPED only when no toolchain can
# build sanitizer targets.
set -euo pipefail
cd "$(dirname "$0")"
seconds="${1:-30}"
export CARGO_TARGET_DIR="${DAI_FUZZ_TARGET_DIR:-/var/cache/dai-fuzz-target}"

if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  tc=(+nightly)
elif RUSTC_BOOTSTRAP=1 rustc -Z help >/dev/null 2>&1; then
  export RUSTC_BOOTSTRAP=1
  tc=()
else
  echo "SKIPPED fuzz smoke: no nightly toolchain and RUSTC_BOOTSTRAP=1 does not work on the pinned one"
  exit 0
fi

if ! command -v cargo-fuzz >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked --version 0.13.2 --quiet
fi

new=$(mktemp -d)
trap 'rm -rf "$new"' EXIT
cargo "${tc[@]}" fuzz build --release >/dev/null
for t in $(cargo "${tc[@]}" fuzz list); do
  mkdir -p "$new/$t"
  out=$(cargo "${tc[@]}" fuzz run "$t" "$new/$t" "corpus/$t" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -print_final_stats=1 2>&1) || {
    printf '%s\n' "$out" | tail -40
    echo "FUZZ CRASH in $t (input under fuzz/artifacts/$t)"
    exit 1
  }
  runs=$(printf '%s\n' "$out" | sed -n 's/^stat::number_of_executed_units: *//p' | tail -1)
  printf 'fuzz %-12s %8s executions in %s s, no crash\n' "$t" "${runs:-?}" "$seconds"
done
