#!/usr/bin/env bash
# Install the slow-link closure (302 paths, ~17 MB zstd) over an emulated
# slow link: `nixless install` vs Nix's substituter (`nix-store --realise`)
# vs `nix copy`, interleaved, at several round-trip times, with and without a
# bandwidth cap shared by all connections (bench/delay-proxy.py in front of
# nginx; `tc netem` is not available here).
#
#   bench/slow-link.sh                 # RTT 0 and 100 ms, no cap and 20 Mbit/s, 1 round
#   bench/slow-link.sh --full          # adds RTT 300 ms
#   bench/slow-link.sh --rtt "0 100 300" --mbit "0 20" --rounds 3 \
#       --tools "nixless nix-store nix-store-j1 nix-copy" --agent
#   bench/slow-link.sh --table         # only print the table of the last run again
#
# Tools:
#   nixless       nixless install --cache URL --trusted-key PK TOP
#   nix-store     nix-store --store DIR --realise TOP, the URL as only substituter,
#                 max-jobs 25 and http-connections 25: Nix's parallel substituter
#   nix-store-j1  the same with max-jobs 1, Nix 2.8's default: in 2.8 a substitution
#                 needs a build slot (max-substitution-jobs came later), so NARs are
#                 fetched one at a time while narinfos are queried in parallel
#   nix-copy      nix copy --from URL --to DIR TOP
#   agent         (--agent) a nixless agent whose cache is the proxy, sent a deploy
#                 document that carries the closure's narinfos (--narinfo-dir);
#                 timed from the POST until the agent leaves the fetch (phase
#                 switching); the POST and status requests bypass the link.
#
# Output: the table on stdout and in target/bench/slow-link.txt; one line per
# run in target/bench/slow-link-runs.tsv. Prints numbers, asserts nothing about
# timing; fails if a tool fails or installs an incomplete closure.
# Env: CARGO_TARGET_DIR. Needs root (nix-store --store DIR, as bench/install.sh).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
cd "$repo"

usage() {
  sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}
RTTS="0 100" MBITS="0 20" ROUNDS=1 TOOLS="nixless nix-store nix-store-j1 nix-copy" AGENT=0 TABLE_ONLY=0
while [ $# -gt 0 ]; do
  case $1 in
    --full) RTTS="0 100 300" ;;
    --rtt) RTTS=$2; shift ;;
    --mbit) MBITS=$2; shift ;;
    --rounds) ROUNDS=$2; shift ;;
    --tools) TOOLS=$2; shift ;;
    --agent) AGENT=1 ;;
    --table) TABLE_ONLY=1 ;;
    -h|--help) usage ;;
    *) echo "unknown argument: $1" >&2; usage ;;
  esac
  shift
done
for v in $RTTS $MBITS $ROUNDS; do
  case $v in ''|*[!0-9]*) echo "--rtt, --mbit and --rounds take whole numbers, got '$v'" >&2; exit 2 ;; esac
done
for t in $TOOLS; do
  case $t in nixless|nix-store|nix-store-j1|nix-copy) ;; *) echo "unknown tool '$t'" >&2; exit 2 ;; esac
done
[ "$AGENT" = 1 ] && TOOLS="$TOOLS agent"
SALT=slowlink-v1

target=${CARGO_TARGET_DIR:-$repo/target}
mkdir -p "$target/bench"
bench=$(cd "$target/bench" && pwd)
fix=$bench/fixtures-slowlink
work=$bench/slowlink-work
say() { printf '==> %s\n' "$*" >&2; }

