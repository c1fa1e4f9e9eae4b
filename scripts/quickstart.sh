#!/usr/bin/env bash
# Installs what banger needs, builds it, and runs its main job: a fresh microVM from an OCI
# image, this repository copied in, a command run there, its exit status returned.
# Works offline except for Debian's package mirror (packages and the guest kernel).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"

cargo build --release -p banger -p bangerd
# The guest agent is static so it runs in any image; bangerd looks for it next to itself.
cargo build --release -p banger-agent --target x86_64-unknown-linux-musl
cp target/x86_64-unknown-linux-musl/release/banger-agent target/release/banger-agent
banger=target/release/banger

# A guest kernel from Debian's cloud flavour (virtio drivers as modules; banger's initramfs
# loads them).
if [ -z "$($banger --json kernel list | grep '"name"' || true)" ]; then
  deb=$(./scripts/fetch-test-kernel.sh target/kernel)
  $banger kernel import cloud --deb "$deb"
fi

# A small image built here (busybox), so the demo needs no registry. With network access,
# `--image debian:bookworm` pulls from Docker Hub instead.
if ! $banger image show busybox >/dev/null 2>&1; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  mkdir -p "$work/rootfs/bin" "$work/rootfs/root" "$work/rootfs/tmp"
  cp /bin/busybox "$work/rootfs/bin/busybox"
  for applet in $(/bin/busybox --list); do
    [ "$applet" = busybox ] || ln -s busybox "$work/rootfs/bin/$applet"
  done
  umoci init --layout "$work/oci"
  umoci new --image "$work/oci:busybox"
  umoci insert --image "$work/oci:busybox" "$work/rootfs" /
  $banger image import "$work/oci:busybox" --name busybox
fi

# User-mode networking: the demo needs no bridge, NAT or root on the host.
$banger vm run . --rm --image busybox --network user -- sh -c 'echo "hello from a banger microVM: $(uname -r)"; ls'
