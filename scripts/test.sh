#!/usr/bin/env bash
# The whole test suite: formatting, lints, then every test against real tools.
# BANGER_TEST_STRICT=1 (what .ci/run sets) turns a test that cannot run its subject into a
# failure; otherwise it skips loudly, and the summary at the end lists every skip and why.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
# The CLI tests start bangerd from next to the banger binary: build both first.
cargo build --workspace --bins
mkdir -p target
export BANGER_SKIP_LOG="$PWD/target/test-skips.log"
: >"$BANGER_SKIP_LOG"
summary() {
  if [ -s "$BANGER_SKIP_LOG" ]; then
    echo "test.sh: $(wc -l <"$BANGER_SKIP_LOG") skipped (BANGER_TEST_STRICT=${BANGER_TEST_STRICT:-0}):"
    sed 's/^/  skipped: /' "$BANGER_SKIP_LOG"
  else
    echo "test.sh: nothing skipped"
  fi
}
trap summary EXIT
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast 2>&1 | tee target/nextest.log
  cargo test --workspace --doc
else
  cargo test --workspace --no-fail-fast
fi
# A bounded fuzzing run (a few minutes in all); FUZZ_SECONDS=0 skips it.
if [ "${FUZZ_SECONDS:-30}" != 0 ]; then
  ./scripts/fuzz.sh
fi
# The run's closing line: the nextest counts (the doc-test and fuzz output above end otherwise).
if [ -f target/nextest.log ]; then
  counts=$(grep -oE '[0-9]+ tests run: [0-9]+ passed' target/nextest.log | tail -n 1 | grep -oE '[0-9]+ passed' || true)
  # Reaching this line means nextest exited 0: nothing failed.
  if [ -n "$counts" ]; then echo "test.sh: $counts, 0 failed"; fi
fi
