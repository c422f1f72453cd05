#!/usr/bin/env bash
# Checks of the Nix side, for machines without nixpkgs: every .nix file in
# the repository (target/ and fuzz/ excepted) must parse; nixos/units.json,
# which the NixOS module and the Debian VM test both read, must be valid JSON
# of the expected shape; and two evaluations against stand-ins for nixpkgs
# (tests/nix/): the module against the option sets of the releases it
# supports (tests/nix/module-eval.nix: only declared, current option names;
# the assertions fire where nixless cannot work), and the VM tests' set-up
# (tests/nix/vm-script.nix: the test script carries no string context of the
# generation to deploy). Exits non-zero on any failure.
#
# Evaluating the module and the VM tests against real nixpkgs needs nixpkgs
# (`nix flake check` does that, where Nix and nixpkgs are).
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

# Each evaluation gives {"cases": N, "failures": [...]}; an evaluation error
# (an option read that a release lacks, say) fails it as well.
evals=0
for check in module-eval vm-script; do
  if ! out=$(nix-instantiate --store dummy:// --eval --strict --json \
    -E "import ./tests/nix/$check.nix { }" 2>&1); then
    echo "FAIL tests/nix/$check.nix does not evaluate:"
    echo "$out" | sed 's/^/  /'
    failed=$((failed + 1))
    continue
  fi
  if ! report=$(python3 -c '
import json, sys
r = json.loads(sys.argv[1])
assert r["cases"] > 0, "no cases ran"
for f in r["failures"]:
    print("  " + f)
if r["failures"]:
    sys.exit(1)
print(r["cases"])
' "$out" 2>&1); then
    echo "FAIL tests/nix/$check.nix:"
    echo "$report"
    failed=$((failed + 1))
  else
    evals=$((evals + report))
  fi
done

if ((failed)); then
  echo "nix-parse: $failed failure(s)"
  exit 1
fi
echo "nix-parse: $checked .nix files parse; nixos/units.json is valid; $evals evaluation cases pass"
