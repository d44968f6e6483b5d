#!/usr/bin/env bash
# The main job on an embedded default: a local source (a generated 256 MiB image with holes,
# served by nbdkit on loopback with 20 ms of added delay, as a WAN would be) hydrated into a
# cache file by `lazyiscsi hydrate`. Installs what it needs; safe to run twice (the second run
# finds the cache complete, or resumes it if the first was interrupted).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
work=${LAZYISCSI_DEMO_DIR:-/var/tmp/lazyiscsi-demo}
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
trap 'kill $nbdkit_pid 2>/dev/null || true' EXIT
for _ in $(seq 50); do [ -S "$sock" ] && break; sleep 0.1; done
.venv/bin/lazyiscsi hydrate --source "nbd+unix:///?socket=$sock" --cache "$work/cache.img" --progress-interval 1
cmp "$work/source.img" "$work/cache.img" && echo "demo: cache is byte-identical to the source"
