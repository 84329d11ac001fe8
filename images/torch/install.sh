#!/bin/sh
# Runs as root in the build stage of images/torch/Dockerfile: installs the Debian packages and
# the locked wheels, then copies every file that changed into $2, the one layer the final image
# takes (so neither the wheels nor the .deb files end up in it).
#   $1  the build context: requirements.lock, wheels/, debs/ (empty: packages come from apt)
#   $2  the staging directory
set -eu
ctx=$1
stage=$2
PACKAGES=$(cat "$ctx/debian-packages")   # what torch.compile needs on a CPU: g++, Python.h

marker=/tmp/ratchet-install.marker
: >"$marker"
sleep 1   # everything installed below has a newer ctime than the marker

export DEBIAN_FRONTEND=noninteractive
if ls "$ctx"/debs/*.deb >/dev/null 2>&1; then
  # Downloaded on the host against this image's package database (no network here).
  dpkg -i "$ctx"/debs/*.deb
else
  apt-get update
  # shellcheck disable=SC2086
  apt-get install -y --no-install-recommends $PACKAGES
  apt-get clean
  rm -rf /var/lib/apt/lists/*
fi
command -v g++ >/dev/null
test -f "/usr/include/python3.11/Python.h"

# pip runs from its own wheel: the sandbox image need not have pip. --no-deps + --require-hashes:
# exactly the lock, every file checked. Debian's python3 installs into /usr/local/lib/python3.11/
# dist-packages, ahead of the Debian packages on sys.path (numpy from the lock wins).
pip_whl=$(ls "$ctx"/wheels/pip-*.whl)
python3 "$pip_whl/pip" install --no-index --find-links "$ctx/wheels" --no-deps --require-hashes \
  --no-cache-dir --break-system-packages --root-user-action=ignore --disable-pip-version-check \
  -r "$ctx/requirements.lock"

mkdir -p "$stage"
cd /
find . -xdev \( -path ./proc -o -path ./sys -o -path ./dev -o -path ./tmp -o -path ./run \
  -o -path ./root -o -path ./var/log -o -path ./var/cache -o -path ./var/lib/apt/lists \
  -o -path "./${stage#/}" -o -path ./etc/hosts -o -path ./etc/hostname -o -path ./etc/resolv.conf \) \
  -prune -o ! -type d -cnewer "$marker" -print0 |
  tar --null --no-recursion -T - -cf - | tar -C "$stage" -xpf -