raw=$bench/slow-link-runs.tsv
if [ "$TABLE_ONLY" = 1 ]; then
  [ -s "$raw" ] && [ -s "$fix/env" ] || { echo "no earlier run: $raw or $fix/env missing" >&2; exit 1; }
  # Cells and tools in the order the last run used them.
  RTTS=$(awk -F'\t' 'NR > 1 && !s[$1]++ {printf "%s ", $1}' "$raw")
  MBITS=$(awk -F'\t' 'NR > 1 && !s[$2]++ {printf "%s ", $2}' "$raw")
  TOOLS=$(awk -F'\t' 'NR > 1 && !s[$3]++ {printf "%s ", $3}' "$raw")
  ROUNDS=$(awk -F'\t' 'NR > 1 && $4 > n {n = $4} END {print n}' "$raw")
fi

# --- 1. the binary (static, stripped private copy, as bench/install.sh) -------
if [ "$TABLE_ONLY" = 0 ]; then
for c in nix-store nix nginx python3 flock; do
  command -v "$c" >/dev/null || { echo "missing $c (apt-get install nix-bin nginx-light python3 util-linux)" >&2; exit 1; }
done
[ -x /usr/bin/time ] || { echo "missing /usr/bin/time (apt-get install time)" >&2; exit 1; }
say "cargo build --release --target x86_64-unknown-linux-musl (under /tmp/nixless-cargo.lock)"
if command -v musl-gcc >/dev/null; then
  flock /tmp/nixless-cargo.lock cargo build --release --target x86_64-unknown-linux-musl --quiet
else
  CC_x86_64_unknown_linux_musl=gcc flock /tmp/nixless-cargo.lock \
    cargo build --release --target x86_64-unknown-linux-musl --quiet
fi
bin=$bench/nixless-slowlink
cp -f "$target/x86_64-unknown-linux-musl/release/nixless" "$bin.tmp"
strip "$bin.tmp" 2>/dev/null || true
mv -f "$bin.tmp" "$bin"

say "checking the link model (bench/delay-proxy-check.py)"
python3 bench/delay-proxy-check.py >&2
fi

# --- 2. the slow-link closure, published with zstd ---------------------------
export NIX_CONFIG=$'build-users-group =\nexperimental-features = nix-command\nsandbox = false\nsubstituters ='
fixtures() {
  mkdir -p "$fix"
  exec 9>"$fix/.lock"
  flock 9
  if [ -s "$fix/env" ]; then exec 9>&-; return 0; fi
  say "building the slow-link closure (tests/support/slowlink.nix, salt $SALT) in $fix"
  mkdir -p "$fix/gcroots" "$fix/keys"
  [ -s "$fix/keys/pk" ] || nix-store --generate-binary-cache-key slowlink-1 "$fix/keys/sk" "$fix/keys/pk"
  local top
  top=$(nix-build tests/support/slowlink.nix --quiet -j 4 -o "$fix/gcroots/top" --argstr salt "$SALT" \
          2>"$fix/build.log") || { cat "$fix/build.log" >&2; exit 1; }
  top=$(readlink -f "$top")
  rm -rf "$fix/cache"
  nix copy --to "file://$fix/cache?compression=zstd&secret-key=$fix/keys/sk" "$top" 2>"$fix/copy.log" \
    || { cat "$fix/copy.log" >&2; exit 1; }
  chmod -R a+rX "$fix"
  local tmp
  tmp=$(mktemp "$fix/env.XXXXXX")
  {
    echo "TOP=$top"
    echo "SIZE=$(nix-store -qR "$top" | wc -l)"
  } >"$tmp"
  mv -f "$tmp" "$fix/env"
  exec 9>&-
}
fixtures
# shellcheck disable=SC1091
. "$fix/env"
PK=$(cat "$fix/keys/pk")
cache=$fix/cache

