#!/usr/bin/env bash
# The second demo (issue 11): a tiny VM (Debian's distribution kernel and a busybox initramfs,
# under QEMU/TCG) rewrites and re-reads records on its disk at a source site (a
# qemu-storage-daemon owning the image, with a dirty bitmap), and is live-migrated to a
# destination QEMU whose disk is a lazy LUN served by `lazyiscsi serve --live --dirty-bitmap`:
# pre-copy while the VM runs at the source, QMP migrate, `lazyiscsi cutover`, `cont`, post-copy
# while it runs at the destination. It prints the phases with their timings and the final
# verification (the VM read no stale record; the LUN equals the source's last state plus the
# destination's writes; the source holds none of them). tests/migration/harness.py does the work,
# the same code as the test; `demo-live-migration.sh live` or `static` runs the other variants
# (static: without --live, where the VM finds stale records and the demo exits 1).
# Installs what it needs (the VM is built once from the host's apt sources into
# $LAZYISCSI_VM, default /var/tmp/lazyiscsi-vm); safe to run twice (each run starts afresh in
# $LAZYISCSI_DEMO_LIVE_DIR, default /var/tmp/lazyiscsi-demo-live).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m tests.migration.harness "${1:-precopy}" \
  --work "${LAZYISCSI_DEMO_LIVE_DIR:-/var/tmp/lazyiscsi-demo-live}"
