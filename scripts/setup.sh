#!/usr/bin/env bash
# Installs everything banger and its test suite need on a Debian/Ubuntu machine.
# Idempotent: a second run installs nothing. Needs root or sudo for apt-get.
set -euo pipefail

packages=(
  build-essential pkg-config ca-certificates curl git python3
  e2fsprogs            # mkfs.ext4 -d and debugfs: building and checking root filesystems
  docker-registry      # a real registry on 127.0.0.1 for pull tests
  skopeo umoci         # pushing fixtures; baseline tools for benchmarks
  apache2-utils        # htpasswd, for the authenticated registry test
  busybox-static       # cpio and a static shell for initramfs work
  qemu-system-x86      # the VMM that works everywhere (TCG when KVM is unusable)
  qemu-utils           # qemu-img: copy-on-write qcow2 overlays for VM disks
  iproute2 nftables    # TAP networking: bridge, TAP devices, NAT and guard rules (and the netns tests)
  openssh-server openssh-client  # a real sshd on 127.0.0.1 for the --host ssh:// tests
  systemd              # systemd-analyze verify for the units `system install` writes
)

sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi

missing_packages() {
  missing=()
  for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
}
# Two passes: installing one package can remove another that conflicts with it (a
# backported qemu-utils goes when the distribution's qemu-system-x86 comes in), and the
# second pass brings it back at the matching version. Still missing after that is an error.
updated=""
for pass in 1 2; do
  missing_packages
  [ ${#missing[@]} -eq 0 ] && break
  echo "setup: installing ${missing[*]}" >&2
  if [ -z "$updated" ]; then $sudo apt-get update -qq; updated=1; fi
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
done
missing_packages
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: still not installed after two passes: ${missing[*]}" >&2
  exit 1
fi

# Debian's docker-registry package starts a system registry on :5000; tests run their own.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet docker-registry 2>/dev/null; then
  $sudo systemctl disable --now docker-registry >/dev/null 2>&1 || true
fi

# Under a root bangerd, VMMs run as this unprivileged system user (vmm_user in
# config.toml); in the kvm group where there is one, for /dev/kvm.
if ! id -u banger-vmm >/dev/null 2>&1; then
  echo "setup: creating the system user banger-vmm (VMMs of a root bangerd run as it)" >&2
  $sudo useradd --system --no-create-home --shell /usr/sbin/nologin banger-vmm
fi
if getent group kvm >/dev/null 2>&1 && ! id -nG banger-vmm | tr ' ' '\n' | grep -qx kvm; then
  $sudo usermod -aG kvm banger-vmm
fi

if ! command -v cargo >/dev/null 2>&1; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    echo "setup: cargo is in ~/.cargo/bin; add it to PATH (source ~/.cargo/env)" >&2
  else
    echo "setup: installing the Rust toolchain with rustup" >&2
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal -c clippy,rustfmt
  fi
fi

# The fuzz targets (scripts/fuzz.sh) build on nightly with cargo-fuzz.
if command -v rustup >/dev/null 2>&1 || [ -x "$HOME/.cargo/bin/rustup" ]; then
  rustup_bin="$(command -v rustup || echo "$HOME/.cargo/bin/rustup")"
  if ! "$rustup_bin" toolchain list 2>/dev/null | grep -q '^nightly'; then
    echo "setup: installing the nightly toolchain (fuzzing)" >&2
    "$rustup_bin" toolchain install nightly --profile minimal
  fi
  if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "setup: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
  fi
fi

# The guest agent is a static binary; tests build it for musl.
if command -v rustup >/dev/null 2>&1 || [ -x "$HOME/.cargo/bin/rustup" ]; then
  rustup_bin="$(command -v rustup || echo "$HOME/.cargo/bin/rustup")"
  if ! "$rustup_bin" target list --installed 2>/dev/null | grep -qx x86_64-unknown-linux-musl; then
    echo "setup: adding the x86_64-unknown-linux-musl target" >&2
    "$rustup_bin" target add x86_64-unknown-linux-musl
  fi
fi
