#!/usr/bin/env bash
# Pull benchmark: `banger image pull` of a realistic image (Debian bookworm minbase + dev tools,
# two gzip layers, 241 MiB compressed, ~540 MB / ~16,200 files unpacked) from a local
# docker-registry, against the chain of standard tools doing the same work: skopeo copy +
# umoci raw unpack + mkfs.ext4 -d.
#
#   bench/pull.sh            # from the repo root; needs root (apt-get, drop_caches, debootstrap)
#
# The image is built once (several minutes: debootstrap + apt-get in a chroot) and cached
# under target/bench-image/layout-recommends; delete that directory to rebuild it. Release binaries go to
# ${CARGO_TARGET_DIR:-target}. Scratch space is under ${TMPDIR:-/tmp}: keep it on the same
# filesystem for both sides. Page caches are dropped once before each baseline chain and before
# each banger pull.
#
# Each side runs BENCH_RUNS times (default 3; cold and warm pulls alternate) and the medians
# are compared: the machine is shared and single runs vary by +-50%.
#
# Environment: BENCH_RUNS (default 3), BENCH_IMAGE_DIR (default target/bench-image/layout-recommends),
# BENCH_KEEP=1 keeps the scratch directory for inspection.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
# shellcheck source=pull/lib.sh
source bench/pull/lib.sh

[ "$(id -u)" -eq 0 ] || die "run as root (apt-get, debootstrap, drop_caches)"
ensure_packages skopeo umoci docker-registry e2fsprogs jq curl python3 debootstrap

script_started=$(now)

# --- 1. The image (cached) ---------------------------------------------------------------------
image_dir=${BENCH_IMAGE_DIR:-target/bench-image/layout-recommends}
bench/pull/build-image.sh "$image_dir"
image_dir=$(realpath "$image_dir")

