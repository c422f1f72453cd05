#!/usr/bin/env bash
# Build the nixless test closure and publish it to several file:// binary
# caches.
#
#   tests/support/fixtures.sh [DIR]
#
# DIR defaults to ${CARGO_TARGET_DIR:-./target}/fixtures. Idempotent and safe
# to run concurrently (flock on DIR/.lock). DIR/env is written last and
# atomically; its presence means the fixtures are complete.
#
# Layout of DIR:
#   env                 KEY=VALUE lines (see bottom of this script)
#   gcroots/top         GC root for the test closure
#   keys/{a,b,evil}.{sk,pk}   signing keys cache-a-1, cache-b-1, evil-1
#   cache-zstd          compression=zstd, signed with cache-a-1
#   cache-xz            compression=xz,   signed with cache-a-1
#   cache-none          compression=none, signed with cache-a-1
#   cache-b             compression=zstd, signed with cache-b-1
#   cache-evil          compression=zstd, signed with evil-1 only
#   cache-unsigned      compression=zstd, no signatures
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
dir=${1:-${CARGO_TARGET_DIR:-./target}/fixtures}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)

case $dir in
  *[[:space:]]*) echo "fixtures.sh: DIR must not contain whitespace: $dir" >&2; exit 1 ;;
esac

# env complete => nothing to do (checked again under the lock).
complete() { [ -s "$dir/env" ] && grep -q '^CLOSURE_SIZE=' "$dir/env"; }
if complete; then exit 0; fi

exec 9>"$dir/.lock"
flock 9
if complete; then exit 0; fi

# substituters empty: don't try to reach cache.nixos.org (offline machines).
export NIX_CONFIG=$'build-users-group =\nexperimental-features = nix-command\nsandbox = false\nsubstituters ='

start=$(date +%s)

# 1. Build the closure, rooted under DIR so a GC keeps it.
mkdir -p "$dir/gcroots"
top=$(nix-build "$here/closures.nix" -o "$dir/gcroots/top" --quiet 2>"$dir/build.log") || {
  cat "$dir/build.log" >&2
  exit 1
}
top=$(readlink -f "$top")
[ -f "$top/deps" ] || { echo "fixtures.sh: $top/deps missing" >&2; exit 1; }

# 2. Signing keys (kept across reruns if already present).
mkdir -p "$dir/keys"
genkey() { # NAME FILEBASE
  if [ ! -s "$dir/keys/$2.sk" ] || [ ! -s "$dir/keys/$2.pk" ]; then
    nix-store --generate-binary-cache-key "$1" "$dir/keys/$2.sk.tmp" "$dir/keys/$2.pk.tmp"
    mv "$dir/keys/$2.pk.tmp" "$dir/keys/$2.pk"
    mv "$dir/keys/$2.sk.tmp" "$dir/keys/$2.sk"
  fi
}
genkey cache-a-1 a
genkey cache-b-1 b
genkey evil-1 evil

# 3. Publish the closure. Caches are always recreated from scratch (nix copy
# skips paths already present in the destination, which would keep stale
# signatures around).
publish() { # NAME QUERY
  rm -rf "$dir/$1"
  nix copy --to "file://$dir/$1?$2" "$top" 2>"$dir/copy-$1.log" || {
    cat "$dir/copy-$1.log" >&2
    exit 1
  }
  n=$(find "$dir/$1" -maxdepth 1 -name '*.narinfo' | wc -l)
  [ "$n" -eq "$closure_size" ] || {
    echo "fixtures.sh: $1 has $n narinfos, expected $closure_size" >&2
    exit 1
  }
}
closure_size=$(nix-store -qR "$top" | wc -l)
publish cache-zstd     "compression=zstd&secret-key=$dir/keys/a.sk"
publish cache-xz       "compression=xz&secret-key=$dir/keys/a.sk"
publish cache-none     "compression=none&secret-key=$dir/keys/a.sk"
publish cache-b        "compression=zstd&secret-key=$dir/keys/b.sk"
publish cache-evil     "compression=zstd&secret-key=$dir/keys/evil.sk"
publish cache-unsigned "compression=zstd"
# nginx workers may run as another user: everything world-readable.
chmod -R a+rX "$dir"/cache-*

# 4. env, last and atomically.
tmp=$(mktemp "$dir/env.XXXXXX")
{
  echo "FIXTURES=$dir"
  echo "TOP=$top"
  echo "PK_A=$(cat "$dir/keys/a.pk")"
  echo "PK_B=$(cat "$dir/keys/b.pk")"
  echo "PK_EVIL=$(cat "$dir/keys/evil.pk")"
  for c in zstd xz none b evil unsigned; do
    echo "CACHE_$(echo "$c" | tr a-z A-Z)=$dir/cache-$c"
  done
  grep -E '^P_[A-Z_]+=/' "$top/deps"
  echo "CLOSURE_SIZE=$closure_size"
} >"$tmp"
chmod 644 "$tmp"
mv -f "$tmp" "$dir/env"

echo "fixtures: $closure_size paths published to 6 caches in $dir ($(( $(date +%s) - start ))s)" >&2
