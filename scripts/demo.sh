#!/usr/bin/env bash
# The main job on an embedded default: a local source (a generated 256 MiB image with holes,
# served by nbdkit on loopback with 20 ms of added delay, as a WAN would be) exported as an iSCSI
# LUN by `lazyiscsi serve` on the embedded userspace portal. While the LUN hydrates, QEMU's
# iSCSI initiator reads all of it and the copy is compared with the source. With --keep the
# portal stays up (Ctrl-C to stop) so that you can attach your own initiator.
# Installs what it needs; safe to run twice (the second run resumes or finds the cache complete).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
work=${LAZYISCSI_DEMO_DIR:-/var/tmp/lazyiscsi-demo}
port=${LAZYISCSI_DEMO_PORT:-3260}
mkdir -p "$work"
if [ ! -f "$work/source.img" ]; then
  echo "demo: making a 256 MiB source image with holes in $work/source.img"
  truncate -s 256M "$work/source.img.tmp"
  for i in 0 1 2 3 4 5 6 7; do   # 8 data regions of 16 MiB, the rest holes
    dd if=/dev/urandom of="$work/source.img.tmp" bs=1M count=16 seek=$((i * 32)) conv=notrunc status=none
  done
  mv "$work/source.img.tmp" "$work/source.img"
fi
sock="$work/nbd.sock"
rm -f "$sock"
nbdkit -r -f --exit-with-parent -U "$sock" --filter=delay file "$work/source.img" rdelay=20ms &
nbdkit_pid=$!
serve_pid=""
trap 'kill $serve_pid $nbdkit_pid 2>/dev/null || true' EXIT
for _ in $(seq 50); do [ -S "$sock" ] && break; sleep 0.1; done
iqn=iqn.2026-11.io.lazyiscsi:demo
.venv/bin/lazyiscsi --log-level warning --control "$work/control.sock" serve --frontend portal --state-dir "$work/state" --source "nbd+unix:///?socket=$sock" --cache "$work/cache.img" \
  --iqn "$iqn" --listen "127.0.0.1:$port" &
serve_pid=$!
for _ in $(seq 50); do (echo > "/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
echo "demo: reading the LUN through QEMU's iSCSI initiator while it hydrates"
qemu-img convert -p -O raw "iscsi://127.0.0.1:$port/$iqn/0" "$work/through-iscsi.img"
cmp "$work/source.img" "$work/through-iscsi.img" && echo "demo: what the initiator read is byte-identical to the source"
rm -f "$work/through-iscsi.img"
if [ "${1:-}" = "--keep" ]; then
  echo "demo: serving until Ctrl-C"
  wait "$serve_pid"
fi
