#!/usr/bin/env bash
# Idle and busy memory of the agent (the static musl binary), printed, not
# asserted: RSS right after start, after 200 status requests, after a
# deploy of the 17-path test closure (~25 MiB NAR), and the peak (VmHWM).
# Targets (brief): idle RSS <= 4 MiB, binary <= 3 MiB stripped.
set -euo pipefail
cd "$(dirname "$0")/.."
export NIX_CONFIG=$'build-users-group =\nexperimental-features = nix-command\nsandbox = false\nsubstituters ='
cargo build -q --release --target x86_64-unknown-linux-musl
bin=target/x86_64-unknown-linux-musl/release/nixless
bash tests/support/fixtures.sh target/fixtures
# shellcheck disable=SC1091
source target/fixtures/env
work=$(mktemp -d /tmp/nixless-agent-bench.XXXXXX)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$bin" keygen admin-1 --out "$work/admin.key" >/dev/null
cat > "$work/agent.json" <<JSON
{"host":"bench","listen":["127.0.0.1:$port"],"caches":["file://$CACHE_ZSTD"],"cache_keys":["$PK_A"],
 "deploy_keys":["$(cat "$work/admin.key.pub")"],"root":"$work/root"}
JSON
"$bin" agent --config "$work/agent.json" 2>"$work/agent.log" &
pid=$!
trap 'kill $pid 2>/dev/null; chmod -R u+w $work; rm -rf $work' EXIT
for _ in $(seq 1 50); do curl -sf "http://127.0.0.1:$port/v1/status" >/dev/null && break; sleep 0.1; done
kib() { awk -v k="$1" '$1==k":" {print $2}' "/proc/$pid/status"; }
sleep 1
idle=$(kib VmRSS)
for _ in $(seq 1 200); do curl -sf "http://127.0.0.1:$port/v1/status" >/dev/null; done
after_status=$(kib VmRSS)
"$bin" deploy --key "$work/admin.key" --host bench --system "$TOP" --agent "http://127.0.0.1:$port" --no-wait 2>/dev/null
for _ in $(seq 1 300); do
  curl -sf "http://127.0.0.1:$port/v1/status" | grep -q '"phase":"switching"' && break
  sleep 0.1
done
after_deploy=$(kib VmRSS)
peak=$(kib VmHWM)
size=$(stat -c %s "$bin")
printf 'agent memory (static musl build, %s bytes = %.2f MiB stripped)\n' "$size" "$(echo "$size/1048576" | bc -l)"
printf '  idle RSS            %6d KiB\n' "$idle"
printf '  after 200 statuses  %6d KiB\n' "$after_status"
printf '  after a deploy      %6d KiB (17 paths, 24.6 MiB NAR, seccomp on)\n' "$after_deploy"
printf '  peak (VmHWM)        %6d KiB\n' "$peak"
