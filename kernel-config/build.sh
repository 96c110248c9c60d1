#!/usr/bin/env bash
# Build the Peapod guest kernel: Debian's linux-source, `make tinyconfig`, our fragment
# (peapod.config) on top, our guarded patches (patches/*.patch), `make vmlinux`.
#
# The result is cached outside the checkout by a hash of everything that decides it
# (source package version, fragment, patches, compiler, this script), so a rebuild
# happens only when one of those changes. Prints the path of the cached vmlinux.
#
#   kernel-config/build.sh            # build or reuse; prints .../vmlinux
#   PEAPOD_CACHE=/some/dir build.sh   # cache elsewhere (default /var/cache/peapod)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cache=${PEAPOD_CACHE:-/var/cache/peapod}
fragment=$here/peapod.config
tarball=/usr/src/linux-source-6.1.tar.xz
log() { echo "kernel-config: $*" >&2; }

need_pkgs=()
[ -f "$tarball" ] || need_pkgs+=(linux-source)
for tool in gcc make flex bison bc patch xz; do
    command -v "$tool" >/dev/null || need_pkgs+=("$tool")
done
[ -e /usr/include/libelf.h ] || need_pkgs+=(libelf-dev)
if [ ${#need_pkgs[@]} -gt 0 ]; then
    log "installing build dependencies: ${need_pkgs[*]}"
    apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
        linux-source build-essential flex bison bc patch xz-utils libelf-dev >&2
fi

src_version=$(dpkg-query -W -f='${Version}' linux-source)
key=$( {
    echo "linux-source $src_version"
    gcc --version | head -n1
    sha256sum "$fragment" "$here"/patches/*.patch "$0" | cut -d' ' -f1
} | sha256sum | cut -c1-16)
out=$cache/kernel/$key

if [ -f "$out/vmlinux" ]; then
    log "cached: $out (linux-source $src_version)"
    echo "$out/vmlinux"
    exit 0
fi

mkdir -p "$cache/kernel"
exec 9>"$cache/kernel/.lock"
flock 9
if [ -f "$out/vmlinux" ]; then # another build finished while we waited
    echo "$out/vmlinux"
    exit 0
fi

build=$cache/build/$key
rm -rf "$build"
mkdir -p "$build"
log "building linux-source $src_version in $build (about 7 minutes on 2 cores)"
tar -C "$build" -xf "$tarball"
cd "$build"/linux-source-*

for p in "$here"/patches/*.patch; do
    log "applying $(basename "$p")"
    patch -p1 --forward --fuzz=0 --quiet <"$p"
done

make -s tinyconfig >/dev/null
scripts/kconfig/merge_config.sh -m .config "$fragment" >/dev/null
make -s olddefconfig >/dev/null

# Kconfig silently drops an option whose dependencies are off: check each one landed.
missing=0
while IFS= read -r line; do
    case "$line" in
    CONFIG_*=*)
        grep -qxF "$line" .config || { log "fragment asks $line, .config has: $(grep "^${line%%=*}=\|^# ${line%%=*} is not set" .config || echo nothing)"; missing=1; }
        ;;
    "# CONFIG_"*" is not set")
        opt=${line#\# }
        opt=${opt%% *}
        if grep -q "^$opt=" .config; then
            log "fragment asks $opt off, .config has: $(grep "^$opt=" .config)"
            missing=1
        fi
        ;;
    esac
done <"$fragment"
if [ "$missing" = 1 ]; then
    log "the fragment does not hold on this source; fix kernel-config/peapod.config"
    exit 1
fi

make -s -j"$(nproc)" vmlinux >&2

stage=$cache/kernel/.stage-$key
rm -rf "$stage"
mkdir -p "$stage"
cp vmlinux System.map "$stage"/
cp .config "$stage"/config
make -s kernelrelease >"$stage"/release
mv "$stage" "$out"
cd /
rm -rf "$build"
log "built $out/vmlinux ($(cat "$out"/release))"
echo "$out/vmlinux"
