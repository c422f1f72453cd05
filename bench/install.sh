#!/usr/bin/env bash
# Benchmark `nixless install` against `nix copy --from http://… --to DIR`.
#
#   bench/install.sh [--quick]
#
# Results: target/bench/results.txt (quick: results-quick.txt) and the raw
# per-run numbers in target/bench/runs-{full,quick}.tsv.
# Env: ROUNDS (default 3, quick 1), CARGO_TARGET_DIR, BENCH_TMPFS (default
# /tmp/nixless-bench-tmpfs). Needs root (apt-get, mount, drop_caches).
#
# Prints numbers; asserts nothing about timing. It does fail if either tool
# fails, if an install is incomplete or if nixless' big path hashes wrong.
# See bench/README.md.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
cd "$repo"

quick=0
case "${1:-}" in
  --quick) quick=1 ;;
  "") ;;
  *) echo "usage: $0 [--quick]" >&2; exit 2 ;;
esac
if [ "$quick" = 1 ]; then
  mode=quick N=200 BIG_MIB=64 C_MIB=16 ROUNDS=${ROUNDS:-1}
else
  mode=full N=1000 BIG_MIB=256 C_MIB=64 ROUNDS=${ROUNDS:-3}
fi
SALT=bench-v1

target=${CARGO_TARGET_DIR:-$repo/target}
mkdir -p "$target/bench"
bench=$(cd "$target/bench" && pwd)
fix=$bench/fixtures-$mode
tmpfs=${BENCH_TMPFS:-/tmp/nixless-bench-tmpfs}
disk=$bench/disk

say() { printf '==> %s\n' "$*" >&2; }

# --- 1. tools and the binary --------------------------------------------------
need=()
command -v nix >/dev/null || need+=(nix-bin)
command -v nginx >/dev/null || need+=(nginx-light)
[ -x /usr/bin/time ] || need+=(time)
command -v file >/dev/null || need+=(file)
command -v flock >/dev/null || need+=(util-linux)
command -v ss >/dev/null || need+=(iproute2)
if [ ${#need[@]} -gt 0 ]; then
  say "installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
if ! rustup target list --installed | grep -qx x86_64-unknown-linux-musl; then
  rustup target add x86_64-unknown-linux-musl
fi
say "cargo build --release --target x86_64-unknown-linux-musl"
if command -v musl-gcc >/dev/null; then
  cargo build --release --target x86_64-unknown-linux-musl --quiet
else
  # Plain gcc works for the few C bits (no libc headers needed).
  CC_x86_64_unknown_linux_musl=gcc cargo build --release --target x86_64-unknown-linux-musl --quiet
fi
# Private stripped copy: a concurrent rebuild must not swap it mid-run.
bin=$bench/nixless
cp -f "$target/x86_64-unknown-linux-musl/release/nixless" "$bin.tmp"
strip "$bin.tmp" 2>/dev/null || true
mv -f "$bin.tmp" "$bin"
bin_size=$(stat -c %s "$bin")
bin_file=$(file -b "$bin")
case $bin_file in
  *static-pie\ linked*|*statically\ linked*) ;;
  *) echo "WARNING: nixless binary is not statically linked: $bin_file" >&2 ;;
esac

# --- 2. fixtures ----------------------------------------------------------------
export NIX_CONFIG=$'build-users-group =\nexperimental-features = nix-command\nsandbox = false\nsubstituters ='

