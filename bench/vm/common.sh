# Sourced by bench/vm/build.sh and bench/vm/build-debian.sh: what both VMs of bench/vm_workload.py
# are made from. Both boot Debian's distribution kernel as an ELF through PVH (as
# tests/migration/vm/build.sh does) with a busybox initramfs that loads the modules to reach an
# ext4 file system on virtio-blk; they differ in the disk and in what the initramfs runs.
#
# The caller sets HERE (this directory), OUT (the output directory) and HASH (of every file its
# output is made from), then calls, in order:
#   begin_build "$@"          one build at a time (flock on $OUT.lock); exit 0 when --if-needed
#                             and $OUT was built from the same files; cd into a fresh work dir
#   fetch_kernel [DEB...]     the kernel package (and busybox-static and DEBs) from the host's apt
#                             sources, kept in $OUT.debs; unpacked: sets KVER and MODS, writes
#                             new/vmlinux and new/kernel-version
#   make_initramfs INIT MODULE...   new/initrd.img: busybox, the modules, INIT as /init
#   finish_build              new/ replaces $OUT, stamped with HASH
GUEST=$(cd "$HERE/../../tests/kernel/guest" && pwd)
# virtio-blk behind virtio-pci, and ext4 (a module in Debian's kernel; crc32c for its checksums)
BOOT_MODULES="virtio_pci virtio_blk crc32c_generic ext4"

begin_build() {
  mkdir -p "$(dirname "$OUT")"
  exec 9>"$OUT.lock"
  flock 9
  if [ "${1:-}" = --if-needed ] && [ "$(cat "$OUT/stamp" 2>/dev/null)" = "$HASH" ]; then
    echo "bench vm: $OUT is up to date"; exit 0
  fi
  t0=$SECONDS
  for tool in qemu-system-x86_64 cpio mkfs.ext4 apt-get depmod; do
    command -v "$tool" >/dev/null || { echo "bench vm: $tool is missing"; exit 1; }
  done
  WORK=$(mktemp -d "$OUT.work.XXXXXX")
  trap 'rm -rf "$WORK"' EXIT
  cd "$WORK"
  mkdir -p new
}

step() { echo "bench vm build +$((SECONDS - t0))s: $*"; }

fetch_kernel() {
  step "kernel and busybox from the host's apt sources"
  KPKG=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}')
  if [ -z "$KPKG" ] || ! apt-cache show busybox-static >/dev/null 2>&1; then
    echo "bench vm: this host's apt sources offer no linux-image-amd64 or busybox-static"; exit 1
  fi
  # kept beside the output: a change of an init or of a recipe needs no second download
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
  python3 "$GUEST/kernel_files.py" vmlinux "kernel/boot/vmlinuz-$KVER" new/vmlinux
  echo "$KVER" > new/kernel-version
}

make_initramfs() {
  local init=$1 f
  shift
  step "initramfs"
  mkdir -p initramfs/{bin,modules,proc,sys,dev,tmp,mnt,root}
  cp busybox/bin/busybox initramfs/bin/
  for f in $(python3 "$GUEST/kernel_files.py" modules "$MODS" "$@"); do
    cp "$MODS/$f" initramfs/modules/
    basename "$f" >> initramfs/modules/order
  done
  install -m 0755 "$init" initramfs/init
  (cd initramfs && find . | cpio -o -H newc --quiet | gzip -1) > new/initrd.img
}

finish_build() {
  echo "$HASH" > new/stamp
  rm -rf "$OUT"
  mv new "$OUT"
}
