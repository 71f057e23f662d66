#!/usr/bin/env bash
# Builds the mailferry image on this machine, with no registry: the release binary,
# stripped, the shared libraries `ldd` lists with their loader, /etc/passwd and
# /etc/group naming the image's user (10001), and an empty /tmp, put together FROM
# scratch (tests/image/Containerfile) with Podman. Then checks it: `--version` runs,
# the user is not root, the image is under 40 MB and holds only those files.
#
#   bash tests/image/build.sh            # prints the image's name last
#
# Podman's settings come from tests/image/containers.conf and storage.conf (runc, the
# vfs driver, storage under /var/tmp/mailferry-containers) unless CONTAINERS_CONF /
# CONTAINERS_STORAGE_CONF name others. Needs podman and runc (Debian's packages).
set -euo pipefail
cd "$(dirname "$0")/../.."
here=tests/image
export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/$here/containers.conf}
export CONTAINERS_STORAGE_CONF=${CONTAINERS_STORAGE_CONF:-$PWD/$here/storage.conf}
target=${CARGO_TARGET_DIR:-target}
max_bytes=$((40 * 1000 * 1000))

echo "== image: the release binary" >&2
cargo build --release --locked -p mailferry-coordinator >&2
binary=$target/release/mailferry
version=$("$binary" --version | awk '{print $2}')
image=localhost/mailferry:$version

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/rootfs
install -D -m 0755 "$binary" "$root/usr/local/bin/mailferry"
strip "$root/usr/local/bin/mailferry"
# Each library at the path the loader looks for it (`=> /path`), and the loader itself
# at the path the binary names (a bare `/lib64/…` line).
ldd "$binary" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' |
    while read -r lib; do
        install -D -m 0755 "$lib" "$root$lib"
    done
mkdir -p "$root/etc" "$root/tmp"
chmod 1777 "$root/tmp"
printf 'root:x:0:0:root:/root:/sbin/nologin\nmailferry:x:10001:10001:mailferry:/nonexistent:/sbin/nologin\n' \
    >"$root/etc/passwd"
printf 'root:x:0:\nmailferry:x:10001:\n' >"$root/etc/group"

echo "== image: podman build $image" >&2
podman build --quiet --tag "$image" --file "$here/Containerfile" "$root" >&2

echo "== image: checks" >&2
fail() { echo "image check failed: $*" >&2; exit 1; }
said=$(podman run --rm "$image" --version)
[[ $said == "mailferry $version" ]] || fail "--version said: $said"
user=$(podman image inspect --format '{{.Config.User}}' "$image")
[[ $user == 10001:10001 ]] || fail "runs as $user, not 10001:10001"
size=$(podman image inspect --format '{{.Size}}' "$image")
((size < max_bytes)) || fail "$size bytes, over $max_bytes"
# Only what was put there: the binary, the libraries and the loader, passwd and group
# (and what Podman itself adds to a container: hosts, resolv.conf, .containerenv).
container=$(podman create "$image")
files=$(podman export "$container" | tar -t | grep -v '/$')
podman rm --force "$container" >/dev/null
extra=$(grep -vE '^(usr/local/bin/mailferry|etc/(passwd|group|hosts|hostname|resolv\.conf)|run/\.containerenv|(usr/)?lib(64)?/(x86_64-linux-gnu/|aarch64-linux-gnu/)?[^/]+\.so[.0-9]*)$' <<<"$files" || true)
[[ -z $extra ]] || fail "unexpected files: $extra"
echo "image $image: $((size / 1000 / 1000)) MB, user $user, $(wc -l <<<"$files") entries" >&2
echo "$image"
