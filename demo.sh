#!/usr/bin/env bash
# The local demo: a real binary cache written by Nix, served by nginx on
# loopback, and nixless installing a closure from it into a private root,
# checked afterwards by Nix itself. Everything stays under target/demo.
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
bin=target/release/nixless

echo "== building the demo closure with Nix and publishing it (nix copy, zstd, signed)"
bash tests/support/fixtures.sh target/fixtures
# shellcheck disable=SC1091
source target/fixtures/env

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
bash tests/support/nginx.sh start "$CACHE_ZSTD" "$port"
trap 'bash tests/support/nginx.sh stop "$CACHE_ZSTD" "$port"' EXIT
echo "== cache served at http://127.0.0.1:$port"

root=target/demo/root
chmod -R u+w target/demo 2>/dev/null || true
rm -rf target/demo && mkdir -p target/demo
echo "== nixless install $TOP"
"$bin" install --root "$root" --cache "http://127.0.0.1:$port" --trusted-key "$PK_A" "$TOP"

echo "== checking every installed path with Nix (nix hash path vs the cache's NarHash)"
n=0
for p in $(nix-store -qR "$TOP"); do
  want=$(grep '^NarHash:' "$CACHE_ZSTD/$(basename "$p" | cut -c1-32).narinfo" | cut -d' ' -f2)
  got="sha256:$(nix hash path --base32 "$root$p")"
  [ "$want" = "$got" ] || { echo "MISMATCH $p: $got != $want"; exit 1; }
  n=$((n + 1))
done
echo "all $n paths match their NarHash"
"$bin" verify --root "$root"
echo "== demo done: store at $root/nix/store"
