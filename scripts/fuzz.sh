#!/usr/bin/env bash
# Fuzzes every decoder of bytes from the network, the local sockets and the lease journal
# (fuzz/fuzz_targets/) for a bounded time each. See --help.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
  cat <<'EOF'
Usage: scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]

Replays the committed corpus through every fuzz check (stable toolchain), then builds the
fuzz targets with cargo-fuzz on the nightly toolchain and runs each for SECONDS_PER_TARGET
seconds (default 10, what CI runs), or only the TARGETs named. Prints one line per target
(runs, runs/s) and ends with "N passed, N failed".

Exit status: 0 all held; 1 a target crashed (its input is saved under fuzz/artifacts/TARGET/;
reproduce with `cargo +nightly fuzz run TARGET fuzz/artifacts/TARGET/crash-...`); 77 fuzzing
SKIPPED because there is no nightly toolchain (the corpus replay still ran).

Installs cargo-fuzz (cargo install --locked) when it is missing. Builds go to fuzz/target.
Longer runs: scripts/fuzz.sh 600, or one target for an hour:
  cargo +nightly fuzz run control -- -max_total_time=3600
EOF
}

secs=10
case "${1:-}" in
  -h | --help) usage; exit 0 ;;
  '') ;;
  *[!0-9]* | 0) echo "fuzz.sh: SECONDS_PER_TARGET must be a positive integer, not '$1' (see --help)" >&2; exit 2 ;;
  *) secs=$1 ;;
esac
(($#)) && shift
started=$SECONDS
target_dir="$PWD/fuzz/target"
logs="$target_dir/logs"
mkdir -p "$logs"

# Runs a step with its output in a log, shown only if the step fails.
step() {
  local log="$logs/$1.log"
  shift
  "$@" >"$log" 2>&1 || {
    local rc=$?
    tail -n 40 "$log" | sed 's/^/    /'
    echo "fuzz: FAILED: $* (exit $rc; log $log)"
    echo "fuzz: 0 passed, 1 failed"
    exit 1
  }
}

# The checks' own tests, and every committed input (seeds, found-*) through its check: these
# need no nightly, so they run even where fuzzing is skipped.
echo "fuzz: replaying the committed corpus (cargo test in fuzz/, stable)"
step replay cargo test --manifest-path fuzz/Cargo.toml --no-default-features --target-dir "$target_dir"
grep -E "^test result" "$logs/replay.log" | head -n 1 | sed "s/^/fuzz: /; s/\$/ ($((SECONDS - started)) s with the build)/"

if ! command -v rustup >/dev/null || ! rustup toolchain list | grep -q '^nightly'; then
  echo "fuzz: SKIPPED: no nightly Rust toolchain (cargo-fuzz needs one: rustup toolchain install nightly)"
  exit 77
fi
if ! command -v cargo-fuzz >/dev/null; then
  echo "fuzz: installing cargo-fuzz"
  install_started=$SECONDS
  step install cargo install --locked cargo-fuzz
  echo "fuzz: installed cargo-fuzz in $((SECONDS - install_started)) s"
fi

targets=("$@")
if ((${#targets[@]} == 0)); then
  mapfile -t targets < <(cargo +nightly fuzz list)
fi
# One build for every target (cargo fuzz builds one or all).
build=()
((${#targets[@]} == 1)) && build=("${targets[0]}")
echo "fuzz: building ${build[*]:-every target} (nightly, cargo fuzz build)"
build_started=$SECONDS
step build cargo +nightly fuzz build --target-dir "$target_dir" "${build[@]}"
echo "fuzz: build took $((SECONDS - build_started)) s; running each target for ${secs} s"

passed=0
failed=0
for t in "${targets[@]}"; do
  log="$logs/$t.log"
  rc=0
  cargo +nightly fuzz run --target-dir "$target_dir" "$t" -- \
    -max_total_time="$secs" -timeout=10 -print_final_stats=1 >"$log" 2>&1 || rc=$?
  runs=$(sed -n 's/^Done \([0-9]*\) runs in \([0-9]*\) second.*/\1 \2/p' "$log" | tail -n 1)
  if [ "$rc" = 0 ] && [ -n "$runs" ]; then
    read -r n s <<<"$runs"
    printf 'fuzz: %-14s ok      %10d runs in %3d s (%d/s)\n' "$t" "$n" "$s" "$((n / (s > 0 ? s : 1)))"
    passed=$((passed + 1))
  else
    printf 'fuzz: %-14s FAILED  (exit %s; log %s)\n' "$t" "$rc" "$log"
    grep -E -A1 "panicked at" "$log" | head -n 4 | sed 's/^/    /' || true
    grep -E "^SUMMARY" "$log" | head -n 1 | sed 's/^/    /' || true
    artifact=$(sed -n 's/.*Test unit written to //p' "$log" | tail -n 1)
    [ -z "$artifact" ] || echo "    reproduce: cargo +nightly fuzz run $t $artifact"
    failed=$((failed + 1))
  fi
done
echo "fuzz: $((SECONDS - started)) s in all"
echo "fuzz: $passed passed, $failed failed"
((failed == 0))