fixtures() {
  mkdir -p "$fix"
  exec 9>"$fix/.lock"
  flock 9
  if [ -s "$fix/env" ]; then exec 9>&-; return 0; fi
  local t0=$SECONDS
  say "building fixtures ($mode: n=$N, big ${BIG_MIB} MiB, C ${C_MIB} MiB) in $fix"
  mkdir -p "$fix/gcroots" "$fix/keys"
  if [ ! -s "$fix/keys/pk" ]; then
    nix-store --generate-binary-cache-key bench-1 "$fix/keys/sk" "$fix/keys/pk"
  fi
  local a c
  a=$(nix-build tests/support/bench.nix --quiet -o "$fix/gcroots/a" \
        --argstr salt "$SALT" --arg n "$N" --arg bigMiB "$BIG_MIB" 2>"$fix/build-a.log") \
    || { cat "$fix/build-a.log" >&2; exit 1; }
  a=$(readlink -f "$a")
  # Closure C: one path of text-like data (numbered lines of words drawn
  # from a small vocabulary by a fixed-seed awk; zstd gets about 3x).
  cat >"$fix/closure-c.nix" <<'NIX'
{ salt, mib }:
derivation {
  name = "nixless-bench-text";
  system = "x86_64-linux";
  builder = "/bin/sh";
  inherit salt mib;
  args = [ "-c" ''
    export PATH=/usr/bin:/bin; set -e
    mkdir $out
    awk -v mib="$mib" -v salt="$salt" 'BEGIN {
      n = split("the of and to in is that for it as was with be by on not he this are or his from at which but have an they you were her she there would their we him been has when who will more no if out so said what up its about into than them can only other new some could time these two may then do first any my now such like our over man me even most made after also did many before must through back years where much your way well down should because each just those people how too little state good very make world still own see men work long get here between both life being under never day same another know while last might us great old year off come since against go came right used take three store path closure cache binary nar hash signature install", w, " ")
      srand(1); lim = mib * 1048576; b = 0; ln = 0
      print "salt " salt
      while (b < lim) {
        ln++; k = int(rand() * 12) + 3; s = ln ":"
        for (i = 0; i < k; i++) s = s " " w[int(rand() * n) + 1]
        print s; b += length(s) + 1
      }
    }' | head -c "$mib"M > $out/text.txt
  '' ];
}
NIX
  c=$(nix-build "$fix/closure-c.nix" --quiet -o "$fix/gcroots/c" \
        --argstr salt "$SALT" --argstr mib "$C_MIB" 2>"$fix/build-c.log") \
    || { cat "$fix/build-c.log" >&2; exit 1; }
  c=$(readlink -f "$c")
  publish() { # NAME COMPRESSION PATH
    rm -rf "${fix:?}/$1"
    nix copy --to "file://$fix/$1?compression=$2&secret-key=$fix/keys/sk" "$3" 2>"$fix/copy-$1.log" \
      || { cat "$fix/copy-$1.log" >&2; exit 1; }
  }
  publish cache-a-zstd zstd "$a"
  publish cache-a-xz xz "$a"
  publish cache-c-zstd zstd "$c"
  chmod -R a+rX "$fix"
  local tmp
  tmp=$(mktemp "$fix/env.XXXXXX")
  {
    echo "A_TOP=$a"
    echo "A_BIG=$(cat "$a/big")"
    echo "A_SIZE=$(nix-store -qR "$a" | wc -l)"
    echo "C_TOP=$c"
    echo "C_BIG=$c"
    echo "C_SIZE=$(nix-store -qR "$c" | wc -l)"
  } >"$tmp"
  mv -f "$tmp" "$fix/env"
  say "fixtures built in $((SECONDS - t0)) s"
  exec 9>&-
}
fixtures
# shellcheck disable=SC1091
. "$fix/env"
PK=$(cat "$fix/keys/pk")

# --- servers, mounts, cleanup -------------------------------------------------
ports=()
mounted=0
cleanup() {
  local p
  for p in "${ports[@]}"; do tests/support/nginx.sh stop / "$p" || true; done
  for d in "$tmpfs/run" "$disk/run" "$bench/xdg"; do
    [ -e "$d" ] && { chmod -R u+w "$d" 2>/dev/null; rm -rf "$d"; }
  done
  if [ "$mounted" = 1 ]; then umount "$tmpfs" 2>/dev/null || true; rmdir "$tmpfs" 2>/dev/null || true; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port_free() { ! ss -ltnH "sport = :$1" | grep -q .; }
next_port=$((20000 + RANDOM % 20000))
serve() { # CACHEDIR -> sets $port
  while ! port_free "$next_port"; do next_port=$((next_port + 1)); done
  port=$next_port
  next_port=$((next_port + 1))
  tests/support/nginx.sh start "$1" "$port"
  ports+=("$port")
}
declare -A URL LOG TOP BIG SIZE CACHE
for s in A-zstd A-xz C-zstd; do
  case $s in
    A-zstd) CACHE[$s]=$fix/cache-a-zstd TOP[$s]=$A_TOP BIG[$s]=$A_BIG SIZE[$s]=$A_SIZE ;;
    A-xz)   CACHE[$s]=$fix/cache-a-xz   TOP[$s]=$A_TOP BIG[$s]=$A_BIG SIZE[$s]=$A_SIZE ;;
    C-zstd) CACHE[$s]=$fix/cache-c-zstd TOP[$s]=$C_TOP BIG[$s]=$C_BIG SIZE[$s]=$C_SIZE ;;
  esac
  serve "${CACHE[$s]}"
  URL[$s]=http://127.0.0.1:$port
  LOG[$s]=/tmp/nixless-nginx-$port/access.log
