#!/usr/bin/env bash
# Build the test initramfs: the production one (rootfs/build.sh) plus the test probe
# as /peapod-probe (boot it with `rdinit=/peapod-probe`) and Debian's static busybox
# as /bin/busybox, with a /bin link per applet. The device tests drive the guest
# through the probe. Prints the archive's path.
#
#   rootfs/build-test.sh [--with-strace] [OUT]   # default: target/peapod/test-initramfs.cpio
#
# --with-strace adds Debian's strace with the libraries and loader it needs, for the
# container-start benchmark (the agent runs it with peapod.strace=/usr/bin/strace).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
with_strace=
if [ "${1:-}" = --with-strace ]; then
    with_strace=1
    shift
fi
out=${1:-$repo/target/peapod/test-initramfs.cpio}
triple=x86_64-unknown-linux-gnu
log() { echo "rootfs-test: $*" >&2; }

# busybox-static's binary: the initramfs has no libc for a dynamic one. (Debian's
# `busybox` package installs a dynamic /bin/busybox; it would be caught below.)
if [ ! -x /bin/busybox ]; then
    log "installing busybox-static"
    if [ "$(id -u)" != 0 ]; then
        log "need root to apt-get install busybox-static (or install it yourself)"
        exit 1
    fi
    apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends busybox-static >&2
fi

# Same flags and target as the agent and the VMM (rootfs/build.sh, Makefile).
(cd "$repo" && RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --quiet --release -p peapod-guest-probe --target "$triple" >&2)
probe=$repo/target/$triple/release/peapod-probe
for bin in "$probe" /bin/busybox; do
    if readelf -l "$bin" | grep -q INTERP; then
        log "$bin is dynamically linked; the initramfs has no libc to load"
        [ "$bin" = /bin/busybox ] && log "install Debian's busybox-static, not busybox"
        exit 1
    fi
done

overlay=$(mktemp -d)
trap 'rm -rf "$overlay"' EXIT
install -m 0755 "$probe" "$overlay/peapod-probe"
mkdir -m 0755 "$overlay"/{bin,mnt}
install -m 0755 /bin/busybox "$overlay/bin/busybox"
# One link per applet, so that scripts may say `dd` as well as `busybox dd`.
for applet in $(/bin/busybox --list); do
    [ "$applet" = busybox ] || ln -s busybox "$overlay/bin/$applet"
done
if [ -n "$with_strace" ]; then
    strace=$(command -v strace) || { log "strace is not installed (.ci/install-deps.sh bench)"; exit 1; }
    # The binary, then every library ldd names and the loader, at their own paths.
    for f in "$strace" $(ldd "$strace" | grep -oE '/[^ ]+'); do
        mkdir -p "$overlay$(dirname "$f")"
        cp -L "$f" "$overlay$f"
    done
fi
"$repo/rootfs/build.sh" --overlay "$overlay" "$out"
