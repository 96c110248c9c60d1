#!/usr/bin/env bash
# Installs the Debian packages Peapod's build, tests and benchmarks need, if missing.
#   .ci/install-deps.sh          # build and test
#   .ci/install-deps.sh bench    # plus QEMU, the benchmark's peer
set -euo pipefail

pkgs=(linux-source build-essential flex bison bc libelf-dev xz-utils patch cpio curl)
# The device tests: busybox-static goes into the test initramfs (a static binary;
# Debian's plain busybox is dynamic), e2fsprogs makes ext4 images (mkfs.ext4 -d),
# iproute2 builds their network namespaces, taps and tc filters.
pkgs+=(busybox-static e2fsprogs iproute2)
# The agent: libcontainer applies containers' seccomp profiles with libseccomp
# (linked statically into the agent); the agent tests build EROFS layer disks.
pkgs+=(libseccomp-dev erofs-utils)
# The shim's tests: a private containerd (with ctr; runc comes with it) runs pods.
pkgs+=(containerd)
# The CRI tests: pods get their network from the CNI plugins (bridge, host-local), and
# the CRI client (k8s-cri) is generated from the CRI proto at build time by protoc.
pkgs+=(containernetworking-plugins protobuf-compiler)
# The CRI test's service-mesh pod runs the host's iptables-nft and iptables-legacy
# (with their libraries) in its image.
pkgs+=(iptables)
# Benchmarks: QEMU is the boot benchmark's peer; strace counts the agent's system
# calls in the guest.
[ "${1:-}" = bench ] && pkgs+=(qemu-system-x86 strace)

missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "install-deps: installing ${missing[*]}" >&2
    if [ "$(id -u)" != 0 ]; then
        echo "install-deps: need root to apt-get install ${missing[*]}" >&2
        exit 1
    fi
    apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
fi
command -v cargo >/dev/null || { echo "install-deps: cargo (rustup) is required" >&2; exit 1; }