done

if ! mountpoint -q "$tmpfs"; then
  mkdir -p "$tmpfs"
  mount -t tmpfs -o size=3g tmpfs "$tmpfs"
  mounted=1
fi
mkdir -p "$disk"

can_drop=0
if sync && (echo 3 >/proc/sys/vm/drop_caches) 2>/dev/null; then can_drop=1; else
  echo "note: cannot drop page cache; runs start with warm caches" >&2
fi

# Sum of NarSize / FileSize over a cache's narinfos, in MiB.
cache_sizes() {
  awk '/^NarSize:/ {n += $2} /^FileSize:/ {f += $2}
       END {printf "NAR %.1f MiB, compressed %.1f MiB", n/1048576, f/1048576}' "$1"/*.narinfo
}

# --- 3. runs -------------------------------------------------------------------
raw=$bench/runs-$mode.tsv
printf 'scenario\tfs\ttool\tround\twall_s\tuser_s\tsys_s\trss_kib\trequests\n' >"$raw"

wipe() { [ -e "$1" ] || return 0; chmod -R u+w "$1"; rm -rf "$1"; }

run_one() { # SCENARIO FS TOOL ROUND
  local s=$1 fs=$2 tool=$3 round=$4 base dir tf out before after t0 t1 rc=0
  case $fs in tmpfs) base=$tmpfs ;; disk) base=$disk ;; esac
  dir=$base/run
  tf=$bench/time.out out=$bench/last-$tool.log
  wipe "$dir"
  wipe "$bench/xdg"
  mkdir -p "$dir" "$bench/xdg"
  sync
  [ "$can_drop" = 1 ] && echo 3 >/proc/sys/vm/drop_caches
  before=$(wc -l <"${LOG[$s]}")
  t0=$(date +%s%N)
  case $tool in
    nixless)
      /usr/bin/time -v -o "$tf" "$bin" install --root "$dir" --cache "${URL[$s]}" \
        --trusted-key "$PK" "${TOP[$s]}" >"$out" 2>&1 || rc=$? ;;
    nix)
      # Fresh XDG_CACHE_HOME: no narinfo disk cache from earlier runs.
      XDG_CACHE_HOME=$bench/xdg /usr/bin/time -v -o "$tf" nix copy --from "${URL[$s]}" --to "$dir" \
        --option trusted-public-keys "$PK" "${TOP[$s]}" >"$out" 2>&1 || rc=$? ;;
  esac
  t1=$(date +%s%N)
  after=$(wc -l <"${LOG[$s]}")
  if [ "$rc" != 0 ]; then
    echo "$tool failed ($s, $fs, rc $rc):" >&2
    cat "$out" >&2
    exit 1
  fi
  # Outside the timed part: completeness, and the big path's NAR hash.
  local n
  n=$(find "$dir/nix/store" -mindepth 1 -maxdepth 1 ! -name '.*' | wc -l)
  if [ "$n" != "${SIZE[$s]}" ]; then
    echo "$tool ($s, $fs): $n paths in $dir/nix/store, expected ${SIZE[$s]}" >&2
    exit 1
  fi
  if [ "$tool" = nixless ]; then
    local b h want
    b=$(basename "${BIG[$s]}")
    want=$(sed -n 's/^NarHash: sha256://p' "${CACHE[$s]}/${b%%-*}.narinfo")
    h=$(nix hash path --base32 "$dir/nix/store/$b")
    if [ "$h" != "$want" ]; then
      echo "nixless ($s, $fs): NAR hash of $b is $h, narinfo says $want" >&2
      exit 1
    fi
  fi
  awk -v s="$s" -v fs="$fs" -v tool="$tool" -v r="$round" -v w="$(( (t1 - t0) / 1000000 ))" \
      -v req="$((after - before))" -F': ' '
    /User time \(seconds\)/ {u = $2}
    /System time \(seconds\)/ {y = $2}
    /Maximum resident set size/ {m = $2}
    END {printf "%s\t%s\t%s\t%s\t%.3f\t%s\t%s\t%s\t%s\n", s, fs, tool, r, w / 1000, u, y, m, req}
  ' "$tf" >>"$raw"
  tail -n1 "$raw" | awk -F'\t' '{printf "    %-7s %-5s %-7s round %s: wall %6.2f s  user %5.2f  sys %5.2f  rss %6.1f MiB  %s requests\n",
                                  $1, $2, $3, $4, $5, $6, $7, $8/1024, $9}' >&2
  wipe "$dir"
}

