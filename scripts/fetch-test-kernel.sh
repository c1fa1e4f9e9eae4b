#!/usr/bin/env bash
# Download Debian's cloud kernel package (the real one, not the meta package) into
# DEST_DIR and print the path of the .deb. Idempotent: when a matching .deb is already
# there, it prints it without touching apt or the network.
#
# Why the indirection: `linux-image-cloud-amd64` is a meta package with no files; the
# kernel lives in the package it depends on (e.g. linux-image-6.1.0-56-cloud-amd64).
set -euo pipefail

META=${BANGER_KERNEL_META:-linux-image-cloud-amd64}

if [ $# -ne 1 ]; then
    echo "usage: $0 DEST_DIR" >&2
    exit 2
fi
dest=$1
mkdir -p "$dest"
dest=$(cd "$dest" && pwd)

# Fast path: any previously downloaded kernel package. We do not re-check the mirror for
# a newer version; tests want a stable kernel, and `rm DEST_DIR/*.deb` forces a refresh.
shopt -s nullglob
existing=("$dest"/linux-image-*-cloud-amd64_*.deb)
shopt -u nullglob
if [ ${#existing[@]} -gt 0 ]; then
    # Newest by version sort, in case several accumulated.
    printf '%s\n' "${existing[@]}" | sort -V | tail -n1
    exit 0
fi

resolve() {
    apt-cache depends "$META" 2>/dev/null \
        | awk '/^ *Depends: linux-image-/ { print $2; exit }'
}

pkg=$(resolve || true)
if [ -z "$pkg" ]; then
    # Package lists are missing or stale: refresh once and retry.
    echo "fetch-test-kernel: apt-cache does not know $META; running apt-get update" >&2
    apt-get update -qq >&2
    pkg=$(resolve || true)
fi
if [ -z "$pkg" ]; then
    echo "fetch-test-kernel: cannot resolve the package behind $META" >&2
    exit 1
fi

# apt-get download writes into the current directory; a temp dir inside DEST keeps a
# half-downloaded file from ever matching the fast-path glob above.
tmp=$(mktemp -d "$dest/.download.XXXXXX")
# apt drops privileges to _apt for downloads; let it write here to avoid a warning.
chmod 0755 "$tmp"
trap 'rm -rf "$tmp"' EXIT
if ! (cd "$tmp" && apt-get download -qq "$pkg" >&2); then
    echo "fetch-test-kernel: apt-get download $pkg failed; retrying after apt-get update" >&2
    apt-get update -qq >&2
    (cd "$tmp" && apt-get download -qq "$pkg" >&2)
fi
shopt -s nullglob
got=("$tmp"/*.deb)
shopt -u nullglob
if [ ${#got[@]} -ne 1 ]; then
    echo "fetch-test-kernel: expected one .deb from apt-get download $pkg, got ${#got[@]}" >&2
    exit 1
fi
final="$dest/$(basename "${got[0]}")"
mv "${got[0]}" "$final"
echo "$final"
