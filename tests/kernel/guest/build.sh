#!/usr/bin/env bash
# Builds the kernel-tier guest: Debian's distribution kernel (LIO, target_core_user and the
# open-iscsi initiator are modules there) and a minimal bookworm root directory that QEMU shares
# read-only over 9p, with the Python packages lazyiscsi needs. No disk image: the guest writes to
# a tmpfs overlay. Everything comes from the Debian mirror in the host's apt sources and PyPI.
#
#   build.sh [--if-needed]     output in $LAZYISCSI_GUEST (default /var/tmp/lazyiscsi-guest)
#
# --if-needed does nothing when the output was built from these same files and requirements.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../../.." && pwd)
OUT=${LAZYISCSI_GUEST:-/var/tmp/lazyiscsi-guest}
SUITE=bookworm
# Two Python environments for the code under test. Debian's python3 packages, system-wide: what
# the .deb depends on (tests/kernel/tier.py installs it at boot) and what the project share runs
# on. And the venv /opt/lazyiscsi/pypi with the newest PyPI releases of what setup.py asks for (rtslib-fb
# 2.2.x among them), as `pip install` gives a user.
PY_DEPS=$(cd "$REPO" && python3 -c 'import ast,sys
t=ast.parse(open("setup.py").read())
for n in ast.walk(t):
    if isinstance(n, ast.keyword) and n.arg == "install_requires":
        print(" ".join(e.value for e in n.value.elts))')
# dbus (the system bus), targetcli-fb and tcmu-runner: the operator's tools the targetcli tests drive
GUEST_PACKAGES=python3,python3-gevent,python3-structlog,python3-crc32c,python3-rtslib-fb,python3-jeepney,dbus,targetcli-fb,tcmu-runner,python3-pytest,python3-pytest-timeout,open-iscsi,nbdkit,kmod,procps,iproute2,util-linux,e2fsprogs,sg3-utils,fio
GUEST_MODULES="configfs uio target_core_mod target_core_user target_core_file target_core_iblock
  target_core_pscsi iscsi_target_mod iscsi_tcp sd_mod sg crc32c_generic crct10dif_generic ext4"  # rtslib loads all backstores
BOOT_MODULES="virtio_pci 9pnet_virtio 9p overlay"

HASH=$( (cat "$HERE/build.sh" "$HERE/kernel_files.py" "$HERE/init" "$HERE/initramfs-init"; echo "$PY_DEPS") \
  | sha256sum | cut -c1-16)
if [ "${1:-}" = --if-needed ] && [ "$(cat "$OUT/stamp" 2>/dev/null)" = "$HASH" ]; then
  echo "guest: $OUT is up to date"; exit 0
fi
t0=$SECONDS
step() { echo "guest build +$((SECONDS - t0))s: $*"; }

step "host packages"
export DEBIAN_FRONTEND=noninteractive
need=()
for p in qemu-system-x86 debootstrap kmod cpio; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if [ "${#need[@]}" -gt 0 ]; then
  for _ in 1 2 3; do apt-get -o DPkg::Lock::Timeout=600 update -qq && break; sleep 5; done
  apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# the mirror the host's apt uses for $SUITE; none is a clear error, not a guessed host
MIRROR=$(python3 "$HERE/apt_mirror.py" "$SUITE") || { echo "guest: cannot build without a Debian mirror"; exit 1; }

rm -rf "$OUT"
mkdir -p "$OUT/work"
cd "$OUT/work"

step "kernel"
KPKG=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-/{print $2; exit}')
apt-get download -qq "$KPKG" busybox-static
dpkg -x "$KPKG"_*.deb kernel
dpkg -x busybox-static_*.deb busybox
KVER=$(ls kernel/lib/modules)
MODS=kernel/lib/modules/$KVER
depmod -b kernel "$KVER"
# QEMU boots the ELF through PVH: under TCG that skips seconds of xz decompression per boot
python3 "$HERE/kernel_files.py" vmlinux "kernel/boot/vmlinuz-$KVER" "$OUT/vmlinux"
echo "$KVER" > "$OUT/kernel-version"

step "root directory (debootstrap $SUITE from $MIRROR)"
if ! debootstrap --variant=minbase --include="$GUEST_PACKAGES" "$SUITE" "$OUT/rootfs" "$MIRROR" \
    > debootstrap.log 2>&1; then
  tail -30 debootstrap.log; exit 1
fi
mkdir -p "$OUT/rootfs/lib/modules/$KVER"
for f in $(python3 "$HERE/kernel_files.py" modules "$MODS" $GUEST_MODULES); do
  install -D -m 0644 "$MODS/$f" "$OUT/rootfs/lib/modules/$KVER/$f"
done
cp "$MODS"/modules.order "$MODS"/modules.builtin* "$OUT/rootfs/lib/modules/$KVER/"
depmod -b "$OUT/rootfs" "$KVER"
install -m 0755 "$HERE/init" "$OUT/rootfs/sbin/lazyiscsi-guest-init"
echo lazyiscsi-guest > "$OUT/rootfs/etc/hostname"
rm -rf "$OUT/rootfs/var/cache/apt/archives/"*.deb "$OUT/rootfs/var/lib/apt/lists/"* \
  "$OUT/rootfs/usr/share/doc" "$OUT/rootfs/usr/share/man" "$OUT/rootfs/usr/share/locale"

step "PyPI venv /opt/lazyiscsi/pypi: $PY_DEPS"
chroot "$OUT/rootfs" python3 -m venv --without-pip /opt/lazyiscsi/pypi
SITE=$(echo "$OUT"/rootfs/opt/lazyiscsi/pypi/lib/python3.*/site-packages)
PIP_PY=$REPO/.venv/bin/python   # made by scripts/setup.sh; Debian's python3 may have no pip
[ -x "$PIP_PY" ] || PIP_PY=python3
# shellcheck disable=SC2086
"$PIP_PY" -m pip install -q --disable-pip-version-check --target "$SITE" \
  --platform manylinux2014_x86_64 --python-version 3.11 --implementation cp --only-binary=:all: $PY_DEPS

step "initramfs"
mkdir -p initramfs/{bin,modules,proc,sys,dev,lower,rw,root}
cp busybox/bin/busybox initramfs/bin/
for f in $(python3 "$HERE/kernel_files.py" modules "$MODS" $BOOT_MODULES); do
  cp "$MODS/$f" initramfs/modules/
  basename "$f" >> initramfs/modules/order
done
install -m 0755 "$HERE/initramfs-init" initramfs/init
(cd initramfs && find . | cpio -o -H newc --quiet | gzip -1) > "$OUT/initrd.img"

cd "$OUT" && rm -rf "$OUT/work"
echo "$HASH" > "$OUT/stamp"
step "done: $(du -sh "$OUT" | cut -f1) in $OUT"
