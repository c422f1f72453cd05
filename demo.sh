#!/usr/bin/env bash
# The local demo, all on this machine and under target/demo:
#   1. Nix builds two fake NixOS systems (A and B) and a test closure, and
#      publishes them to a signed binary cache, served by nginx on loopback;
#   2. `nixless install` puts the closure into a private root; Nix checks it;
#   3. a device root runs system A; a real `nixless agent` (seccomp on)
#      serves it; a tiny loop plays systemd's path unit, running
#      `nixless switch-helper` when the agent asks for a switch;
#   4. `nixless deploy` signs a deploy of system B and follows it: fetch,
#      switch-to-configuration test, health check, commit (profile link,
#      switch-to-configuration boot).
set -euo pipefail
cd "$(dirname "$0")"

need=()
command -v nix-store >/dev/null || need+=(nix-bin)
command -v nginx >/dev/null || need+=(nginx-light)
if ((${#need[@]})); then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
export NIX_CONFIG=$'build-users-group =\nexperimental-features = nix-command\nsandbox = false\nsubstituters ='

echo "== building nixless"
cargo build -q --release
bin=$PWD/target/release/nixless

echo "== building closures and fake NixOS systems with Nix, publishing them (nix copy, zstd, signed)"
bash tests/support/fixtures.sh target/fixtures
bash tests/support/systems.sh target/fixtures
# shellcheck disable=SC1091
source target/fixtures/env
# shellcheck disable=SC1091
source target/fixtures/systems.env

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
cport=$(free_port)
bash tests/support/nginx.sh start "$CACHE_ZSTD" "$cport"
sport=$(free_port)
bash tests/support/nginx.sh start "$CACHE_SYSTEMS" "$sport"
demo=$PWD/target/demo
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  bash tests/support/nginx.sh stop "$CACHE_ZSTD" "$cport"
  bash tests/support/nginx.sh stop "$CACHE_SYSTEMS" "$sport"
}
trap cleanup EXIT
chmod -R u+w "$demo" 2>/dev/null || true
rm -rf "$demo" && mkdir -p "$demo"

echo "== part 1: nixless install of a 17-path closure from http://127.0.0.1:$cport"
"$bin" install --root "$demo/install" --cache "http://127.0.0.1:$cport" --trusted-key "$PK_A" "$TOP"
n=0
for p in $(nix-store -qR "$TOP"); do
  want=$(grep '^NarHash:' "$CACHE_ZSTD/$(basename "$p" | cut -c1-32).narinfo" | cut -d' ' -f2)
  got="sha256:$(nix hash path --base32 "$demo/install$p")"
  [ "$want" = "$got" ] || { echo "MISMATCH $p: $got != $want"; exit 1; }
  n=$((n + 1))
done
echo "Nix agrees: all $n paths match their NarHash"

echo "== part 2: a device running system A"
root=$demo/device
"$bin" install --root "$root" --cache "http://127.0.0.1:$sport" --trusted-key "$PK_A" "$SYS_A" 2>/dev/null
mkdir -p "$root/nix/var/nix/profiles" "$root/run" "$demo/fake"
ln -s "$SYS_A" "$root/nix/var/nix/profiles/system-1-link"
ln -s system-1-link "$root/nix/var/nix/profiles/system"
ln -s "$SYS_A" "$root/run/current-system"
ln -s "$SYS_A" "$root/run/booted-system"
"$bin" keygen admin-1 --out "$demo/admin.key" >/dev/null
aport=$(free_port)
cat > "$demo/agent.json" <<JSON
{"host": "demo-device", "listen": ["127.0.0.1:$aport"], "caches": ["http://127.0.0.1:$sport"],
 "cache_keys": ["$PK_A"], "deploy_keys": ["$(cat "$demo/admin.key.pub")"], "root": "$root",
 "health_command": ["/bin/sh", "-c", "test ! -e $demo/fake/unhealthy"], "health_timeout_secs": 30}
JSON
export FAKE_NIXOS_DIR=$demo/fake FAKE_NIXOS_ROOT=$root
"$bin" agent --config "$demo/agent.json" 2>"$demo/agent.log" &
pids+=($!)
# systemd's nixless-switch.path, played by a loop (bounded: 10 minutes).
(
  last=""
  for _ in $(seq 1 3000); do
    cur=$(cat "$root/var/lib/nixless/switch/request.json" "$root/var/lib/nixless/switch/health-request.json" 2>/dev/null || true)
    if [ -n "$cur" ] && [ "$cur" != "$last" ]; then
      last=$cur
      "$bin" switch-helper --config "$demo/agent.json" >>"$demo/helper.log" 2>&1 || true
    fi
    sleep 0.2
  done
) &
pids+=($!)
for _ in $(seq 1 50); do curl -sf "http://127.0.0.1:$aport/v1/status" >/dev/null && break; sleep 0.1; done
"$bin" status "http://127.0.0.1:$aport" || true

echo "== part 3: a signed deploy of system B, followed until it is committed"
"$bin" deploy --key "$demo/admin.key" --host demo-device --system "$SYS_B" --agent "http://127.0.0.1:$aport"
"$bin" status "http://127.0.0.1:$aport"
echo "switch-to-configuration calls: $(tr '\n' ';' < "$demo/fake/calls")"
echo "profile: system -> $(readlink "$root/nix/var/nix/profiles/system") -> $(readlink "$root/nix/var/nix/profiles/$(readlink "$root/nix/var/nix/profiles/system")")"
echo "== demo done (state under $root/var/lib/nixless, agent log in $demo/agent.log)"
