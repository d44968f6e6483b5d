#!/usr/bin/env bash
# Builds the Debian package from this tree (debian/: debhelper + pybuild on Debian 12's python3
# packages) and prints the path of the .deb on its last line. Build dependencies come from apt
# (`apt-get build-dep` on the tree). The tree is copied first: dpkg-buildpackage writes beside
# the source directory and into debian/, and the checkout stays as it was.
#
#   deb.sh [OUTDIR]        OUTDIR: where the .deb goes (default /var/tmp/lazyiscsi-deb)
#   env DEB_BUILD_OPTIONS=nocheck  skips the unit tests run at build time
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=$(mkdir -p "${1:-/var/tmp/lazyiscsi-deb}" && cd "${1:-/var/tmp/lazyiscsi-deb}" && pwd)
export DEBIAN_FRONTEND=noninteractive
APT=(apt-get -o DPkg::Lock::Timeout=600 -y -qq --no-install-recommends)
if ! (cd "$REPO" && dpkg-checkbuilddeps >/dev/null 2>&1); then
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  # dpkg-dev is what reads debian/control; build-dep then installs what it names
  "${APT[@]}" install dpkg-dev >/dev/null
  "${APT[@]}" build-dep "$REPO" >/dev/null
fi
WORK=$(mktemp -d /tmp/lazyiscsi-deb.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
mkdir "$WORK/src"
# what git tracks, with this checkout's changes (not .venv, not build leftovers)
(cd "$REPO" && git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$WORK/src")
# Debian's python3 only (a python3.11 earlier in PATH, e.g. pyenv's, would be picked by pybuild)
(cd "$WORK/src" && PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg-buildpackage -us -uc -b >"$WORK/build.log" 2>&1) \
  || { tail -60 "$WORK/build.log"; echo "deb: dpkg-buildpackage failed"; exit 1; }
rm -f "$OUT"/lazyiscsi_*.deb
cp "$WORK"/lazyiscsi_*.deb "$OUT/"
ls "$OUT"/lazyiscsi_*.deb
