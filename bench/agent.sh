#!/usr/bin/env bash
# Idle and busy memory of the agent (the static musl binary), printed, not
# asserted: RSS right after start, after 200 status requests, after a
# deploy of the 17-path test closure (~25 MiB NAR), and the peak (VmHWM).
# Before the deploy, a hostile phase: 31 clients (4 addresses) each announce a
# 4 MiB deploy body with a signature header naming the trusted key and send
# it slowly, while 300 idle connections from 60 addresses sit open; the peak
# RSS after that phase is printed on its own.
# Targets (brief): idle RSS <= 4 MiB, binary <= 3 MiB stripped, peak RSS
# <= 16 MiB whatever unauthenticated clients send (issue E).
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
python3 - "$port" <<'PY'
import socket, sys, time
port = int(sys.argv[1])
def conn(src):
    s = socket.socket()
    s.bind((src, 0))
    s.connect(("127.0.0.1", port))
    return s
crowd = [conn("127.0.1.%d" % (i // 5 + 1)) for i in range(300)]
head = ("POST /v1/deploy HTTP/1.1\r\nHost: x\r\nNixless-Signature: admin-1:%s==\r\n"
        "Content-Length: %d\r\n\r\n" % ("A" * 86, 4 << 20)).encode()
ups = []
for i in range(31):
    s = conn("127.0.3.%d" % (i % 4 + 1))
    s.sendall(head)
    ups.append(s)
piece = b"x" * (64 << 10)
deadline = time.time() + 60
for _ in range(64):
    for s in ups:
        try:
            s.settimeout(max(0.1, deadline - time.time()))
            s.sendall(piece)
        except OSError:
            pass
    time.sleep(0.02)
for s in ups + crowd:
    s.close()
PY
after_hostile=$(kib VmHWM)
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
printf '  peak under attack   %6d KiB (31 x 4 MiB slow bodies + 300 idle connections)\n' "$after_hostile"
printf '  after a deploy      %6d KiB (17 paths, 24.6 MiB NAR, seccomp on)\n' "$after_deploy"
printf '  peak (VmHWM)        %6d KiB\n' "$peak"
