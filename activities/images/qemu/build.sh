#!/usr/bin/env bash
# Builds murmur's base qemu guest image, from Debian packages only, reproducibly:
#
#   build.sh <out-dir> [image-id]
#
# <out-dir> receives `vmlinuz` (the Debian cloud kernel), `initrd.gz` (busybox, /init, the
# guest agent, /etc/murmur/vm and /etc/murmur/image) and `image.json` (id, substrate, kernel
# version, arch, the packages used, and `guest_sha256`: the sha256 of /init and the agent
# together, by which a worker with other guest files knows to rebuild the image). The same packages give byte-identical files: the file
# list is sorted, every mtime is SOURCE_DATE_EPOCH, owners are root, `cpio --reproducible`
# and `gzip -n`. Packages are downloaded with `apt-get download` into
# ${MURMUR_CACHE_DIR:-$HOME/.cache/murmur}/debs and reused. The kernel package is the one the
# `linux-image-cloud-amd64` meta-package points at, unless MURMUR_KERNEL_PACKAGE names one.
set -euo pipefail

OUT="${1:?usage: build.sh <out-dir> [image-id]}"
IMAGE_ID="${2:-default}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${MURMUR_CACHE_DIR:-$HOME/.cache/murmur}/debs"
export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-1700000000}"

say() { printf 'build-guest-image: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

for tool in apt-get apt-cache dpkg-deb cpio gzip; do
  command -v "$tool" >/dev/null || die "$tool is missing (apt-get install -y cpio)"
done

kernel_pkg="${MURMUR_KERNEL_PACKAGE:-}"
if [[ -z "$kernel_pkg" ]]; then
  kernel_pkg="$(apt-cache depends linux-image-cloud-amd64 2>/dev/null \
    | sed -n 's/^ *Depends: \(linux-image-[0-9].*-cloud-amd64\)$/\1/p' | head -1)"
  [[ -n "$kernel_pkg" ]] || die "cannot resolve linux-image-cloud-amd64 (run apt-get update)"
fi
kernel_version="${kernel_pkg#linux-image-}"

mkdir -p "$CACHE"
fetch() { # fetch <package> -> path of its .deb in the cache
  local pkg="$1" deb
  deb="$(ls "$CACHE/${pkg}_"*.deb 2>/dev/null | sort | tail -1 || true)"
  if [[ -z "$deb" ]]; then
    say "downloading $pkg"
    (cd "$CACHE" && apt-get download "$pkg" >/dev/null 2>&1) || die "apt-get download $pkg failed"
    deb="$(ls "$CACHE/${pkg}_"*.deb | sort | tail -1)"
  fi
  echo "$deb"
}
kernel_deb="$(fetch "$kernel_pkg")"
busybox_deb="$(fetch busybox-static)"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
dpkg-deb -x "$kernel_deb" "$work/kernel"
dpkg-deb -x "$busybox_deb" "$work/busybox"
vmlinuz="$(ls "$work"/kernel/boot/vmlinuz-* | head -1)"
[[ -f "$vmlinuz" ]] || die "no boot/vmlinuz-* in $kernel_deb"

root="$work/root"
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc/murmur,proc,sys,dev,run,tmp,root}
cp "$work/busybox/bin/busybox" "$root/bin/busybox"
cp "$HERE/init" "$root/init"
cp "$HERE/murmur-agent" "$root/bin/murmur-agent"
chmod 0755 "$root/init" "$root/bin/murmur-agent" "$root/bin/busybox"
ln -s busybox "$root/bin/sh"
echo 1 >"$root/etc/murmur/vm"
echo "$IMAGE_ID" >"$root/etc/murmur/image"
chmod 1777 "$root/tmp"

stage="$OUT.tmp.$$"
rm -rf "$stage"
mkdir -p "$stage"
find "$root" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
(cd "$root" && find . -mindepth 1 -print0 | LC_ALL=C sort -z \
  | cpio --null --create --format=newc --reproducible --owner=0:0 --quiet) \
  | gzip -n -9 >"$stage/initrd.gz"
cp "$vmlinuz" "$stage/vmlinuz"
cat >"$stage/image.json" <<JSON
{
  "id": "$IMAGE_ID",
  "substrate": "qemu",
  "arch": "x86_64",
  "kernel": "$kernel_version",
  "packages": ["$(basename "$kernel_deb")", "$(basename "$busybox_deb")"],
  "initrd_sha256": "$(sha256sum "$stage/initrd.gz" | cut -d' ' -f1)",
  "guest_sha256": "$(cat "$HERE/init" "$HERE/murmur-agent" | sha256sum | cut -d' ' -f1)"
}
JSON
rm -rf "$OUT"
mv "$stage" "$OUT"
say "image $IMAGE_ID in $OUT (kernel $kernel_version)"
