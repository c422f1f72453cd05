#!/usr/bin/env bash
# Parse check of the Nix side, for machines without nixpkgs: every .nix file
# in the repository (target/ and fuzz/ excepted) must parse, and
# nixos/units.json, which the NixOS module and the Debian VM test both read,
# must be valid JSON of the expected shape. Exits non-zero on any failure.
#
# Parsing is all this can check: evaluating the module and the VM tests
# needs nixpkgs (`nix flake check` does that, where Nix and nixpkgs are).
set -uo pipefail
cd "$(dirname "$0")/.."

export NIX_CONFIG=$'experimental-features = nix-command\nsubstituters ='

command -v nix-instantiate >/dev/null || { echo "nix-instantiate not found (Debian: apt-get install nix-bin)"; exit 1; }

failed=0
checked=0
while IFS= read -r -d '' f; do
  checked=$((checked + 1))
  # dummy:// : no store or daemon needed, so this runs as any user.
  if ! out=$(nix-instantiate --store dummy:// --parse "$f" 2>&1 >/dev/null); then
    echo "FAIL $f"
    echo "$out" | sed 's/^/  /'
    failed=$((failed + 1))
  fi
done < <(find . \( -path ./target -o -path ./fuzz -o -path ./.git \) -prune -o -name '*.nix' -type f -print0 | sort -z)

if ((checked == 0)); then
  echo "FAIL no .nix files found"
  failed=$((failed + 1))
fi

if ! out=$(python3 -m json.tool nixos/units.json 2>&1 >/dev/null); then
  echo "FAIL nixos/units.json: $out"
  failed=$((failed + 1))
elif ! out=$(python3 - nixos/units.json <<'EOF' 2>&1
import json, sys
units = json.load(open(sys.argv[1]))
want = {"nixless-agent.service", "nixless-switch.path", "nixless-switch.service"}
assert set(units) == want, f"units {sorted(units)}, expected {sorted(want)}"
for name, sections in units.items():
    for sec, keys in sections.items():
        assert isinstance(keys, dict), f"{name} [{sec}] is not an object"
        for k, v in keys.items():
            ok = isinstance(v, str) or (isinstance(v, list) and v and all(isinstance(x, str) for x in v))
            assert ok, f"{name} [{sec}] {k}: plain strings or non-empty lists of strings only"
assert "@nixless@" in units["nixless-agent.service"]["Service"]["ExecStart"]
assert "@nixless@" in units["nixless-switch.service"]["Service"]["ExecStart"]
assert units["nixless-switch.service"]["Service"].get("X-RestartIfChanged") == "false"
assert units["nixless-switch.service"]["Service"].get("X-StopIfChanged") == "false"
EOF
); then
  echo "FAIL nixos/units.json: $out"
  failed=$((failed + 1))
fi

if ((failed)); then
  echo "nix-parse: $failed failure(s)"
  exit 1
fi
echo "nix-parse: $checked .nix files parse; nixos/units.json is valid"