# --- 2. Binaries, registry, push ---------------------------------------------------------------
target_dir=${CARGO_TARGET_DIR:-target}
case "$target_dir" in /*) ;; *) target_dir="$repo/$target_dir" ;; esac
log "cargo build --release -p banger -p bangerd (target dir $target_dir)"
CARGO_TARGET_DIR="$target_dir" cargo build --release --quiet -p banger -p bangerd
banger_bin="$target_dir/release/banger"
[ -x "$banger_bin" ] && [ -x "$target_dir/release/bangerd" ] || die "release binaries missing in $target_dir/release"

scratch=$(mktemp -d "${TMPDIR:-/tmp}/banger-pull-bench.XXXXXX")
registry_pid=""
daemon_up=""
cleanup() {
  local rc=$?
  set +e
  if [ -n "$daemon_up" ]; then
    bngr daemon stop >/dev/null 2>&1
  fi
  if [ -n "$registry_pid" ]; then
    kill "$registry_pid" 2>/dev/null
    wait "$registry_pid" 2>/dev/null
  fi
  if [ "${BENCH_KEEP:-}" = 1 ]; then
    log "kept scratch directory $scratch"
  else
    rm -rf "$scratch"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# banger with its own state, cache and config under the scratch directory.
mkdir -p "$scratch/xdg/state" "$scratch/xdg/cache" "$scratch/xdg/config"
bngr() {
  XDG_STATE_HOME="$scratch/xdg/state" XDG_CACHE_HOME="$scratch/xdg/cache" \
    XDG_CONFIG_HOME="$scratch/xdg/config" BANGERD_LOG="${BANGERD_LOG:-info,banger_rootfs=debug}" \
    "$banger_bin" "$@"
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Debian's docker-registry on a free 127.0.0.1 port, storage under the scratch directory.
# Retried on a fresh port if it does not come up (another process may take the port first).
start_registry() {
  local attempt port deadline code
  mkdir -p "$scratch/registry"
  for attempt in 1 2 3 4 5; do
    port=$(free_port)
    cat >"$scratch/registry/config.yml" <<EOF
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $scratch/registry/storage
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$port
EOF
    docker-registry serve "$scratch/registry/config.yml" >"$scratch/registry/log" 2>&1 &
    registry_pid=$!
    deadline=$((SECONDS + 10))
    while [ $SECONDS -lt $deadline ] && kill -0 "$registry_pid" 2>/dev/null; do
      code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/v2/" || true)
      if [ "$code" = 200 ]; then
        registry_port=$port
        return 0
      fi
      sleep 0.05
    done
    kill "$registry_pid" 2>/dev/null || true
    wait "$registry_pid" 2>/dev/null || true
    registry_pid=""
    log "registry did not come up on port $port (attempt $attempt)"
  done
  tail -n 20 "$scratch/registry/log" >&2
  die "docker-registry did not start"
}

# skopeo with no user auth files and no shared state that could make it skip work.
skopeo_clean() {
  HOME="$scratch/skopeo-home" DOCKER_CONFIG="$scratch/skopeo-home" XDG_RUNTIME_DIR="$scratch/skopeo-home" \
    skopeo --insecure-policy "$@"
}
mkdir -p "$scratch/skopeo-home"

start_registry
ref="127.0.0.1:$registry_port/bench:full"
log "registry on 127.0.0.1:$registry_port; pushing the image"
skopeo_clean copy --quiet --preserve-digests --dest-tls-verify=false "oci:$image_dir:full" "docker://$ref"

manifest_digest=$(jq -r '.manifests[] | select(.annotations["org.opencontainers.image.ref.name"] == "full") | .digest' "$image_dir/index.json")
manifest="$image_dir/blobs/${manifest_digest/://}"
layer_count=$(jq '.layers | length' "$manifest")
layer_bytes=$(jq '[.layers[].size] | add' "$manifest")

# What the two root filesystems are compared on: ext4 inodes in use, and name, mode, owner and
# size (directories: name, mode, owner) of every entry of a few directories, read with debugfs.
compare_dirs=(/ /etc /usr/bin /usr/sbin /usr/lib/x86_64-linux-gnu /var/lib/dpkg/info)
# Inodes in use minus the 10 reserved ones (the root directory is one of them).
used_inodes() {
  dumpe2fs -h "$1" 2>/dev/null | awk -F: '/^Inode count:/ { t = $2 } /^Free inodes:/ { f = $2 } END { print t - f - 10 }'
}
# `debugfs ls -p` prints /inode/mode/uid/gid/name/size/ per entry.
listing() {
  debugfs -R "ls -p $2" "$1" 2>/dev/null |
    awk -F/ 'NF > 5 && $6 != "." && $6 != ".." { if ($3 ~ /^4/) $7 = "-"; print $6, $3, $4, $5, $7 }' | sort
}

# --- 3. Baseline: skopeo copy + umoci raw unpack + mkfs.ext4 -d ---------------------------------
runs=${BENCH_RUNS:-3}
# median of the arguments (the lower middle one for an even count)
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

base="$scratch/baseline"
base_totals=() base_runs=()
for ((run = 1; run <= runs; run++)); do
  rm -rf "$base"
  mkdir -p "$base"
  log "baseline run $run/$runs: skopeo copy, umoci raw unpack, mkfs.ext4 -d"
  # Caches are dropped once, before the chain, as before each banger pull: what one step
  # writes, the next reads from the page cache, as it would for a user running the chain.
  drop_caches
  t0=$(now)
  skopeo_clean copy --quiet --src-tls-verify=false "docker://$ref" "oci:$base/oci:full"
  t1=$(now)
  t_skopeo=$(elapsed "$t0" "$t1")

  t0=$(now)
  umoci raw unpack --image "$base/oci:full" "$base/rootfs" >/dev/null 2>"$scratch/umoci.err" ||
    { cat "$scratch/umoci.err" >&2; die "umoci raw unpack failed"; }
  t1=$(now)
  t_umoci=$(elapsed "$t0" "$t1")

  t0=$(now)
  content_bytes=$(du -s --apparent-size -B1 "$base/rootfs" | cut -f1)
  img_bytes=$((content_bytes / 2 * 3))
  [ "$img_bytes" -ge $((1 << 30)) ] || img_bytes=$((1 << 30))
  img_bytes=$(((img_bytes + (1 << 20) - 1) >> 20 << 20))
  truncate -s "$img_bytes" "$base/rootfs.ext4"
  mkfs.ext4 -q -F -d "$base/rootfs" -E root_owner=0:0 "$base/rootfs.ext4"
  t1=$(now)
  t_mkfs=$(elapsed "$t0" "$t1")
  total=$(awk -v a="$t_skopeo" -v b="$t_umoci" -v c="$t_mkfs" 'BEGIN { printf "%.2f", a + b + c }')
  base_totals+=("$total")
  base_runs+=("skopeo $t_skopeo s + umoci $t_umoci s + mkfs $t_mkfs s = $total s")
done
t_base=$(median "${base_totals[@]}")
for ((i = 0; i < runs; i++)); do
  [ "${base_totals[$i]}" = "$t_base" ] && { base_median_run=${base_runs[$i]}; break; }
done

base_entries=$(find "$base/rootfs" | wc -l)
base_inodes=$(used_inodes "$base/rootfs.ext4")
for d in "${compare_dirs[@]}"; do
  listing "$base/rootfs.ext4" "$d" >"$scratch/base-ls-${d//\//_}"
done
# Free the baseline's disk space (and its page cache) before banger runs.
rm -rf "$base"

# --- 4. banger cold and warm, alternating -------------------------------------------------------
log "banger: starting the daemon (not timed)"
daemon_up=1
bngr image cache prune --dry-run >/dev/null
daemon_pid=$(bngr --json daemon status | jq -r '.daemon.pid')
daemon_log="$scratch/xdg/state/banger/bangerd.log"

cold_times=() warm_times=()
for ((run = 1; run <= runs; run++)); do
  log "banger run $run/$runs: cold pull (empty layer cache), then warm pull (layers cached)"
  bngr image cache prune >/dev/null
  drop_caches
  t0=$(now)
  bngr image pull "$ref" --name "cold$run" >"$scratch/pull-cold.out"
  t1=$(now)
  cold_times+=("$(elapsed "$t0" "$t1")")
  bngr image rm "cold$run" >/dev/null

  drop_caches
  t0=$(now)
  bngr image pull "$ref" --name warm >"$scratch/pull-warm.out"
  t1=$(now)
  warm_times+=("$(elapsed "$t0" "$t1")")
  [ "$run" -eq "$runs" ] || bngr image rm warm >/dev/null
done
t_cold=$(median "${cold_times[@]}")
t_warm=$(median "${warm_times[@]}")

# ext4 writing time inside each timed pull, from bangerd's debug log (Duration's Debug format).
banger_ext4_write=$(grep 'built rootfs' "$daemon_log" | grep -o 'write=[0-9.]*[a-zµ]*s' |
  awk -F= '{ v = $2; u = v; sub(/[0-9.]+/, "", u); sub(/[a-zµ]+$/, "", v)
             printf "%.2f\n", v * (u == "ms" ? 0.001 : u == "µs" ? 0.000001 : 1) }')
# shellcheck disable=SC2086 # one number a line
banger_ext4_write_median=$(median $banger_ext4_write)
rss_kib=$(awk '/^VmHWM:/ { print $2 }' "/proc/$daemon_pid/status")

# --- 5. Sanity: banger's rootfs has the same content as the baseline's ---------------------------
info=$(bngr --json image show warm)
rootfs=$(jq -r '.rootfs' <<<"$info")
banger_size=$(jq -r '.size_bytes' <<<"$info")
banger_inodes=$(used_inodes "$rootfs")
problems=()
for f in /usr/bin/gcc /usr/bin/git /usr/bin/python3 /usr/sbin/sshd; do
  debugfs -R "stat $f" "$rootfs" 2>&1 | grep -q '^Inode:' || problems+=("$f missing")
done
[ "$banger_inodes" -eq "$base_inodes" ] || problems+=("inodes in use: banger $banger_inodes, baseline $base_inodes")
compared=0
for d in "${compare_dirs[@]}"; do
  listing "$rootfs" "$d" >"$scratch/banger-ls-${d//\//_}"
  compared=$((compared + $(wc -l <"$scratch/banger-ls-${d//\//_}")))
  if ! diff -q "$scratch/base-ls-${d//\//_}" "$scratch/banger-ls-${d//\//_}" >/dev/null; then
    problems+=("$d differs: $(diff "$scratch/base-ls-${d//\//_}" "$scratch/banger-ls-${d//\//_}" | grep '^[<>]' | head -n 3 | tr '\n' ';')")
  fi
done

# --- 6. Phases of a cold pull, from the daemon's progress notifications (not the timed runs) -----
bngr image rm warm >/dev/null
bngr image cache prune >/dev/null
drop_caches
phases=$(python3 bench/pull/phases.py "$scratch/xdg/state/banger/bangerd.sock" "$ref" phases 2>&1) || phases="failed: $phases"
build_line=$(grep 'built rootfs' "$daemon_log" | tail -n 1 | grep -o 'write=[^ ]*' || true)

# --- Report ---------------------------------------------------------------------------------------
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
verdict() { awk -v r="$1" -v t="$2" 'BEGIN { print (r <= t ? "ok" : "MISSED") }'; }
r_cold=$(ratio "$t_cold" "$t_base")
r_warm=$(ratio "$t_warm" "$t_base")
rss_mib=$(awk -v k="$rss_kib" 'BEGIN { printf "%.0f", k / 1024 }')
echo
echo "image     $layer_count gzip layers, $((layer_bytes / 1048576)) MiB compressed, $((content_bytes / 1000000)) MB unpacked, $base_entries entries; ext4 $((img_bytes >> 20)) MiB (banger: $((banger_size >> 20)) MiB)"
echo "medians of $runs runs (all runs: baseline ${base_totals[*]} s; cold ${cold_times[*]} s; warm ${warm_times[*]} s)"
echo "baseline  $base_median_run"
echo "banger cold  $t_cold s   ratio $t_cold/$t_base = $r_cold (target <= 0.4) $(verdict "$r_cold" 0.4)"
echo "banger warm  $t_warm s   ratio $t_warm/$t_base = $r_warm (target <= 0.3) $(verdict "$r_warm" 0.3)"
echo "bangerd peak RSS  $rss_mib MiB (target <= 200 MiB) $(verdict "$rss_mib" 200)"
echo "in banger writing the ext4 image takes a median $banger_ext4_write_median s of each pull ($(echo $banger_ext4_write) s)"
echo "one more cold pull, phases from progress notifications: $phases${build_line:+ [$build_line]}"
if [ ${#problems[@]} -eq 0 ]; then
  echo "sanity    ok: gcc, git, python3, sshd present; $banger_inodes inodes in use in both ext4 images; $compared entries of ${compare_dirs[*]} identical (name, mode, owner, size)"
else
  echo "sanity    FAILED: ${problems[*]}"
fi
echo "wall time $(elapsed "$script_started" "$(now)") s"
[ ${#problems[@]} -eq 0 ]
