#!/usr/bin/env bash
# Builds the migration VM: Debian's distribution kernel (booted as an ELF through PVH, as the
# kernel tier's guest is) and a busybox initramfs whose init is the record workload (init). No
# root file system: the VM's only disk is the one it is migrated with. The kernel and
# busybox-static .debs come from the host's apt sources, as tests/kernel/guest/build.sh gets them.
#
#   build.sh [--if-needed]     output in $LAZYISCSI_VM (default /var/tmp/lazyiscsi-vm)
#
# --if-needed does nothing when the output was built from these same files. Concurrent builds
# (a test run beside the demo) wait for each other on a lock beside the output.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
GUEST=$(cd "$HERE/../../kernel/guest" && pwd)
OUT=${LAZYISCSI_VM:-/var/tmp/lazyiscsi-vm}
# virtio-blk behind virtio-pci: /dev/vda; Debian builds both as modules
BOOT_MODULES="virtio_pci virtio_blk"

HASH=$(cat "$HERE/build.sh" "$HERE/init" "$GUEST/kernel_files.py" | sha256sum | cut -c1-16)
mkdir -p "$(dirname "$OUT")"
exec 9>"$OUT.lock"
flock 9
if [ "${1:-}" = --if-needed ] && [ "$(cat "$OUT/stamp" 2>/dev/null)" = "$HASH" ]; then
  echo "vm: $OUT is up to date"; exit 0
fi
t0=$SECONDS
step() { echo "vm build +$((SECONDS - t0))s: $*"; }

step "host packages"
export DEBIAN_FRONTEND=noninteractive
need=()
for p in qemu-system-x86 qemu-utils cpio; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
# apt-get download needs the package lists of the host's apt sources
if [ "${#need[@]}" -gt 0 ] || ! apt-cache show linux-image-amd64 busybox-static >/dev/null 2>&1; then
  for _ in 1 2 3; do apt-get -o DPkg::Lock::Timeout=600 update -qq && break; sleep 5; done
fi
if [ "${#need[@]}" -gt 0 ]; then
  apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

WORK=$(mktemp -d "$OUT.work.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"
step "kernel and busybox from the host's apt sources"
KPKG=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}')
if [ -z "$KPKG" ] || ! apt-cache show busybox-static >/dev/null 2>&1; then
  echo "vm: this host's apt sources offer no linux-image-amd64 or busybox-static (Debian's main)"; exit 1
fi
apt-get download -qq "$KPKG" busybox-static 2>&1 | grep -v "^W: Download is performed unsandboxed" || true
dpkg -x "$KPKG"_*.deb kernel
dpkg -x busybox-static_*.deb busybox
KVER=$(ls kernel/lib/modules)
MODS=kernel/lib/modules/$KVER
depmod -b kernel "$KVER"
mkdir -p new
# QEMU boots the ELF through PVH: under TCG that skips seconds of xz decompression per boot
python3 "$GUEST/kernel_files.py" vmlinux "kernel/boot/vmlinuz-$KVER" new/vmlinux
echo "$KVER" > new/kernel-version

step "initramfs"
mkdir -p initramfs/{bin,modules,proc,sys,dev,tmp}
cp busybox/bin/busybox initramfs/bin/
for f in $(python3 "$GUEST/kernel_files.py" modules "$MODS" $BOOT_MODULES); do
  cp "$MODS/$f" initramfs/modules/
  basename "$f" >> initramfs/modules/order
done
install -m 0755 "$HERE/init" initramfs/init
(cd initramfs && find . | cpio -o -H newc --quiet | gzip -1) > new/initrd.img
echo "$HASH" > new/stamp
rm -rf "$OUT"
mv new "$OUT"
step "done: $(du -sh "$OUT" | cut -f1) in $OUT"
