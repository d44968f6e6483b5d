#!/usr/bin/env bash
# Installs what lazyiscsi and its tests need on Debian 12: the peers from Debian's packages and the
# project in a virtualenv at .venv. Safe to run twice: it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# The peers the tests drive (nbdkit, qemu-img/qemu-io/qemu-nbd and QEMU's iSCSI driver, nginx,
# libiscsi's tools and iscsi-test-cu, tgtd), the linters of what ships (mandoc, groff, systemd-analyze)
# and the commands the tests call (openssl for TLS sources, pgrep, dbus-daemon and dbus-send for
# the D-Bus side targetcli talks to); QEMU and cpio for the VM the migration test and demo build
# (tests/migration/vm/build.sh); debootstrap and kmod for the kernel tier's guest, which
# tests/kernel/guest/build.sh makes while other tests run (so it need not install them then).
# `lazyiscsi shell` is tested on Debian's python3 too, with Debian's configshell-fb and
# targetcli-fb (test_shell_debian.py): those and the python3 packages that test runs on.
PACKAGES=(nbdkit libnbd-bin qemu-utils qemu-block-extra qemu-system-common qemu-system-x86 cpio debootstrap kmod
          nginx-light libiscsi-bin tgt mandoc groff-base systemd openssl procps dbus-daemon dbus-bin
          targetcli-fb python3-configshell-fb python3-rtslib-fb python3-gevent python3-structlog
          python3-crc32c python3-pytest python3-pytest-timeout)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
fi
# nginx-light's postinst starts a system nginx on port 80; our tests run their own instances.
systemctl disable --now nginx >/dev/null 2>&1 || true
# journald (the journald test runs one of its own) keeps its journal under the machine ID; a root
# made by debootstrap has none, every installed Debian system has one: make it as systemd does.
[ -s /etc/machine-id ] || systemd-machine-id-setup >/dev/null

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip >/dev/null
.venv/bin/pip install -q -e '.[test]'
