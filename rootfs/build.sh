#!/usr/bin/env bash
# Build the guest initramfs: the statically linked agent as /init and the empty mount
# points it uses, as an uncompressed newc cpio (decompression is emulated kernel code
# on some hosts, so compression costs boot time). Prints the archive's path.
#
#   rootfs/build.sh [--overlay DIR] [OUT]   # default OUT: target/peapod/initramfs.cpio
#
# --overlay DIR copies DIR's tree on top (rootfs/build-test.sh adds its test tools so).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
overlay=
if [ "${1:-}" = --overlay ]; then
    overlay=${2:?"--overlay needs a directory"}
    [ -d "$overlay" ] || { echo "rootfs: overlay $overlay is not a directory" >&2; exit 1; }
    shift 2
fi
out=$(realpath -m "${1:-$repo/target/peapod/initramfs.cpio}")
triple=x86_64-unknown-linux-gnu
log() { echo "rootfs: $*" >&2; }

command -v cpio >/dev/null || {
    log "installing cpio"
    apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q cpio >&2
}

# There is no musl target here: link glibc statically. An explicit --target keeps
# these flags away from the host build (proc macros cannot be static); the VMM is
# built the same way (Makefile), with the same flags, so the two share one build.
# libseccomp's archive is linked in by .cargo/config.toml.
(cd "$repo" && RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --quiet --release -p peapod-agent --target "$triple" >&2)
agent=$repo/target/$triple/release/peapod-agent
if readelf -l "$agent" | grep -q INTERP; then
    log "$agent is dynamically linked; the initramfs has no libc to load"
    exit 1
fi

staging=$(mktemp -d)
trap 'rm -rf "$staging"' EXIT
install -m 0755 "$agent" "$staging/init"
mkdir -m 0755 "$staging"/{dev,proc,sys,tmp,run,.root}
[ -z "$overlay" ] || cp -a "$overlay"/. "$staging"/
mkdir -p "$(dirname "$out")"
(cd "$staging" && find . -mindepth 1 | LC_ALL=C sort |
    cpio --quiet -o -H newc -R 0:0 --reproducible >"$out.tmp")
mv "$out.tmp" "$out"
log "built $out ($(stat -c %s "$out") bytes; agent $(stat -c %s "$agent") bytes)"
echo "$out"
