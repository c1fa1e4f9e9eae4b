#!/usr/bin/env bash
# A/B benchmark of the local `vm run` path: this tree against a baseline revision, in one
# run, interleaved (A B B A ...) so that a noisy host shifts both sides alike. Issue 13 asks
# that `vm run` on a local daemon be no slower than before workspaces and imports were
# streamed over the connection: the baseline default is 0e1a317, the last revision before
# that work. Each side has its own daemon, XDG directories, guest agent and binaries, and
# gets the same kernel package and the same busybox OCI layout.
#
# Measured (cold boots under both: the baseline has no warm start):
#   vm run --rm -- true                 no workspace
#   vm run DIR --rm -- true             a 400-file workspace (streamed by this tree; read by
#                                       the baseline's daemon from its path)
# Prints medians per side and the ratio this/baseline (target <= 1.05).
#
# The baseline is built once into target/bench-baseline/<rev> (a git worktree with its own
# target directory; minutes the first time, cached after); the timed part takes about
# 4 x BENCH_RUNS cold boots.
#
# Environment: BENCH_RUNS (default 5), BENCH_BASELINE (default 0e1a317).
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${BENCH_RUNS:-5}
rev=${BENCH_BASELINE:-0e1a317}

. bench/lib.sh
./scripts/setup.sh >/dev/null
build_release

base_src=$PWD/target/bench-baseline/$rev
if [ ! -x "$base_src/target/release/banger" ] || [ ! -x "$base_src/target/release/banger-agent" ]; then
  echo "building baseline $rev into $base_src (once)" >&2
  if [ ! -d "$base_src" ]; then
    git worktree add -q --detach "$base_src" "$rev"
  fi
  (cd "$base_src" && build_release)
fi

work=$(mktemp -d)
cleanup() {
  for side in a b; do
    if [ -f "$work/$side.env" ]; then
      (. "$work/$side.env" && "$bin" daemon stop >/dev/null 2>&1) || true
    fi
  done
  rm -rf "$work"
}
trap cleanup EXIT

deb=$(./scripts/fetch-test-kernel.sh target/kernel)
build_busybox_oci "$work"
# The workspace: 400 small files in 20 directories, no git.
for d in $(seq 20); do
  mkdir -p "$work/ws/d$d"
  for f in $(seq 20); do head -c 2048 /dev/urandom >"$work/ws/d$d/f$f"; done
done

# Side a: the baseline; side b: this tree.
setup_side() {
  local side=$1 bin=$2
  local dir=$work/$side
  mkdir -p "$dir/config/banger" "$dir/runtime"
  chmod 0700 "$dir/runtime"
  printf 'vmm = "qemu"\nnetwork = "user"\n' >"$dir/config/banger/config.toml"
  cat >"$work/$side.env" <<EOF
export XDG_STATE_HOME=$dir/state XDG_CACHE_HOME=$dir/cache XDG_CONFIG_HOME=$dir/config XDG_RUNTIME_DIR=$dir/runtime
bin=$bin
EOF
  (
    . "$work/$side.env"
    "$bin" kernel import bench --deb "$deb" >/dev/null
    "$bin" image import "$work/oci:bb" --name bb >/dev/null
  )
}
setup_side a "$base_src/target/release/banger"
setup_side b "$PWD/target/release/banger"

# One timed cold run on `side` with the workspace `ws` ("" for none).
timed() {
  local side=$1 ws=$2 cold=()
  # Only this tree has warm starts; its cold path is what the baseline always runs.
  [ "$side" = b ] && cold=(--cold)
  (
    . "$work/$side.env"
    t0=$(now)
    if [ -n "$ws" ]; then
      "$bin" vm run "$ws" --rm "${cold[@]}" --image bb -- true >/dev/null
    else
      "$bin" vm run --rm "${cold[@]}" --image bb -- true >/dev/null
    fi
    t1=$(now)
    echo "$t1 - $t0" | bc
  )
}

for case in none workspace; do
  ws=""
  [ "$case" = workspace ] && ws=$work/ws
  a_times=()
  b_times=()
  echo "vm run ($case): $runs runs per side, interleaved" >&2
  for i in $(seq "$runs"); do
    if [ $((i % 2)) -eq 1 ]; then
      a_times+=("$(timed a "$ws")")
      b_times+=("$(timed b "$ws")")
    else
      b_times+=("$(timed b "$ws")")
      a_times+=("$(timed a "$ws")")
    fi
  done
  a=$(printf '%s\n' "${a_times[@]}" | median)
  b=$(printf '%s\n' "${b_times[@]}" | median)
  echo "all runs ($case): baseline ${a_times[*]} s; this tree ${b_times[*]} s"
  printf 'vm run, %-9s  baseline %s %.2f s  this tree %.2f s  ratio %.3f (target <= 1.05)\n' \
    "$case" "$rev" "$a" "$b" "$(echo "$b / $a" | bc -l)"
done
