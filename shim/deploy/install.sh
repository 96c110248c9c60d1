#!/usr/bin/env bash
# Installs Peapod on a Kubernetes node (`make install` runs it after building):
#   shim/deploy/install.sh SHIM VMM KERNEL INITRD
# DESTDIR (default empty) stages the files elsewhere; PREFIX (default /usr/local) is
# where the binaries go. Files are written beside their destination and renamed into
# place, so VMs running from the old kernel or initramfs keep theirs (docs/decisions.md).
set -euo pipefail
[ $# -eq 4 ] || { echo "usage: $0 SHIM VMM KERNEL INITRD" >&2; exit 2; }
shim=$1 vmm=$2 kernel=$3 initrd=$4
here=$(cd "$(dirname "$0")" && pwd)
dest=${DESTDIR:-}
prefix=${PREFIX:-/usr/local}
for f in "$shim" "$vmm" "$kernel" "$initrd"; do
    [ -f "$f" ] || { echo "install: $f does not exist (run make build first)" >&2; exit 1; }
done

# put SRC DEST MODE: copy beside DEST, then rename over it.
put() {
    local src=$1 dst=$dest$2 mode=$3
    mkdir -p "$(dirname "$dst")"
    install -m "$mode" "$src" "$dst.peapod-new"
    mv -f "$dst.peapod-new" "$dst"
    echo "install: $dst"
}

put "$shim" "$prefix/bin/containerd-shim-peapod-v2" 755
put "$vmm" "$prefix/bin/peapod-vmm" 755
put "$kernel" /usr/share/peapod/vmlinux 644
put "$initrd" /usr/share/peapod/initramfs.cpio 644
put "$here/containerd-1.x.toml" /usr/share/peapod/containerd-1.x.toml 644
put "$here/containerd-2.x.toml" /usr/share/peapod/containerd-2.x.toml 644
put "$here/runtimeclass.yaml" /usr/share/peapod/runtimeclass.yaml 644
# The shim's config: every key has a default; an existing file is the operator's.
if [ ! -e "$dest/etc/peapod/config.toml" ]; then
    mkdir -p "$dest/etc/peapod"
    cat > "$dest/etc/peapod/config.toml" <<CONF
# Peapod's shim configuration; every key is optional (docs/shim.md lists them).
vmm = "$prefix/bin/peapod-vmm"
CONF
    echo "install: $dest/etc/peapod/config.toml"
fi
mkdir -p "$dest/var/lib/peapod/layers" "$dest/var/lib/peapod/pods"

cat <<NEXT

Peapod is installed. To finish on this node:
  1. add /usr/share/peapod/containerd-1.x.toml (containerd 1.6, 1.7) or
     /usr/share/peapod/containerd-2.x.toml (containerd 2.x) to /etc/containerd/config.toml,
     and restart containerd (systemctl restart containerd);
  2. once per cluster: kubectl apply -f /usr/share/peapod/runtimeclass.yaml
  3. run a pod with runtimeClassName: peapod (docs/install.md).
NEXT
