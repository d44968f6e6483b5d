#!/usr/bin/env bash
# Boots the kernel-tier guest under QEMU (TCG: this machine's KVM cannot run a stock kernel) and
# runs one shell command line in it, in the project directory shared at /project. Our exit status
# is the command's; 125 when the guest never reported one (crash or timeout). The console goes to
# stdout.
#
#   run.sh [-p PROJECT_DIR] [-f FILE]... COMMAND...
#   -f FILE: copied for the guest to /control/ (e.g. the .deb to install)
#   env: LAZYISCSI_GUEST (built guest), GUEST_MEM (MiB, 2048), GUEST_SMP (2), GUEST_TIMEOUT (s, 900)
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${LAZYISCSI_GUEST:-/var/tmp/lazyiscsi-guest}
PROJECT=$(cd "$HERE/../../.." && pwd)
usage() { echo "usage: run.sh [-p PROJECT_DIR] [-f FILE]... COMMAND..." >&2; exit 2; }
CONTROL=$(mktemp -d /tmp/lazyiscsi-guest-control.XXXXXX)
trap 'rm -rf "$CONTROL"' EXIT
while [ $# -gt 1 ]; do
  case "$1" in
    -p) PROJECT=$(cd "$2" && pwd) || usage ;;
    -f) cp "$2" "$CONTROL/" || usage ;;
    *) break ;;
  esac
  shift 2
done
[ $# -gt 0 ] || usage
[ -f "$OUT/stamp" ] || { echo "run.sh: no guest in $OUT (run build.sh)" >&2; exit 2; }
printf '%s\n' "$*" > "$CONTROL/cmd.sh"

timeout "${GUEST_TIMEOUT:-900}" qemu-system-x86_64 \
  -accel tcg,thread=multi -cpu max -smp "${GUEST_SMP:-2}" -m "${GUEST_MEM:-2048}" \
  -nographic -nodefaults -serial stdio -no-reboot -nic none \
  -kernel "$OUT/vmlinux" -initrd "$OUT/initrd.img" \
  -append "console=ttyS0 panic=-1 quiet loglevel=4" \
  -virtfs "local,path=$OUT/rootfs,mount_tag=rootfs,security_model=none,readonly=on,id=rootfs" \
  -virtfs "local,path=$PROJECT,mount_tag=project,security_model=none,id=project" \
  -virtfs "local,path=$CONTROL,mount_tag=control,security_model=none,id=control" \
  </dev/null 2>&1 | tr -d '\r'
status=("${PIPESTATUS[@]}")
if [ -s "$CONTROL/rc" ]; then exit "$(cat "$CONTROL/rc")"; fi
echo "run.sh: the guest reported no exit status (qemu: ${status[0]})" >&2
exit 125
