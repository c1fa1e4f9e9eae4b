# shellcheck shell=bash
# What the VM benchmarks (bench/vm.sh, bench/vm-ab.sh) share, sourced after they cd to the
# repository root: building the release binaries and the guest agent, the busybox OCI image
# both boot, and timing helpers.

# Builds banger, bangerd and the static guest agent (release) in the current tree, with the
# agent next to the binaries, where bangerd looks for it.
build_release() {
  cargo build --release -q -p banger -p bangerd
  cargo build --release -q -p banger-agent --target x86_64-unknown-linux-musl
  cp target/x86_64-unknown-linux-musl/release/banger-agent target/release/banger-agent
}

# Makes the OCI layout "$1/oci" with the image tagged bb: the host's busybox with every
# applet linked, and empty /root and /tmp, staged in "$1/rootfs".
build_busybox_oci() {
  local dir=$1 applet
  mkdir -p "$dir/rootfs/bin" "$dir/rootfs/root" "$dir/rootfs/tmp"
  cp /bin/busybox "$dir/rootfs/bin/busybox"
  for applet in $(/bin/busybox --list); do
    [ "$applet" = busybox ] || ln -s busybox "$dir/rootfs/bin/$applet"
  done
  umoci init --layout "$dir/oci" >/dev/null
  umoci new --image "$dir/oci:bb" >/dev/null
  umoci insert --image "$dir/oci:bb" "$dir/rootfs" / >/dev/null
}

now() { date +%s.%N; }
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
