#!/usr/bin/env bash
# A bounded fuzzing run: every target in fuzz/ for FUZZ_SECONDS (default 30) each, starting
# from the corpus kept in the repo (new inputs go to a scratch dir, so the committed corpus
# only changes by hand). A crash fails the run; its input is in fuzz/artifacts/<target>/ and
# belongs in a regression test. Needs nightly and cargo-fuzz (scripts/setup.sh installs both).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
secs="${FUZZ_SECONDS:-30}"
# The sanitizer build is the slow part (minutes): keep it outside the checkout, so a fresh
# clone on the same machine (CI) rebuilds only banger's own crates.
export CARGO_TARGET_DIR="${BANGER_FUZZ_TARGET_DIR:-$HOME/.cache/banger-fuzz-target}"
targets=(flatten_tar jsonrpc_lines agent_frames)
mkdir -p target
for target in "${targets[@]}"; do
  scratch="$(mktemp -d)"
  log="target/fuzz-$target.log"
  echo "fuzz.sh: $target for ${secs}s" >&2
  if ! (cd fuzz && cargo +nightly fuzz run -O "$target" "$scratch" "corpus/$target" -- \
        -max_total_time="$secs" -rss_limit_mb=2048 -max_len=65536) >"$log" 2>&1; then
    rm -rf "$scratch"
    tail -n 40 "$log" >&2
    echo "fuzz.sh: $target FAILED (input in fuzz/artifacts/$target/)" >&2
    exit 1
  fi
  rm -rf "$scratch"
  execs="$(grep -oE '^Done [0-9]+ runs' "$log" | tail -n 1 || true)"
  echo "fuzz.sh: $target ok: ${execs:-no summary}" >&2
done
