#!/usr/bin/env bash
# Runs the Debian VM scenarios (see README.md beside this script):
#
#   vm-tests/debian/run-test.sh [SCENARIO...]    # ready-watchdog deploy hw-watchdog killed-switch uefi-boot (default: all)
#
# Builds or reuses the cached base image (build-image.sh), then boots one VM
# per scenario under qemu (TCG) and drives it through the backdoor. Uses the
# static binary at $NIXLESS_BIN (default target/x86_64-unknown-linux-musl/
# release/nixless: build it first) and the unit definitions in $VMTEST_UNITS
# (default nixos/units.json). Prints `VMTEST:<scenario>:<check>:PASS|FAIL:…`
# per check and `N passed, N failed` last; exits non-zero on any failure or
# when the whole run exceeds $VMTEST_TIMEOUT seconds (default 1500).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)

bin=${NIXLESS_BIN:-$repo/target/x86_64-unknown-linux-musl/release/nixless}
units=${VMTEST_UNITS:-$repo/nixos/units.json}
[ -x "$bin" ] || { echo "run-test: no nixless binary at $bin (cargo build --release --target x86_64-unknown-linux-musl)" >&2; exit 1; }
[ -f "$units" ] || { echo "run-test: no unit definitions at $units" >&2; exit 1; }
for t in qemu-system-x86_64 qemu-img nix-build nix nginx python3; do
  command -v "$t" >/dev/null || { echo "run-test: missing $t (tests/debian-vm.sh installs what is needed)" >&2; exit 1; }
done

t0=$(date +%s)
image=$("$here/build-image.sh")
echo "run-test: base image $image ($(($(date +%s) - t0)) s)"
exec timeout -k 30 "${VMTEST_TIMEOUT:-1500}" python3 "$here/scenarios.py" \
  --image "$image" --bin "$bin" --units "$units" "$@"
