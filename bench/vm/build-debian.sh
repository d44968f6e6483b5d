#!/usr/bin/env bash
# Builds the VM of bench/vm_workload.py --workload debian (issue 15: "a Debian VM booting from a
# lazy LUN"): a Debian 12 (bookworm) root made with debootstrap on an ext4 image that the VM boots
# from, with the kernel and initramfs common.sh makes (the initramfs, debian/initramfs-init, only
# mounts the root from /dev/vda read-only and hands over to systemd, as Debian's would):
#
#   debootstrap --variant=minbase, with systemd-sysv and udev (a VM's ordinary boot: units,
#   libraries, udev's coldplug loading modules from the disk, fsck and remount of the root),
#   kmod, e2fsprogs and python3 (the workload imports Python modules)
#   /lib/modules/KVER, /boot   the whole kernel package's modules and /boot, as a Debian VM has
#   lzw.service                runs debian/lzw-workload once the boot is done (multi-user.target):
#                              read 2,000 files, import Python modules, 500 random 4 KiB
#                              accesses in /var/lib/lzw/db.bin (64 MiB), write 8 MiB, sync,
#                              power off; lzw-sampler.service prints the disk's counters
#   a machine-id (the image is not on its first boot); getty on the console masked (the
#   workload's lines go there)
#   disk.img                   DISK_MIB of ext4, sparse (the free space is holes)
#
#   build-debian.sh [--if-needed]   output in $LAZYISCSI_BENCH_DEBIAN (default
#                                   /var/tmp/lazyiscsi-bench-debian)
#
# Everything comes from the Debian mirror in the host's apt sources (about 100 MB, kept in
# $OUT.debs for re-runs). Needs debootstrap, qemu-system-x86, cpio, e2fsprogs (mkfs.ext4 -d), kmod
# (depmod); root.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${LAZYISCSI_BENCH_DEBIAN:-/var/tmp/lazyiscsi-bench-debian}
SUITE=bookworm
PACKAGES=systemd-sysv,udev,kmod,e2fsprogs,python3
# the root holds about 620 MiB; the rest is room a VM's disk has, holes in the image
DISK_MIB=1024
# shellcheck source=common.sh
. "$HERE/common.sh"
HASH=$( (cat "$HERE/build-debian.sh" "$HERE/common.sh" "$HERE"/debian/* "$GUEST/kernel_files.py") \
  | sha256sum | cut -c1-16)
begin_build "$@"
command -v debootstrap >/dev/null || { echo "bench vm: debootstrap is missing"; exit 1; }
# the mirror the host's apt uses for $SUITE; none is a clear error, not a guessed host
MIRROR=$(python3 "$GUEST/apt_mirror.py" "$SUITE") || { echo "bench vm: no Debian mirror"; exit 1; }
fetch_kernel
make_initramfs "$HERE/debian/initramfs-init" $BOOT_MODULES

step "root: debootstrap $SUITE minbase + $PACKAGES from $MIRROR"
mkdir -p "$OUT.debs/debootstrap"
if ! debootstrap --variant=minbase --include="$PACKAGES" --cache-dir="$OUT.debs/debootstrap" \
    "$SUITE" root "$MIRROR" > debootstrap.log 2>&1; then
  tail -30 debootstrap.log; exit 1
fi
rm -rf root/var/cache/apt/archives/*.deb root/var/lib/apt/lists/*
mkdir -p root/lib/modules
cp -a "$MODS" root/lib/modules/
cp kernel/boot/* root/boot/
echo "/dev/vda / ext4 errors=remount-ro 0 1" > root/etc/fstab
echo lzw-debian > root/etc/hostname
: > root/etc/machine-id
chroot root systemd-machine-id-setup >/dev/null 2>&1
# the db phase's file: 64 MiB of random data (allocated, as a database's file is)
mkdir -p root/var/lib/lzw
head -c 64M /dev/urandom > root/var/lib/lzw/db.bin
install -m 0755 "$HERE/debian/lzw-workload" "$HERE/debian/lzw-sampler" root/usr/local/sbin/
install -m 0644 "$HERE/debian/lzw.service" "$HERE/debian/lzw-sampler.service" root/etc/systemd/system/
mkdir -p root/etc/systemd/system/multi-user.target.wants root/etc/systemd/system/sysinit.target.wants
ln -sf ../lzw.service root/etc/systemd/system/multi-user.target.wants/lzw.service
ln -sf ../lzw-sampler.service root/etc/systemd/system/sysinit.target.wants/lzw-sampler.service
for unit in serial-getty@ttyS0.service getty@tty1.service; do
  ln -sf /dev/null "root/etc/systemd/system/$unit"
done

step "disk: ${DISK_MIB} MiB ext4 of $(du -sm root | cut -f1) MiB"
mkfs.ext4 -q -F -b 4096 -L lzroot -d root new/disk.img "${DISK_MIB}M"
finish_build
step "done: $(du -sh "$OUT" | cut -f1) in $OUT"