# Bytes that must cross the link (NAR files + narinfos + nix-cache-info), the
# NAR total, and the reference depth: paths on the longest reference chain from
# the top = rounds a breadth-first resolver needs.
read -r LINK_BYTES NAR_BYTES DEPTH < <(python3 - "$cache" "$TOP" <<'PY'
import os, sys
cache, top = sys.argv[1], sys.argv[2]
refs, files, nar, meta = {}, 0, 0, os.path.getsize(os.path.join(cache, "nix-cache-info"))
for n in os.listdir(cache):
    if not n.endswith(".narinfo"):
        continue
    p = os.path.join(cache, n)
    meta += os.path.getsize(p)
    f = dict(l.split(": ", 1) for l in open(p).read().splitlines() if ": " in l)
    files += int(f["FileSize"]); nar += int(f["NarSize"])
    h = n[:-len(".narinfo")]
    refs[h] = [r.split("-", 1)[0] for r in f.get("References", "").split() if r.split("-", 1)[0] != h]
memo = {}
def depth(h):
    if h not in memo:
        memo[h] = 1 + max((depth(r) for r in refs[h]), default=0)
    return memo[h]
print(files + meta, nar, depth(os.path.basename(top).split("-", 1)[0]))
PY
)

read -r -a tools <<<"$TOOLS"
if [ "$TABLE_ONLY" = 0 ]; then
# --- 3. nginx, proxy, agent ----------------------------------------------------
nport=
pxpid=
agpid=
cleanup() {
  [ -n "$pxpid" ] && kill "$pxpid" 2>/dev/null
  [ -n "$agpid" ] && kill "$agpid" 2>/dev/null
  [ -n "$nport" ] && tests/support/nginx.sh stop "$cache" "$nport"
  if [ -e "$work" ]; then chmod -R u+w "$work" 2>/dev/null; rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
rm -rf "$work"
mkdir -p "$work"
nport=$(free_port)
tests/support/nginx.sh start "$cache" "$nport"

# Waits for a file to satisfy a test, up to N tenths of a second.
wait_for() { # TENTHS CMD...
  local n=$1 i
  shift
  for ((i = 0; i < n; i++)); do "$@" && return 0; sleep 0.1; done
  return 1
}
stats_seq=0
proxy_start() { # RTT MBIT
  proxy_stop
  rm -f "$work/pport" "$work/stats"
  python3 bench/delay-proxy.py --upstream-port "$nport" --rtt-ms "$1" --mbit "$2" \
    --port-file "$work/pport" --stats "$work/stats" --max-seconds 3600 --parent-pid $$ &
  pxpid=$!
  wait_for 100 test -s "$work/pport" || { echo "delay proxy did not start" >&2; exit 1; }
  pport=$(cat "$work/pport")
  URL=http://127.0.0.1:$pport
  stats_seq=0
}
proxy_stop() { if [ -n "$pxpid" ]; then kill "$pxpid" 2>/dev/null || true; wait "$pxpid" 2>/dev/null || true; pxpid=; fi; }
# Ends the proxy's counting period; its JSON line goes to $STATS. (Not in a
# subshell: stats_seq must advance.)
stats_take() {
  stats_seq=$((stats_seq + 1))
  kill -USR1 "$pxpid"
  wait_for 100 grep -q "\"seq\": $stats_seq," "$work/stats" 2>/dev/null \
    || { echo "delay proxy wrote no stats" >&2; exit 1; }
  STATS=$(cat "$work/stats")
}
proxy_idle() { stats_take; [ "$(jfield "$STATS" open_now)" = 0 ]; }
jfield() { sed -n "s/.*\"$2\": \\([0-9.]*\\).*/\\1/p" <<<"$1"; }

agent_setup() {
  "$bin" keygen admin-1 --out "$work/admin.key" >/dev/null
  aport=$(free_port)
}
agent_start() { # ROOT
  cat >"$work/agent.json" <<JSON
{"host":"bench","listen":["127.0.0.1:$aport"],"caches":["$URL"],"cache_keys":["$PK"],
 "deploy_keys":["$(cat "$work/admin.key.pub")"],"root":"$1"}
JSON
  "$bin" agent --config "$work/agent.json" 2>"$work/agent.log" &
  agpid=$!
  wait_for 100 curl -sf "http://127.0.0.1:$aport/v1/status" -o /dev/null \
    || { echo "agent did not start:" >&2; cat "$work/agent.log" >&2; exit 1; }
}
agent_stop() { if [ -n "$agpid" ]; then kill "$agpid" 2>/dev/null || true; wait "$agpid" 2>/dev/null || true; agpid=; fi; }
# Each status poll's latency (curl's time_total, ms) goes to $work/status-ms:
# the loop answers while the fetch's NARs stream (issue 11).
agent_fetched() {
  local s
  s=$(curl -sf -w '\n%{time_total}' "http://127.0.0.1:$aport/v1/status") || return 1
  awk -v t="${s##*$'\n'}" 'BEGIN {printf "%.1f\n", t * 1000}' >>"$work/status-ms"
  s=${s%$'\n'*}
  case $s in
    *'"phase":"switching"'*) return 0 ;;
    *'"phase":"idle"'*) grep -q failed <<<"$s" && { echo "agent deploy failed: $s" >&2; exit 1; }; return 1 ;;
    *) return 1 ;;
  esac
}

