#!/usr/bin/env bash
# nixless under a real systemd: Debian VM tests (vm-tests/debian/README.md).
# Installs what is missing (debootstrap, qemu, nginx, Nix, musl tools), builds
# the static binary, builds or reuses the cached Debian image, and runs the
# scenarios: READY and the service watchdog; a signed deploy through the
# switch unit with the agent's self-update; a hang while verifying ended by
# the hardware watchdog; boot deploys through UEFI firmware and systemd-boot.
# Then the same static binary built for aarch64 in an arm64 Debian guest
# (qemu-system-aarch64, TCG, a real arm64 kernel): READY, the service
# watchdog, the seccomp filter, a signed deploy. NIXLESS_SKIP_ARM_VM=1 leaves
# the arm64 guest out. Last line: `N passed, N failed` (both guests).
#
#   tests/debian-vm.sh [SCENARIO...]     # the arm64 guest runs those of them it has
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
arm=1
[ -n "${NIXLESS_SKIP_ARM_VM:-}" ] && arm=
if [ -n "$arm" ]; then
  # The arm64 guest: its machine, qemu-user for the image's second stage
  # (binfmt_misc), a C cross compiler for ring (.cargo/config.toml).
  command -v qemu-system-aarch64 >/dev/null || need+=(qemu-system-arm)
  command -v qemu-aarch64-static >/dev/null || need+=(qemu-user-static)
  command -v aarch64-linux-gnu-gcc >/dev/null || need+=(gcc-aarch64-linux-gnu)
fi
install_pkgs "${need[@]}"
command -v qemu-img >/dev/null || install_pkgs qemu-utils

targets=(x86_64-unknown-linux-musl)
[ -z "$arm" ] || targets+=(aarch64-unknown-linux-musl)
for t in "${targets[@]}"; do
  rustup target list --installed 2>/dev/null | grep -q "$t" || rustup target add "$t"
  echo "== static musl release build ($t)"
  cargo build -q --release --target "$t"
done

log=$(mktemp)
trap 'rm -f "$log"' EXIT
passed=0 failed=0 rc_all=0
# One guest's run; its last line is its count (whatever went wrong before
# the scenarios could count, a missing count line is one failure).
tier() {
  local rc
  set +e
  "$@" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  set -e
  local last
  last=$(tail -n 1 "$log")
  if [[ $last =~ ^([0-9]+)\ passed,\ ([0-9]+)\ failed$ ]]; then
    passed=$((passed + BASH_REMATCH[1])) failed=$((failed + BASH_REMATCH[2]))
  else
    echo "debian-vm: the run ended early (exit $rc)"
    failed=$((failed + 1))
    [ "$rc" -ne 0 ] || rc=1
  fi
  [ "$rc" -eq 0 ] || rc_all=$rc
}

echo "== Debian VM tests (x86_64 guest)"
t0=$(date +%s)
tier vm-tests/debian/run-test.sh "$@"
echo "== x86_64 guest: $(($(date +%s) - t0)) s"
if [ -n "$arm" ]; then
  echo "== Debian VM tests (arm64 guest, aarch64 binary)"
  t0=$(date +%s)
  tier env VMTEST_ARCH=aarch64 vm-tests/debian/run-test.sh --skip-unsupported "$@"
  echo "== arm64 guest: $(($(date +%s) - t0)) s"
else
  echo "== arm64 guest skipped (NIXLESS_SKIP_ARM_VM)"
fi
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ] && [ "$rc_all" -eq 0 ]
