#!/usr/bin/env bash
# Builds the VM of bench/vm_workload.py: Debian's distribution kernel (booted as an ELF through
# PVH, as tests/migration/vm/build.sh does), a busybox initramfs whose init is the workload (init,
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
# Needs qemu-system-x86, cpio, e2fsprogs (mkfs.ext4 -d).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
GUEST=$(cd "$HERE/../../tests/kernel/guest" && pwd)
OUT=${LAZYISCSI_BENCH_VM:-/var/tmp/lazyiscsi-bench-vm}
# virtio-blk behind virtio-pci, and ext4 (a module in Debian's kernel; crc32c for its checksums)
BOOT_MODULES="virtio_pci virtio_blk crc32c_generic ext4"
FILES=2000
DISK_MIB=256
DATA_MIB=64

HASH=$( (cat "$HERE/build.sh" "$HERE/init" "$GUEST/kernel_files.py") | sha256sum | cut -c1-16)
mkdir -p "$(dirname "$OUT")"
exec 9>"$OUT.lock"
flock 9
if [ "${1:-}" = --if-needed ] && [ "$(cat "$OUT/stamp" 2>/dev/null)" = "$HASH" ]; then
  echo "bench vm: $OUT is up to date"; exit 0
fi
t0=$SECONDS
step() { echo "bench vm build +$((SECONDS - t0))s: $*"; }
for tool in qemu-system-x86_64 cpio mkfs.ext4 apt-get; do
  command -v "$tool" >/dev/null || { echo "bench vm: $tool is missing"; exit 1; }
done

WORK=$(mktemp -d "$OUT.work.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"
step "kernel and busybox from the host's apt sources"
KPKG=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}')
if [ -z "$KPKG" ] || ! apt-cache show busybox-static >/dev/null 2>&1; then
  echo "bench vm: this host's apt sources offer no linux-image-amd64 or busybox-static"; exit 1
fi
# kept beside the output: a change of init or of this script needs no second download
DEBS=$OUT.debs
mkdir -p "$DEBS"
if ! ls "$DEBS/$KPKG"_*.deb "$DEBS"/busybox-static_*.deb >/dev/null 2>&1; then
  (cd "$DEBS" && apt-get download -qq "$KPKG" busybox-static 2>&1 \
     | grep -v "^W: Download is performed unsandboxed" || true)
fi
dpkg -x "$DEBS/$KPKG"_*.deb kernel
dpkg -x "$DEBS"/busybox-static_*.deb busybox
KVER=$(ls kernel/lib/modules)
MODS=kernel/lib/modules/$KVER
depmod -b kernel "$KVER"
mkdir -p new
python3 "$GUEST/kernel_files.py" vmlinux "kernel/boot/vmlinuz-$KVER" new/vmlinux
echo "$KVER" > new/kernel-version

step "initramfs"
mkdir -p initramfs/{bin,modules,proc,sys,dev,tmp,mnt}
cp busybox/bin/busybox initramfs/bin/
for f in $(python3 "$GUEST/kernel_files.py" modules "$MODS" $BOOT_MODULES); do
  cp "$MODS/$f" initramfs/modules/
  basename "$f" >> initramfs/modules/order
done
install -m 0755 "$HERE/init" initramfs/init
(cd initramfs && find . | cpio -o -H newc --quiet | gzip -1) > new/initrd.img

step "disk: ext4 with /boot, $FILES module files, db.bin and cold data"
mkdir -p root/boot root/lib/modules/"$KVER" root/var/lib root/usr/share
cp kernel/boot/* root/boot/
# sed, not head: head would close the pipe early, and pipefail would fail the build
(cd "$MODS" && find kernel -type f -size -49k | LC_ALL=C sort | sed -n "1,${FILES}p" \
   | xargs cp --parents -t "$WORK/root/lib/modules/$KVER")
head -c $((DATA_MIB << 20)) /dev/urandom > root/var/lib/db.bin
head -c $((DATA_MIB << 20)) /dev/urandom > root/usr/share/cold
mkfs.ext4 -q -F -b 4096 -L lzroot -d root new/disk.img "${DISK_MIB}M"
echo "$HASH" > new/stamp
rm -rf "$OUT"
mv new "$OUT"
step "done: $(du -sh "$OUT" | cut -f1) in $OUT ($(du -sm root/lib/modules | cut -f1) MiB of module files)"