scenarios=(A-zstd A-xz C-zstd)
say "binary: $bin_size bytes; $bin_file"
say "closure A: ${A_SIZE} paths; zstd $(cache_sizes "$fix/cache-a-zstd"); xz $(cache_sizes "$fix/cache-a-xz")"
say "closure C: ${C_SIZE} path(s); zstd $(cache_sizes "$fix/cache-c-zstd")"
say "$ROUNDS round(s) × ${#scenarios[@]} scenarios × 2 filesystems, interleaved"
t_all=$SECONDS
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
for s in "${scenarios[@]}"; do
  for fs in tmpfs disk; do
    for ((r = 1; r <= ROUNDS; r++)); do
      if [ $((r % 2)) = 1 ]; then order=(nixless nix); else order=(nix nixless); fi
      for tool in "${order[@]}"; do run_one "$s" "$fs" "$tool" "$r"; done
    done
  done
done

# --- 5. table ------------------------------------------------------------------
median() { sort -n | awk '{a[NR] = $1} END {if (NR == 0) print "nan"; else if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }
col() { # SCENARIO FS TOOL AWK-EXPR
  awk -F'\t' -v s="$1" -v fs="$2" -v t="$3" "NR > 1 && \$1 == s && \$2 == fs && \$3 == t {print $4}" "$raw" | median
}
if [ "$mode" = full ]; then results=$bench/results.txt; else results=$bench/results-$mode.txt; fi
load_end=$(cut -d' ' -f1-3 /proc/loadavg)
{
  echo "nixless install vs nix copy — $(date -u '+%Y-%m-%d %H:%M UTC'), mode $mode, $ROUNDS round(s), medians"
  echo "machine: $(nproc) cores, $(uname -r), $(nix --version), page cache dropped before each run: $([ "$can_drop" = 1 ] && echo yes || echo no)"
  echo "load average before: $load_start, after: $load_end (other work on the machine skews the numbers)"
  echo "nixless binary: $bin_size bytes ($(awk -v b="$bin_size" 'BEGIN {printf "%.2f", b / 1048576}') MiB), $(echo "$bin_file" | sed 's/, BuildID\[[^]]*\]=[0-9a-f]*//')"
  echo "A: ${A_SIZE} paths (n=$N small + ${BIG_MIB} MiB file): zstd $(cache_sizes "$fix/cache-a-zstd"); xz $(cache_sizes "$fix/cache-a-xz")"
  echo "C: ${C_SIZE} path, ${C_MIB} MiB word-salad text: zstd $(cache_sizes "$fix/cache-c-zstd")"
  echo
  printf '%-8s %-6s %-8s %8s %8s %8s %8s %8s %6s\n' scenario fs tool wall_s cpu_s user_s sys_s rss_MiB reqs
  for s in "${scenarios[@]}"; do
    for fs in tmpfs disk; do
      for tool in nixless nix; do
        printf '%-8s %-6s %-8s %8.2f %8.2f %8.2f %8.2f %8.1f %6s\n' "$s" "$fs" "$tool" \
          "$(col "$s" "$fs" "$tool" '$5')" "$(col "$s" "$fs" "$tool" '$6 + $7')" \
          "$(col "$s" "$fs" "$tool" '$6')" "$(col "$s" "$fs" "$tool" '$7')" \
          "$(col "$s" "$fs" "$tool" '$8 / 1024')" "$(col "$s" "$fs" "$tool" '$9')"
      done
    done
  done
  echo
  printf '%-8s %-6s %14s %14s %14s\n' scenario fs wall_ratio cpu_ratio rss_ratio
  for s in "${scenarios[@]}"; do
    for fs in tmpfs disk; do
      printf '%-8s %-6s %14.2f %14.2f %14.2f\n' "$s" "$fs" \
        "$(awk -v a="$(col "$s" "$fs" nixless '$5')" -v b="$(col "$s" "$fs" nix '$5')" 'BEGIN {print a / b}')" \
        "$(awk -v a="$(col "$s" "$fs" nixless '$6 + $7')" -v b="$(col "$s" "$fs" nix '$6 + $7')" 'BEGIN {print a / b}')" \
        "$(awk -v a="$(col "$s" "$fs" nixless '$8')" -v b="$(col "$s" "$fs" nix '$8')" 'BEGIN {print a / b}')"
    done
  done
  echo "(ratios are nixless/nix of the medians; < 1 means nixless is faster or smaller)"
} >"$results"
echo
cat "$results"
echo
say "total run time $((SECONDS - t_all)) s; raw numbers in $raw, table in $results"
