#!/usr/bin/env bash
# VM benchmark: wall time of `banger vm run --rm -- true` (from a pulled image and an
# imported kernel) against a bare qemu-system-x86_64 boot of the same kernel, initramfs and
# root filesystem to the same point (the image's `true` has run and the guest powered off).
# Prints each backend/accelerator banger used, medians, and banger's overhead (target <= 15%).
# Firecracker is measured when it is on PATH, KVM works and this runs as root (TAP
# networking); otherwise a skip with the reason is printed.
#
# Then warm starts (issue 11): cold `vm run --rm -- true` (--cold) against warm ones (restored
# from the template the first warm-eligible run saves), their ratio (target warm <= 0.15 x
# cold under TCG); the disk work of `vm create` (bangerd's "root disk ready" log line) for a
# 100 MB and a 2 GB image; and 10 concurrent warm runs (total wall time, peak summed RSS of
# their QEMU processes).
#
# Environment: BENCH_RUNS (default 5).
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${BENCH_RUNS:-5}

. bench/lib.sh
./scripts/setup.sh >/dev/null
build_release
banger=$PWD/target/release/banger

work=$(mktemp -d)
export XDG_STATE_HOME=$work/state XDG_CACHE_HOME=$work/cache XDG_CONFIG_HOME=$work/config
# The baseline is QEMU with user-mode networking: compare like with like (and, run as root,
# leave the host's network alone rather than set up banger's bridge and NAT).
mkdir -p "$work/config/banger"
printf 'vmm = "qemu"\nnetwork = "user"\n' >"$work/config/banger/config.toml"
cleanup() {
  "$banger" daemon stop >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

deb=$(./scripts/fetch-test-kernel.sh target/kernel)
"$banger" kernel import bench --deb "$deb" >/dev/null
build_busybox_oci "$work"
"$banger" image import "$work/oci:bb" --name bb >/dev/null

kernel_dir=$XDG_STATE_HOME/banger/kernels/bench
rootfs=$("$banger" --json image show bb | sed -n 's/.*"rootfs": "\(.*\)".*/\1/p')
accel=$("$banger" --json doctor | tr -d '\n' | grep -o '"name": "kvm",[^}]*"status": "ok"' >/dev/null && echo kvm || echo tcg)

# Runs the command after the first argument $runs times, appending each run's wall time in
# seconds to the array the first argument names.
time_runs() {
  local -n times_out=$1
  shift
  local i t0 t1
  for i in $(seq "$runs"); do
    t0=$(now)
    "$@"
    t1=$(now)
    times_out+=("$(echo "$t1 - $t0" | bc)")
  done
}

echo "banger vm run --rm -- true: $runs runs" >&2
banger_times=()
time_runs banger_times "$banger" vm run --rm --cold --image bb -- true

echo "bare qemu boot of the same kernel + initramfs + rootfs: $runs runs" >&2
cmd=$(printf 'true' | base64)
khz=$(awk -F': ' '/^cpu MHz/{printf "%d", $2*1000; exit}' /proc/cpuinfo)
bare_times=()
for i in $(seq "$runs"); do
  cp --reflink=auto --sparse=always "$rootfs" "$work/bare.ext4"
  t0=$(now)
  qemu-system-x86_64 -M microvm -accel "$accel" -cpu "$([ "$accel" = kvm ] && echo host || echo max)" \
    -m 1024M -smp 2 -nodefaults -no-user-config -display none -no-reboot \
    -serial "file:$work/bare-console.log" \
    -kernel "$kernel_dir/vmlinux" -initrd "$kernel_dir/initramfs.cpio" \
    -append "console=ttyS0 panic=-1 quiet reboot=t tsc_early_khz=$khz banger.cmd=$cmd" \
    -drive "file=$work/bare.ext4,if=none,id=root,format=raw,cache=unsafe" \
    -device virtio-blk-device,drive=root \
    -netdev user,id=n0 -device virtio-net-device,netdev=n0
  t1=$(now)
  grep -q "BANGER_EXIT=0" "$work/bare-console.log" || { echo "bare boot did not run true" >&2; exit 1; }
  bare_times+=("$(echo "$t1 - $t0" | bc)")
done

b=$(printf '%s\n' "${banger_times[@]}" | median)
q=$(printf '%s\n' "${bare_times[@]}" | median)
echo "all runs: banger ${banger_times[*]} s; bare qemu ${bare_times[*]} s"
printf 'qemu-%s  banger vm run %.2f s  bare qemu %.2f s  ratio %.3f  overhead %+.1f%% (target <= 15%%)\n' \
  "$accel" "$b" "$q" "$(echo "$b / $q" | bc -l)" "$(echo "($b / $q - 1) * 100" | bc -l)"

echo "warm: one run saves the template, then $runs warm runs" >&2
"$banger" vm run --rm --image bb -- true
warm_times=()
time_runs warm_times "$banger" vm run --rm --image bb -- true
w=$(printf '%s\n' "${warm_times[@]}" | median)
echo "all runs: warm ${warm_times[*]} s"
printf 'qemu-%s  cold vm run %.2f s  warm vm run %.2f s  warm/cold %.3f (target <= 0.15)\n' \
  "$accel" "$b" "$w" "$(echo "$w / $b" | bc -l)"

log=$XDG_STATE_HOME/banger/bangerd.log
for size in 100MiB 2GiB; do
  "$banger" image import "$work/oci:bb" --name "bb-$(echo "$size" | tr A-Z a-z)" --size "$size" >/dev/null
  "$banger" vm create --no-start --name "disk-$(echo "$size" | tr 'A-Z' 'a-z')" --image "bb-$(echo "$size" | tr A-Z a-z)" >/dev/null
  ms=$(grep '"root disk ready"\|root disk ready' "$log" | tail -1 | grep -o 'elapsed_ms[^0-9]*[0-9]*' | grep -o '[0-9]*$')
  printf 'vm create disk work, %s image: %s ms (target <= 50 ms, independent of size)\n' "$size" "$ms"
  "$banger" vm rm "disk-$(echo "$size" | tr 'A-Z' 'a-z')" >/dev/null
done

echo "10 concurrent warm runs" >&2
peak=0
t0=$(now)
pids=()
for i in $(seq 10); do
  "$banger" vm run --rm --image bb -- true >"$work/concurrent-$i.out" 2>&1 &
  pids+=($!)
done
failed=0
while [ -n "$(jobs -rp)" ]; do
  # Confined QEMUs get their files as descriptors, so no path of $work is in their
  # arguments: the daemon's own VM list says which processes are this run's.
  rss=0
  for pid in $("$banger" --json vm list 2>/dev/null | grep -o '"pid": [0-9]*' | grep -o '[0-9]*$' || true); do
    kib=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status" 2>/dev/null || true)
    rss=$((rss + ${kib:-0}))
  done
  if [ "$rss" -gt "$peak" ]; then peak=$rss; fi
  sleep 0.2
done
for p in "${pids[@]}"; do wait "$p" || failed=$((failed + 1)); done
t1=$(now)
printf '10 concurrent warm runs: %.2f s total, %d failed, peak summed QEMU RSS %d MiB (state is loaded into each guest: not shared)\n' \
  "$(echo "$t1 - $t0" | bc)" "$failed" "$((peak / 1024))"

if ! command -v firecracker >/dev/null 2>&1; then
  echo "firecracker: skipped (not on PATH)"
elif [ "$accel" != kvm ]; then
  echo "firecracker: skipped (KVM not usable: banger doctor's kvm check is not ok)"
elif [ "$(id -u)" -ne 0 ]; then
  echo "firecracker: skipped (needs TAP networking, so root)"
else
  # Firecracker has no user-mode network: TAP + bridge + NAT on this host, torn down by
  # vm rm (the bridge and the NAT table stay, like docker0).
  printf 'vmm = "firecracker"\nnetwork = "tap"\n' >"$work/config/banger/config.toml"
  "$banger" daemon stop >/dev/null 2>&1 || true
  fc_times=()
  time_runs fc_times "$banger" vm run --rm --image bb -- true
  f=$(printf '%s\n' "${fc_times[@]}" | median)
  echo "all runs: banger on firecracker ${fc_times[*]} s"
  printf 'firecracker  banger vm run %.2f s  (qemu-%s bare boot %.2f s)\n' "$f" "$accel" "$q"
fi
