#!/usr/bin/env bash
# Builds the fake NixOS systems (tests/support/systems.nix) and publishes
# them, signed with the fixtures' key A, to DIR/cache-systems (zstd).
# Needs fixtures.sh to have run on DIR (keys). Idempotent, locked; writes
# DIR/systems.env (SYS_A, SYS_B, SYS_C, CACHE_SYSTEMS) last.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
dir=${1:-${CARGO_TARGET_DIR:-./target}/fixtures}
dir=$(cd "$dir" && pwd)
# Rebuilt when systems.nix changes.
stamp=$(sha256sum "$here/systems.nix" | cut -c1-16)
fresh() { [ -s "$dir/systems.env" ] && grep -q "^SYSTEMS_STAMP=$stamp\$" "$dir/systems.env"; }
fresh && exit 0
exec 8>"$dir/.systems.lock"
flock 8
fresh && exit 0
export NIX_CONFIG=$'build-users-group =\nexperimental-features = nix-command\nsandbox = false\nsubstituters ='
mkdir -p "$dir/gcroots"
declare -A sys
for n in a b c; do
  sys[$n]=$(readlink -f "$(nix-build "$here/systems.nix" -A "$n" -o "$dir/gcroots/system-$n" --quiet)")
done
rm -rf "$dir/cache-systems"
nix copy --to "file://$dir/cache-systems?compression=zstd&secret-key=$dir/keys/a.sk" "${sys[a]}" "${sys[b]}" "${sys[c]}" 2>"$dir/copy-systems.log"
{
  echo "SYS_A=${sys[a]}"
  echo "SYS_B=${sys[b]}"
  echo "SYS_C=${sys[c]}"
  echo "CACHE_SYSTEMS=$dir/cache-systems"
  echo "SYSTEMS_STAMP=$stamp"
} > "$dir/systems.env.tmp"
mv "$dir/systems.env.tmp" "$dir/systems.env"
