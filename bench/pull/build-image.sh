#!/usr/bin/env bash
# Builds the benchmark image once: an OCI layout at $1 (default target/bench-image/layout-recommends)
# with tag `full` = two gzip layers:
#   1. debootstrap --variant=minbase bookworm
#   2. apt-get install build-essential git python3 openssh-server (inside a chroot)
# About 540 MB and 16,200 files unpacked (241 MiB of gzip). A layout that is already complete
# is kept as is; delete the directory to rebuild. Needs root (debootstrap, chroot, mounts).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
source "$here/lib.sh"

out=${1:-target/bench-image/layout-recommends}
out=$(realpath -m "$out")
parent=$(dirname "$out")

if [ -f "$out/.complete" ]; then
  log "image cached at $out"
  exit 0
fi
[ "$(id -u)" -eq 0 ] || die "building the benchmark image needs root (debootstrap, chroot)"

ensure_packages debootstrap umoci

mirror=$(debian_mirror)
work="$parent/work"
mkdir -p "$parent" "$parent/debs"
rm -rf "$work"
mkdir -p "$work"

rootfs="$work/bundle/rootfs"
mounted=()
cleanup() {
  local i
  for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do
    umount "${mounted[$i]}" 2>/dev/null || umount -l "${mounted[$i]}" 2>/dev/null || true
  done
  mounted=()
}
trap cleanup EXIT

started=$(now)
layout="$work/layout"
umoci init --layout "$layout"
umoci new --image "$layout:base"
umoci unpack --image "$layout:base" "$work/bundle"

# Layer 1: minbase, debootstrapped straight into the (empty) unpacked bundle.
log "layer 1: debootstrap --variant=minbase bookworm from $mirror"
debootstrap --variant=minbase --cache-dir="$parent/debs" bookworm "$rootfs" "$mirror" \
  >"$work/debootstrap.log" 2>&1 || { tail -n 30 "$work/debootstrap.log" >&2; die "debootstrap failed"; }
t1=$(now)
log "debootstrap took $(elapsed "$started" "$t1") s; repacking layer 1"
umoci repack --refresh-bundle --image "$layout:base" "$work/bundle"

# Layer 2: development tools, installed in a chroot, with Debian's default recommends: that
# is what a developer's `apt-get install` gives, and it matches the ~750 MB / 25k-file image
# the issue and HOST-NOTES describe (without recommends it is 540 MB / 16k files).
log "layer 2: apt-get install build-essential git python3 openssh-server (chroot)"
mount -t proc proc "$rootfs/proc" && mounted+=("$rootfs/proc")
mount -t sysfs sysfs "$rootfs/sys" && mounted+=("$rootfs/sys")
mount --bind /dev "$rootfs/dev" && mounted+=("$rootfs/dev")
mount --bind /dev/pts "$rootfs/dev/pts" && mounted+=("$rootfs/dev/pts")
cp -L /etc/resolv.conf "$rootfs/etc/resolv.conf"
# Keep maintainer scripts from starting sshd inside the chroot.
printf '#!/bin/sh\nexit 101\n' >"$rootfs/usr/sbin/policy-rc.d"
chmod 755 "$rootfs/usr/sbin/policy-rc.d"
chroot "$rootfs" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
  sh -c 'apt-get update -qq && apt-get install -y -qq build-essential git python3 openssh-server && apt-get clean && rm -rf /var/lib/apt/lists/*' \
  >"$work/apt.log" 2>&1 || { tail -n 30 "$work/apt.log" >&2; die "apt-get install in the chroot failed"; }
rm -f "$rootfs/usr/sbin/policy-rc.d"
cleanup
t2=$(now)
log "apt-get install took $(elapsed "$t1" "$t2") s; repacking layer 2"
umoci repack --image "$layout:full" "$work/bundle"
umoci gc --layout "$layout"
t3=$(now)

# Publish the finished layout in one rename, so an interrupted build is never mistaken for
# a cached one.
rm -rf "$out"
mv "$layout" "$out"
touch "$out/.complete"
files=$(find "$rootfs" -xdev | wc -l)
bytes=$(du -s --apparent-size -B1 "$rootfs" | cut -f1)
rm -rf "$work"
log "image built in $(elapsed "$started" "$t3") s (debootstrap $(elapsed "$started" "$t1") s, apt $(elapsed "$t1" "$t2") s, umoci $(elapsed "$t2" "$t3") s): $files entries, $((bytes / 1000000)) MB"
