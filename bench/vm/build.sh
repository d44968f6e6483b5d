#!/usr/bin/env bash
# Builds the VM of bench/vm_workload.py --workload synthetic (common.sh: the kernel and the
# initramfs both VMs share): a busybox initramfs whose init is the workload (init,
# beside this file) with the modules it needs to mount ext4 from virtio-blk, and the VM's disk:
# a 256 MiB ext4 image holding a small root-like tree made from the same kernel package:
#
#   /boot            the kernel package's /boot (vmlinuz, System.map, config): the "boot" phase
#   /lib/modules/... the first FILES module files of at most 48 KiB sorted by path (46 MiB; small
#                    files, as a root file system's are): the "files" phase reads them
#   /var/lib/db.bin  64 MiB of random data: the "db" phase reads and writes 4 KiB at random in it
#   /usr/share/cold  64 MiB of random data the workload never reads (the rest of a root file
#                    system: what a lazy disk's copier moves besides what the VM asks for)
#
#   build.sh [--if-needed]     output in $LAZYISCSI_BENCH_VM (default /var/tmp/lazyiscsi-bench-vm)
#
# The kernel and busybox-static .debs come from the host's apt sources (about 70 MB, once).
# Needs qemu-system-x86, cpio, e2fsprogs (mkfs.ext4 -d). build-debian.sh builds the other VM.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${LAZYISCSI_BENCH_VM:-/var/tmp/lazyiscsi-bench-vm}
FILES=2000
DISK_MIB=256
DATA_MIB=64
# shellcheck source=common.sh
. "$HERE/common.sh"
HASH=$( (cat "$HERE/build.sh" "$HERE/common.sh" "$HERE/init" "$GUEST/kernel_files.py") | sha256sum | cut -c1-16)
begin_build "$@"
fetch_kernel
make_initramfs "$HERE/init" $BOOT_MODULES

step "disk: ext4 with /boot, $FILES module files, db.bin and cold data"
mkdir -p root/boot root/lib/modules/"$KVER" root/var/lib root/usr/share
cp kernel/boot/* root/boot/
# sed, not head: head would close the pipe early, and pipefail would fail the build
(cd "$MODS" && find kernel -type f -size -49k | LC_ALL=C sort | sed -n "1,${FILES}p" \
   | xargs cp --parents -t "$WORK/root/lib/modules/$KVER")
head -c $((DATA_MIB << 20)) /dev/urandom > root/var/lib/db.bin
head -c $((DATA_MIB << 20)) /dev/urandom > root/usr/share/cold
mkfs.ext4 -q -F -b 4096 -L lzroot -d root new/disk.img "${DISK_MIB}M"
finish_build
step "done: $(du -sh "$OUT" | cut -f1) in $OUT ($(du -sm root/lib/modules | cut -f1) MiB of module files)"
