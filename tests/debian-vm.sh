#!/usr/bin/env bash
# nixless under a real systemd: Debian VM tests (vm-tests/debian/README.md).
# Installs what is missing (debootstrap, qemu, nginx, Nix, musl tools), builds
# the static binary, builds or reuses the cached Debian image, and runs the
# scenarios: READY and the service watchdog; a signed deploy through the
# switch unit with the agent's self-update; a hang while verifying ended by
# the hardware watchdog; boot deploys through UEFI firmware and systemd-boot.
# Last line: `N passed, N failed`.
#
#   tests/debian-vm.sh [SCENARIO...]
set -euo pipefail
cd "$(dirname "$0")/.."

install_pkgs() {
  ((${#@})) || return 0
  echo "== installing $*"
  [ -n "${apt_updated:-}" ] || { apt-get update -qq; apt_updated=1; }
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
need=()
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
command -v nginx >/dev/null || need+=(nginx-light)
command -v nix-build >/dev/null || need+=(nix-bin)
command -v musl-gcc >/dev/null || need+=(musl-tools)
# The uefi-boot scenario: UEFI firmware, and tools to make its ESP image.
[ -e /usr/share/OVMF/OVMF_CODE_4M.fd ] || need+=(ovmf)
command -v sfdisk >/dev/null || need+=(fdisk)
command -v mkfs.vfat >/dev/null || need+=(dosfstools)
command -v mcopy >/dev/null || need+=(mtools)
# Debian's qemu-system-x86 replaces a newer qemu-utils (from backports) with
# its own version's: install it first, then qemu-utils if it went away.
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
install_pkgs "${need[@]}"
command -v qemu-img >/dev/null || install_pkgs qemu-utils

rustup target list --installed 2>/dev/null | grep -q x86_64-unknown-linux-musl \
  || rustup target add x86_64-unknown-linux-musl
echo "== static musl release build"
cargo build -q --release --target x86_64-unknown-linux-musl

echo "== Debian VM tests"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
vm-tests/debian/run-test.sh "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
# Whatever went wrong before the scenarios could count, the last line counts.
if ! tail -n 1 "$log" | grep -qE '^[0-9]+ passed, [0-9]+ failed$'; then
  echo "debian-vm: the run ended early (exit $rc)"
  echo "0 passed, 1 failed"
  exit 1
fi
exit "$rc"