# --- 4. runs -------------------------------------------------------------------
wipe() { [ -e "$1" ] || return 0; chmod -R u+w "$1"; rm -rf "$1"; }
printf 'rtt_ms\tmbit\ttool\tround\twall_s\trss_kib\trequests\tconnections\tpeak_open\tbytes_down\tbytes_up\n' >"$raw"
printf 'rtt_ms\tmbit\tround\tsamples\tmedian_ms\tp99_ms\tmax_ms\n' >"$bench/slow-link-status.tsv"

run_one() { # RTT MBIT TOOL ROUND
  local rtt=$1 mbit=$2 tool=$3 round=$4 dir=$work/root tf=$work/time.out out=$work/last.log t0 t1 rc=0 st
  wipe "$dir"
  wipe "$work/xdg"
  mkdir -p "$dir" "$work/xdg"
  [ "$tool" = agent ] && { agent_start "$dir"; rm -f "$work/status-ms"; }
  # Start counting once the previous run's connections are gone.
  wait_for 100 proxy_idle || echo "note: connections of the previous run still open" >&2
  t0=$(date +%s%N)
  case $tool in
    nixless)
      /usr/bin/time -v -o "$tf" "$bin" install --root "$dir" --cache "$URL" --trusted-key "$PK" "$TOP" \
        >"$out" 2>&1 || rc=$? ;;
    nix-store|nix-store-j1)
      local jobs=25
      [ "$tool" = nix-store-j1 ] && jobs=1
      # Fresh XDG_CACHE_HOME: no narinfo disk cache from earlier runs.
      XDG_CACHE_HOME=$work/xdg /usr/bin/time -v -o "$tf" nix-store --store "$dir" --realise "$TOP" \
        --option substituters "$URL" --option trusted-public-keys "$PK" --option require-sigs true \
        --option max-jobs "$jobs" --option http-connections 25 --option builders '' \
        >"$out" 2>&1 || rc=$? ;;
    nix-copy)
      XDG_CACHE_HOME=$work/xdg /usr/bin/time -v -o "$tf" nix copy --from "$URL" --to "$dir" \
        --option trusted-public-keys "$PK" "$TOP" >"$out" 2>&1 || rc=$? ;;
    agent)
      "$bin" deploy --key "$work/admin.key" --host bench --system "$TOP" --narinfo-dir "$cache" \
        --agent "http://127.0.0.1:$aport" --no-wait >"$out" 2>&1 || rc=$?
      [ "$rc" = 0 ] && { wait_for 36000 agent_fetched || rc=1; } ;;
  esac
  t1=$(date +%s%N)
  stats_take
  st=$STATS
  local rss=0
  if [ "$tool" = agent ]; then
    rss=$(awk '$1 == "VmHWM:" {print $2}' "/proc/$agpid/status")
    agent_stop
    # Status latency during the fetch: samples, median, 99th percentile, max (ms).
    [ -s "$work/status-ms" ] && sort -n "$work/status-ms" | awk -v r="$rtt" -v m="$mbit" -v k="$round" \
      '{a[NR] = $1} END {printf "%s\t%s\t%s\t%d\t%s\t%s\t%s\n", r, m, k, NR, a[int((NR + 1) / 2)], a[int(NR * 0.99 + 0.99)], a[NR]}' \
      >>"$bench/slow-link-status.tsv"
  else
    rss=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$tf")
  fi
  if [ "$rc" != 0 ]; then
    echo "$tool failed (rtt $rtt ms, $mbit Mbit/s, rc $rc):" >&2
    cat "$out" >&2
    [ "$tool" = agent ] && cat "$work/agent.log" >&2
    exit 1
  fi
  local n
  n=$(find "$dir/nix/store" -mindepth 1 -maxdepth 1 ! -name '.*' | wc -l)
  if [ "$n" != "$SIZE" ]; then
    echo "$tool (rtt $rtt, $mbit Mbit/s): $n paths in $dir/nix/store, expected $SIZE" >&2
    exit 1
  fi
  printf '%s\t%s\t%s\t%s\t%.3f\t%s\t%s\t%s\t%s\t%s\t%s\n' "$rtt" "$mbit" "$tool" "$round" \
    "$(awk -v a="$t0" -v b="$t1" 'BEGIN {print (b - a) / 1e9}')" "$rss" \
    "$(jfield "$st" requests)" "$(jfield "$st" connections)" "$(jfield "$st" peak_open)" \
    "$(jfield "$st" bytes_down)" "$(jfield "$st" bytes_up)" >>"$raw"
  tail -n1 "$raw" | awk -F'\t' '{printf "    rtt %4s ms %3s Mbit/s %-12s round %s: %7.2f s  %4d reqs  %3d conns (%2d at once)  %5.1f MB down\n",
                                  $1, $2, $3, $4, $5, $7, $8, $9, $10 / 1e6}' >&2
  wipe "$dir"
}

