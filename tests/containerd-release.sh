#!/usr/bin/env bash
# Prints the directory holding containerd, ctr and containerd-shim-runc-v2 from the
# containerd package of a Debian suite, fetched and cached without installing anything:
#   tests/containerd-release.sh trixie     # containerd 1.7 (Debian 13)
#   tests/containerd-release.sh sid        # containerd 2.x (Debian unstable)
# Their binaries need only libc, so they run on Debian 12.
#
# apt runs on a private configuration under the cache (its own sources list, lists,
# package cache and no preferences), so the machine's apt sources and pins are not
# touched. The mirror is the one the machine's own Debian sources use for its release
# (`apt-get indextargets`), so no registry is named here. Extracted binaries are cached
# by package version: /var/cache/peapod/containerd/<version>/usr/bin. The suite's index
# is fetched again at most once a day (PEAPOD_CONTAINERD_REFRESH=1 forces it).
set -euo pipefail

suite=${1:?usage: $0 SUITE (trixie, sid...)}
cache=${PEAPOD_CACHE:-/var/cache/peapod}/containerd
apt_dir=$cache/apt
mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial"
exec 9>"$cache/lock"
flock 9

apt_opts=(
    -o "Dir::Etc::SourceList=$apt_dir/sources.list"
    -o Dir::Etc::SourceParts=/dev/null
    -o Dir::Etc::Preferences=/dev/null
    -o Dir::Etc::PreferencesParts=/dev/null
    -o "Dir::State::Lists=$apt_dir/lists"
    -o "Dir::Cache=$apt_dir/cache"
    # The downloads land in the cache as root; apt's sandbox user could not write them.
    -o APT::Sandbox::User=root
    -qq
)

# The machine's Debian mirror: the one its own release's main component comes from.
codename=$(. /etc/os-release && echo "${VERSION_CODENAME:?}")
mirror=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE) $(COMPONENT) $(IDENTIFIER)' |
    awk -v r="$codename" '$2 == r && $3 == "main" && $4 == "Packages" { print $1; exit }')
if [ -z "$mirror" ]; then
    echo "containerd-release: the machine's apt sources have no Debian $codename main entry to take the mirror from (add one, as Debian's installer does)" >&2
    exit 1
fi
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
sources="deb [signed-by=$keyring] $mirror $suite main"
stamp=$apt_dir/lists/$suite.updated
if ! grep -qxF "$sources" "$apt_dir/sources.list" 2>/dev/null; then
    echo "$sources" >>"$apt_dir/sources.list"
    rm -f "$stamp"
fi
if [ -n "${PEAPOD_CONTAINERD_REFRESH:-}" ] || [ -z "$(find "$stamp" -mmin -1440 2>/dev/null)" ]; then
    apt-get "${apt_opts[@]}" update >&2 ||
        { echo "containerd-release: apt-get update of $suite from $mirror failed" >&2; exit 1; }
    touch "$stamp"
fi

version=$(apt-cache "${apt_opts[@]}" madison containerd |
    awk -F' *[|] *' -v s="$suite" '$3 ~ (" " s "/main ") || $3 ~ (" " s "/main$") { print $2; exit }')
if [ -z "$version" ]; then
    echo "containerd-release: Debian $suite has no containerd package at $mirror" >&2
    exit 1
fi
dir=$cache/$version
if [ ! -x "$dir/usr/bin/containerd" ]; then
    tmp=$(mktemp -d "$cache/.fetch-XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    (cd "$tmp" && apt-get "${apt_opts[@]}" download "containerd=$version") >&2 ||
        { echo "containerd-release: downloading containerd $version failed" >&2; exit 1; }
    dpkg-deb -x "$tmp"/containerd_*.deb "$tmp/root"
    for b in containerd ctr containerd-shim-runc-v2; do
        [ -x "$tmp/root/usr/bin/$b" ] ||
            { echo "containerd-release: containerd $version has no usr/bin/$b" >&2; exit 1; }
    done
    rm -rf "$dir"
    mv "$tmp/root" "$dir"
fi
echo "$dir/usr/bin"