[ "$AGENT" = 1 ] && agent_setup
say "closure: $SIZE paths, depth $DEPTH, NAR $NAR_BYTES bytes, $LINK_BYTES bytes over the link (zstd + narinfos)"
say "cells: RTT {$RTTS} ms × cap {$MBITS} Mbit/s (0 = none) × $ROUNDS round(s); tools: $TOOLS"
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
t_all=$SECONDS
for rtt in $RTTS; do
  for mbit in $MBITS; do
    proxy_start "$rtt" "$mbit"
    t_cell=$SECONDS
    for ((r = 1; r <= ROUNDS; r++)); do
      # Rotate the order each round so no tool always runs first.
      k=$(((r - 1) % ${#tools[@]}))
      order=("${tools[@]:k}" "${tools[@]:0:k}")
      for tool in "${order[@]}"; do run_one "$rtt" "$mbit" "$tool" "$r"; done
    done
    say "cell rtt $rtt ms, cap $mbit: $((SECONDS - t_cell)) s"
    proxy_stop
  done
done
load_end=$(cut -d' ' -f1-3 /proc/loadavg)
echo "$load_start|$load_end" >"$bench/slow-link-load"
fi
load_start=n/a load_end=n/a
[ -s "$bench/slow-link-load" ] && IFS='|' read -r load_start load_end <"$bench/slow-link-load"

# --- 5. table --------------------------------------------------------------------
median() { sort -n | awk '{a[NR] = $1} END {if (NR == 0) print "nan"; else if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }
col() { # RTT MBIT TOOL AWK-EXPR
  awk -F'\t' -v r="$1" -v m="$2" -v t="$3" "NR > 1 && \$1 == r && \$2 == m && \$3 == t {print $4}" "$raw" | median
}
results=$bench/slow-link.txt
{
  echo "slow link: nixless install vs nix-store --realise vs nix copy — run ended $(date -u -r "$raw" '+%Y-%m-%d %H:%M UTC'), $ROUNDS round(s), medians"
  echo "machine: $(nproc) cores (shared with other work: see the load average), $(uname -r), $(nix --version); load average before: $load_start, after: $load_end"
  echo "closure: $SIZE paths, reference depth $DEPTH, NAR $(awk -v b="$NAR_BYTES" 'BEGIN {printf "%.1f", b / 1e6}') MB, over the link $(awk -v b="$LINK_BYTES" 'BEGIN {printf "%.1f", b / 1e6}') MB (zstd NARs + narinfos)"
  echo "link: bench/delay-proxy.py, RTT/2 each way, handshake = 1 RTT, slow start from 10 segments, cap shared by all connections (up and down), 100 ms bottleneck buffer"
  echo "bound = bytes over the link / cap + depth × RTT; x_bound = wall / bound; x_nix, x_j1 = wall / wall of nix-store with max-jobs 25, 1"
  echo
  printf '%6s %5s %-13s %8s %6s %6s %5s %8s %8s %8s %7s %6s %6s\n' rtt_ms mbit tool wall_s reqs conns open MB_down rss_MiB bound_s x_bound x_nix x_j1
  for rtt in $RTTS; do
    for mbit in $MBITS; do
      bound=$(awk -v b="$LINK_BYTES" -v m="$mbit" -v d="$DEPTH" -v r="$rtt" \
                'BEGIN {printf "%.2f", (m > 0 ? b * 8 / (m * 1e6) : 0) + d * r / 1000}')
      ref=$(col "$rtt" "$mbit" nix-store '$5')
      ref1=$(col "$rtt" "$mbit" nix-store-j1 '$5')
      for tool in "${tools[@]}"; do
        w=$(col "$rtt" "$mbit" "$tool" '$5')
        printf '%6s %5s %-13s %8.2f %6s %6s %5s %8.1f %8.1f %8s %7s %6s %6s\n' "$rtt" "$mbit" "$tool" "$w" \
          "$(col "$rtt" "$mbit" "$tool" '$7')" "$(col "$rtt" "$mbit" "$tool" '$8')" \
          "$(col "$rtt" "$mbit" "$tool" '$9')" "$(col "$rtt" "$mbit" "$tool" '$10 / 1e6')" \
          "$(col "$rtt" "$mbit" "$tool" '$6 / 1024')" "$bound" \
          "$(awk -v w="$w" -v b="$bound" 'BEGIN {if (b > 0) printf "%.2f", w / b; else print "-"}')" \
          "$(awk -v w="$w" -v n="$ref" 'BEGIN {if (n != "nan" && n > 0) printf "%.2f", w / n; else print "-"}')" \
          "$(awk -v w="$w" -v n="$ref1" 'BEGIN {if (n != "nan" && n > 0) printf "%.2f", w / n; else print "-"}')"
      done
    done
  done
  echo "(reqs, conns, open (most connections at once), MB_down: counted at the proxy; rss: max RSS of the tool's process, the agent's VmHWM)"
  if [ -s "$bench/slow-link-status.tsv" ] && [ "$(wc -l <"$bench/slow-link-status.tsv")" -gt 1 ]; then
    echo
    echo "agent: GET /v1/status latency while it fetches (polled every 100 ms, straight to the agent, not through the link)"
    awk -F'\t' 'NR == 1 {printf "%6s %5s %5s %7s %9s %7s %7s\n", $1, $2, $3, $4, $5, $6, $7; next}
                {printf "%6s %5s %5s %7s %9s %7s %7s\n", $1, $2, $3, $4, $5, $6, $7}' "$bench/slow-link-status.tsv"
  fi
} >"$results"
echo
cat "$results"
echo
[ "$TABLE_ONLY" = 1 ] || say "total $((SECONDS - t_all)) s; raw numbers in $raw, table in $results"
