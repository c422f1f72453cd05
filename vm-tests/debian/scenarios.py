#!/usr/bin/env python3
"""The Debian VM scenarios: nixless under a real systemd, driven from the host.

    scenarios.py --image DIR --bin NIXLESS [--units nixos/units.json]
                 [--arch x86_64|aarch64] [--host-bin NIXLESS]
                 [--work DIR] [SCENARIO ...]

--bin is the binary installed in the guest, --host-bin (default: --bin) the
one the host deploys with; they differ for the aarch64 guest.

Scenarios (default: all those for --arch, in this order; aarch64 runs
ready-watchdog and deploy):
  ready-watchdog  Type=notify READY, the host reaches /v1/status through a
                  port forward, the seccomp filter is active and kills a
                  forbidden call, the service watchdog restarts a frozen agent
  deploy          a signed deploy from the host through nixless-switch.path /
                  nixless-switch.service; the switch restarts the agent (its
                  self-update); the deploy ends committed
  hw-watchdog     a system that hangs the machine while it is being verified:
                  the hardware watchdog resets the VM, the previous generation
                  boots, the agent records the update as failed
  killed-switch   a switch that records its units in /run/nixos/*-list and
                  hangs: killed at the switch timeout, its lists removed, the
                  rollback sees none and the deploy ends rolled-back
  uefi-boot       OVMF + systemd-boot, entries as NixOS writes them: a boot
                  deploy's one-time entry, confirmed and made the default; a
                  generation that hangs at boot, reset by the hardware
                  watchdog, the old entry boots; a boot-counted entry
                  (+TRIES) booted once, blessed, confirmed
  install-bench   not run by default: `nixless install` of a benchmark
                  closure in the guest, three times (both architectures, to compare
                  them under TCG: emulated speeds, not hardware speeds)

Each check prints `VMTEST:<scenario>:<check>:PASS|FAIL:<detail>`; the last
line is `N passed, N failed`. The exit status is non-zero if any check failed.
Measurements (the agent's RSS, install throughput) are printed as
`VMBENCH:<arch>:<what>:<value>` lines; they are numbers, not checks.
Every scenario boots its own copy-on-write overlay of the base image.
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
from vm import VM, VMError, find_free_port, log  # noqa: E402

GUEST_PORT = 8731
CACHE_IP = "10.0.2.100"  # guestfwd address of the host's nginx
NIX_CONFIG = "build-users-group =\nexperimental-features = nix-command\nsandbox = false\nsubstituters ="
KEYS = os.path.join(REPO, "vm-tests", "keys")


def read_key(name):
    with open(os.path.join(KEYS, name)) as f:
        return f.read().strip()


class CheckFailed(Exception):
    pass


class Results:
    def __init__(self):
        self.passed = 0
        self.failed = 0
        self.lines = []

    def record(self, scenario, check, ok, detail=""):
        detail = " ".join(str(detail).split())[:400]
        line = f"VMTEST:{scenario}:{check}:{'PASS' if ok else 'FAIL'}:{detail}"
        print(line, flush=True)
        self.lines.append(line)
        if ok:
            self.passed += 1
        else:
            self.failed += 1


# src/agent/seccomp.rs `selftest`: each must die of SIGSYS under the filter.
FORBIDDEN = ("execve", "spawn", "fork", "clone", "ptrace", "socket-netlink", "ioctl-other", "mmap-exec")


def bench(arch, what, value):
    print(f"VMBENCH:{arch}:{what}:{value}", flush=True)


def kib(status_text, field):
    """A `Field:  N kB` value from /proc/PID/status, in KiB (None if absent)."""
    for line in status_text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


class Scenario:
    """One scenario: a work dir, a share for the guest, a VM, checks."""

    name = ""
    needs_cache = False
    # The guest architectures the scenario is written for (the hardware
    # watchdog and UEFI scenarios need the x86_64 machine's devices).
    arches = ("x86_64",)

    def __init__(self, args, results):
        self.args = args
        self.results = results
        self.work = os.path.join(args.work, self.name)
        shutil.rmtree(self.work, ignore_errors=True)
        self.share = os.path.join(self.work, "share")
        os.makedirs(self.share)
        self.host_port = find_free_port()
        self.cache_port = find_free_port()
        self.vm = None
        self.nginx = False
        self.t0 = time.time()

    # ---- checks -----------------------------------------------------------
    def check(self, name, cond, detail=""):
        self.results.record(self.name, name, bool(cond), detail)
        if not cond:
            raise CheckFailed(f"{name}: {detail}")

    def elapsed(self):
        return f"{time.time() - self.t0:.0f} s"

    # ---- host side ----------------------------------------------------------
    def nixless(self, *argv, timeout=600):
        p = subprocess.run([self.args.host_bin, *argv], capture_output=True, text=True, timeout=timeout)
        log(f"host: nixless {' '.join(argv[:1])} -> {p.returncode}: {(p.stdout + p.stderr).strip()[-600:]}")
        return p

    def http_status(self, timeout=10):
        url = f"http://127.0.0.1:{self.host_port}/v1/status"
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return json.loads(r.read())

    def build_system(self, gen, behaviour="ok"):
        env = dict(os.environ, NIX_CONFIG=NIX_CONFIG)
        link = os.path.join(self.work, f"system-{gen}")
        out = subprocess.run(
            ["nix-build", os.path.join(HERE, "fake-system.nix"), "--argstr", "gen", str(gen),
             "--argstr", "behaviour", behaviour, "--out-link", link],
            env=env, capture_output=True, text=True, timeout=300)
        if out.returncode != 0:
            raise VMError(f"nix-build of fake system {gen}: {out.stderr[-2000:]}")
        return out.stdout.strip().splitlines()[-1]

    def publish(self, paths):
        """nix copy to a file:// cache (zstd, signed with the test cache
        key) served by nginx on 127.0.0.1, which the guest reaches as
        http://10.0.2.100 through a guestfwd."""
        cache = os.path.join(self.work, "cache")
        env = dict(os.environ, NIX_CONFIG=NIX_CONFIG)
        url = f"file://{cache}?compression=zstd&secret-key={os.path.join(KEYS, 'cache.sec')}"
        p = subprocess.run(["nix", "copy", "--to", url, *paths], env=env, capture_output=True,
                           text=True, timeout=300)
        if p.returncode != 0:
            raise VMError(f"nix copy: {p.stderr[-2000:]}")
        subprocess.run([os.path.join(REPO, "tests", "support", "nginx.sh"), "start", cache,
                        str(self.cache_port)], check=True, timeout=60)
        self.nginx = cache

    # ---- guest side ---------------------------------------------------------
    def agent_config(self, **extra):
        cfg = {
            "host": "vmtest",
            "listen": [f"0.0.0.0:{GUEST_PORT}"],
            "caches": [f"http://{CACHE_IP}"],
            "cache_keys": [read_key("cache.pub")],
            "deploy_keys": [read_key("deploy.pub")],
        }
        cfg.update(extra)
        return cfg

    def prepare_share(self, config, etc=None):
        """The files the guest sees at /mnt/vmtest (read-only 9p)."""
        shutil.copy2(self.args.bin, os.path.join(self.share, "nixless"))
        subprocess.run([sys.executable, os.path.join(HERE, "render-units.py"), self.args.units,
                        os.path.join(self.share, "units")], check=True, stdout=subprocess.DEVNULL)
        shutil.copytree(os.path.join(HERE, "helpers"), os.path.join(self.share, "helpers"))
        with open(os.path.join(self.share, "agent.json"), "w") as f:
            json.dump(config, f, indent=1)
        for rel, text in (etc or {}).items():
            p = os.path.join(self.share, "etc", rel)
            os.makedirs(os.path.dirname(p), exist_ok=True)
            with open(p, "w") as f:
                f.write(text)

    def boot(self):
        self.vm = VM(self.args.image, os.path.join(self.work, "vm"), self.share,
                     fwd={self.host_port: GUEST_PORT}, guestfwd={80: self.cache_port}, arch=self.args.arch)
        self.vm.start(boot_timeout=self.args.boot_timeout)

    def install(self):
        out = self.vm.succeed("/mnt/vmtest/helpers/install-nixless.sh", 120)
        self.check("units-install", True, out.strip().replace("\n", " | ")[-300:] or "ok")
        # The path unit must leave the protocol's file names free for the
        # agent's files (MakeDirectory= creates each watched path as a dir).
        dirs = self.vm.succeed("find /var/lib/nixless/switch -mindepth 1 -type d 2>/dev/null || true").split()
        self.check("switch-dir-clean", not dirs, f"directories where the protocol wants files: {dirs}" if dirs
                   else "no stray directories under /var/lib/nixless/switch")

    def provision(self, system):
        self.vm.succeed(f"/mnt/vmtest/helpers/provision.sh {system} http://{CACHE_IP} "
                        f"'{read_key('cache.pub')}'", 300)

    def show(self, unit, *props):
        out = self.vm.succeed(f"systemctl show {unit} " + " ".join(f"-p {p}" for p in props))
        return dict(line.split("=", 1) for line in out.strip().splitlines() if "=" in line)

    def guest_status(self):
        return json.loads(self.vm.succeed(f"curl -sf --max-time 10 http://127.0.0.1:{GUEST_PORT}/v1/status"))

    def wait_agent_active(self, timeout=120):
        self.vm.wait_until_succeeds(
            f"systemctl is-active -q nixless-agent && curl -sf --max-time 5 -o /dev/null "
            f"http://127.0.0.1:{GUEST_PORT}/v1/status", timeout)

    def diagnostics(self):
        if self.vm is None or self.vm.proc is None or self.vm.proc.poll() is not None:
            return
        try:
            rc, out = self.vm.execute(r"""
                systemctl --no-pager status nixless-agent nixless-switch.service nixless-switch.path 2>&1 | tail -40
                journalctl -b --no-pager -u nixless-agent -u nixless-switch -u nixless-switch.path -n 80
                echo "--- seccomp kills (audit type=1326; syscall numbers are the guest architecture's):"
                dmesg | grep 'type=1326' | sed 's/.*comm=/comm=/' | tail -5
                echo "--- state:"; cat /var/lib/nixless/state.json 2>/dev/null; echo
                d=/var/lib/nixless/switch; ls -la $d 2>/dev/null
                for f in request.json started result.json health-request.json health-result.json; do
                  [ -f $d/$f ] && echo "$f: $(head -c 300 $d/$f)"
                done
                req=$(sed -n 's/^{"id":\([0-9]*\).*/\1/p' $d/request.json 2>/dev/null)
                started=$(cat $d/started 2>/dev/null)
                if [ -n "$req" ] && [ "$req" != "$started" ] && ! systemctl -q is-active nixless-switch.service; then
                  echo "HINT: switch request $req is pending (started: ${started:-none}) but nixless-switch.service" \
                       "is not running: nixless-switch.path did not fire for it"
                fi
                echo "--- fake switch log:"; cat /var/lib/fake-nixos/log 2>/dev/null
                """, 60)
            path = os.path.join(self.work, "diagnostics.txt")
            with open(path, "w") as f:
                f.write(out)
            print(f"---- guest diagnostics ({path}) ----\n{out[-6000:]}\n----", flush=True)
        except Exception as e:  # the guest may be gone
            print(f"(no guest diagnostics: {e})", flush=True)

    def run(self):
        log(f"== scenario {self.name} (work dir {self.work})")
        try:
            self.body()
        except CheckFailed as e:
            log(f"scenario {self.name} failed: {e}")
            self.diagnostics()
        except Exception as e:
            self.results.record(self.name, "error", False, f"{type(e).__name__}: {e}")
            traceback.print_exc()
            self.diagnostics()
        finally:
            if self.vm is not None:
                self.vm.stop(30)
            if self.nginx:
                subprocess.run([os.path.join(REPO, "tests", "support", "nginx.sh"), "stop",
                                self.nginx, str(self.cache_port)], timeout=60)
            log(f"== scenario {self.name} done in {self.elapsed()}; console log {self.work}/vm/console.log")


class ReadyWatchdog(Scenario):
    """a. READY (Type=notify) and the service watchdog."""

    name = "ready-watchdog"
    arches = ("x86_64", "aarch64")
    watchdog_sec = 10

    def body(self):
        self.prepare_share(self.agent_config(), etc={
            "systemd/system/nixless-agent.service.d/vmtest.conf":
                f"[Service]\nWatchdogSec={self.watchdog_sec}s\n",
        })
        self.boot()
        self.install()
        # The kernel and the binary really are the architecture asked for
        # (ELF e_machine: 62 x86-64, 183 aarch64).
        out = self.vm.succeed("uname -m; od -An -tu2 -j18 -N2 /usr/local/bin/nixless").split()
        self.check("guest-architecture", out == [self.args.arch, {"x86_64": "62", "aarch64": "183"}[self.args.arch]],
                   f"uname -m, the binary's e_machine: {out}")
        st = self.show("nixless-agent", "ActiveState", "Type", "NotifyAccess")
        self.check("inactive-before-start", st.get("ActiveState") == "inactive"
                   and st.get("Type") == "notify" and st.get("NotifyAccess") == "main", st)

        # Type=notify: `systemctl start` returns only after READY=1, and the
        # agent sends READY only once it listens, so the very first request
        # after it returns must be answered (no retry loop here).
        t = time.time()
        out = self.vm.succeed(
            "systemctl start nixless-agent && systemctl show -p ActiveState -p SubState --value nixless-agent"
            f" && curl -sf --max-time 5 http://127.0.0.1:{GUEST_PORT}/v1/status", 120)
        lines = out.strip().splitlines()
        ok = lines[:2] == ["active", "running"] and len(lines) >= 3 and json.loads(lines[2]).get("host") == "vmtest"
        self.check("ready-then-serving", ok, f"start+status in {time.time() - t:.1f} s: {out.strip()[:200]}")
        st = self.show("nixless-agent", "StatusText", "MainPID", "NRestarts", "WatchdogUSec")
        self.check("watchdog-configured", st.get("WatchdogUSec") == f"{self.watchdog_sec}s", st)
        self.check("status-text", st.get("StatusText", "") != "", f"StatusText={st.get('StatusText')!r}")
        pid = int(st["MainPID"])
        seccomp = self.vm.succeed(f"grep -E '^(Seccomp|NoNewPrivs|CapBnd):' /proc/{pid}/status").split()
        self.check("hardened", "Seccomp:" in seccomp and seccomp[seccomp.index("Seccomp:") + 1] == "2",
                   " ".join(seccomp))
        self.check_seccomp_kills()

        status = self.http_status()
        self.check("host-status-via-hostfwd", status.get("host") == "vmtest" and status.get("phase") == "idle",
                   f"127.0.0.1:{self.host_port} -> phase {status.get('phase')}")

        # Fed: alive and not restarted after two watchdog periods.
        time.sleep(2 * self.watchdog_sec + 2)
        st2 = self.show("nixless-agent", "MainPID", "NRestarts", "ActiveState")
        metrics = self.vm.succeed(f"curl -sf --max-time 5 http://127.0.0.1:{GUEST_PORT}/metrics")
        pings = [line.split()[-1] for line in metrics.splitlines() if line.startswith("nixless_watchdog_pings_total")]
        self.check("watchdog-fed", st2.get("MainPID") == str(pid) and st2.get("NRestarts") == "0"
                   and pings and int(float(pings[0])) > 0, f"{st2} pings={pings}")
        mem = self.vm.succeed(f"cat /proc/{pid}/status")
        bench(self.args.arch, "agent-idle-rss-kib", f"VmRSS={kib(mem, 'VmRSS')} VmHWM={kib(mem, 'VmHWM')}")

        # Frozen: systemd's watchdog must kill and restart it.
        t = time.time()
        self.vm.succeed(f"kill -STOP {pid}")
        deadline = t + self.watchdog_sec * 3 + 60
        new = None
        while time.time() < deadline:
            st3 = self.show("nixless-agent", "MainPID", "NRestarts", "ActiveState", "SubState")
            if st3.get("NRestarts") == "1" and st3.get("MainPID") not in ("0", str(pid)) \
                    and st3.get("ActiveState") == "active":
                new = st3
                break
            time.sleep(1)
        took = time.time() - t
        journal = self.vm.succeed("journalctl -b --no-pager -u nixless-agent | grep -i watchdog || true")
        self.check("watchdog-restart", new is not None and "atchdog timeout" in journal,
                   f"restarted in {took:.1f} s (WatchdogSec={self.watchdog_sec}s): {new}; {journal.strip()[-200:]}")
        status = self.http_status()
        self.check("status-after-restart", status.get("host") == "vmtest", f"phase {status.get('phase')}")


    def check_seccomp_kills(self):
        """The filter on this kernel: `nixless __seccomp-selftest` installs
        it in a fresh process; the agent's own operations must run, each
        forbidden call must end the process with SIGSYS (bash: 128 + 31)."""
        # (bash also reports each "Bad system call" on stderr: only the
        # RC lines count.)
        out = self.vm.succeed(
            f"for w in allowed {' '.join(FORBIDDEN)}; do"
            "   nixless __seccomp-selftest $w >/dev/null 2>&1; echo RC $w $?; done", 120)
        got = dict(line.split()[1:3] for line in out.splitlines() if line.startswith("RC ") and len(line.split()) == 3)
        want = {"allowed": "0", **{w: "159" for w in FORBIDDEN}}
        self.check("seccomp-kills-forbidden", got == want,
                   f"exit codes (159 = SIGSYS): {got}")


class Deploy(Scenario):
    """b. A signed deploy through the oneshot switch unit; the switch
    restarts the agent (self-update); the deploy ends committed."""

    name = "deploy"
    arches = ("x86_64", "aarch64")

    def body(self):
        gen1 = self.build_system(1)
        gen2 = self.build_system(2)
        self.publish([gen1, gen2])
        self.prepare_share(self.agent_config(health_timeout_secs=120), etc={
            "systemd/system/nixless-agent.service.d/vmtest.conf": "[Service]\nWatchdogSec=10s\n",
        })
        self.boot()
        self.install()
        self.provision(gen1)
        self.vm.succeed("systemctl start nixless-agent", 120)
        self.wait_agent_active()
        pid1 = self.show("nixless-agent", "MainPID")["MainPID"]
        st = self.guest_status()
        self.check("provisioned", st.get("current_system") == gen1 and st.get("profile_system") == gen1,
                   f"current {st.get('current_system')}")

        # The deploying agent's peak RSS: VmHWM (monotonic) sampled until
        # the switch replaces the process; the last sample is its peak.
        mem = self.vm.succeed(f"cat /proc/{pid1}/status")
        self.vm.succeed(f"echo 'while [ -e /proc/{pid1} ]; do awk \"/^VmHWM:/ {{print \\$2}}\" /proc/{pid1}/status;"
                        " sleep 0.1; done >/run/vmtest-hwm' >/run/vmtest-hwm.sh"
                        " && systemd-run -q --unit vmtest-hwm --collect /bin/bash /run/vmtest-hwm.sh")
        seq = int(time.time())
        t = time.time()
        p = self.nixless("deploy", "--key", os.path.join(KEYS, "deploy.sec"), "--host", "vmtest",
                         "--system", gen2, "--seq", str(seq), "--agent", f"http://127.0.0.1:{self.host_port}",
                         "--timeout", "300", timeout=360)
        self.check("deploy-committed", p.returncode == 0 and "committed" in p.stderr,
                   f"{time.time() - t:.0f} s: {p.stderr.strip()[-300:]}")
        hwm = self.vm.succeed("grep -E '^[0-9]+$' /run/vmtest-hwm | tail -n 1 || true").strip()
        bench(self.args.arch, "agent-deploy-peak-kib",
              f"VmHWM={hwm or '?'} (idle before: VmRSS={kib(mem, 'VmRSS')} VmHWM={kib(mem, 'VmHWM')})")

        log_lines = self.vm.succeed("cat /var/lib/fake-nixos/log").strip().splitlines()
        runs = [(l.split()[1], l.split()[2], l.split()[3]) for l in log_lines]
        self.check("switch-ran-in-oneshot-unit",
                   [r[:2] for r in runs] == [("gen=2", "action=test"), ("gen=2", "action=boot")]
                   and all(r[2].endswith("/nixless-switch.service") for r in runs), runs)

        st = self.show("nixless-agent", "MainPID", "ActiveState", "Environment")
        env = self.vm.succeed(f"tr '\\0' '\\n' </proc/{st['MainPID']}/environ | grep NIXLESS_VMTEST || true").strip()
        self.check("agent-self-updated", st["MainPID"] != pid1 and st["ActiveState"] == "active"
                   and env == "NIXLESS_VMTEST_GENERATION=2", f"MainPID {pid1} -> {st['MainPID']}, {env!r}")

        links = self.vm.succeed(
            "readlink /nix/var/nix/profiles/system; readlink /nix/var/nix/profiles/system-2-link;"
            " cat /var/lib/fake-boot/default; readlink /run/current-system").split()
        self.check("committed-on-disk", links == ["system-2-link", gen2, gen2, gen2], links)

        status = self.http_status()
        last = status.get("last_result") or {}
        self.check("status-committed", last.get("seq") == seq and last.get("outcome") == "committed"
                   and status.get("phase") == "idle" and status.get("current_system") == gen2,
                   f"{last} current {status.get('current_system')}")

        out = self.vm.succeed(f"nixless verify {gen2}", 120)
        self.check("store-verified", True, out.strip()[-200:] or "ok")

        # The same document again is a replay: refused, nothing moves.
        p = self.nixless("deploy", "--key", os.path.join(KEYS, "deploy.sec"), "--host", "vmtest",
                         "--system", gen1, "--seq", str(seq), "--agent", f"http://127.0.0.1:{self.host_port}",
                         "--no-wait", timeout=120)
        status = self.http_status()
        self.check("replay-refused", p.returncode != 0 and status.get("current_system") == gen2,
                   p.stderr.strip()[-200:])


class HwWatchdog(Scenario):
    """c. A hang while verifying: the hardware watchdog resets the machine,
    the previous generation boots, the agent records the update as failed."""

    name = "hw-watchdog"
    runtime_watchdog = 10

    def body(self):
        gen1 = self.build_system(1)
        bad = self.build_system(3, behaviour="hang")
        self.publish([gen1, bad])
        # Verification that takes long enough for the hang to happen in it.
        cfg = self.agent_config(health_timeout_secs=300, health_command=["/bin/sleep", "120"])
        self.prepare_share(cfg, etc={
            "systemd/system/nixless-agent.service.d/vmtest.conf": "[Service]\nWatchdogSec=10s\n",
            "systemd/system.conf.d/vmtest-watchdog.conf":
                f"[Manager]\nRuntimeWatchdogSec={self.runtime_watchdog}s\n",
        })
        self.boot()
        self.install()
        self.provision(gen1)
        # PID 1 re-reads system.conf.d and starts driving the i6300esb.
        self.vm.succeed("systemctl daemon-reexec", 120)
        wd = self.vm.wait_until_succeeds(
            "[ \"$(cat /sys/class/watchdog/watchdog0/state)\" = active ] && "
            "echo $(cat /sys/class/watchdog/watchdog0/identity) $(cat /sys/class/watchdog/watchdog0/timeout)", 30)
        self.check("hw-watchdog-armed", wd.split()[-1] == str(self.runtime_watchdog), wd.strip())
        self.vm.succeed("systemctl start nixless-agent", 120)
        self.wait_agent_active()
        boot1 = self.vm.boot_id

        seq = int(time.time())
        p = self.nixless("deploy", "--key", os.path.join(KEYS, "deploy.sec"), "--host", "vmtest",
                         "--system", bad, "--seq", str(seq), "--agent", f"http://127.0.0.1:{self.host_port}",
                         "--no-wait", timeout=120)
        self.check("deploy-accepted", p.returncode == 0, p.stderr.strip()[-200:])
        t = time.time()
        # Watch it reach verifying (best effort: the hang may beat us to it).
        phases = set()
        while time.time() - t < 240 and self.vm.proc.poll() is None:
            try:
                phases.add(self.http_status(timeout=3).get("phase"))
            except Exception:
                pass
            if any(ev[1] == "WATCHDOG" for ev in self.vm.events):
                break
            try:
                self.vm._pump(1.0)
            except VMError:
                break
        phases = sorted(p for p in phases if p)
        log(f"phases seen before the reset: {phases}")
        self.vm.wait_for_reboot(self.args.boot_timeout + 240)
        took = time.time() - t
        wd_events = [ev[2] for ev in self.vm.events if ev[1] == "WATCHDOG"]
        console = self.vm.console()
        self.check("watchdog-reset", bool(wd_events) and self.vm.boot_id != boot1 and "verifying" in phases,
                   f"qemu WATCHDOG {wd_events} while verifying, back up {took:.0f} s after the deploy; "
                   f"panic on console: {'Kernel panic' in console}; phases seen {phases}")

        self.wait_agent_active(180)
        status = None
        deadline = time.time() + 120
        while time.time() < deadline:
            status = self.guest_status()
            if (status.get("last_result") or {}).get("seq") == seq:
                break
            time.sleep(2)
        last = (status or {}).get("last_result") or {}
        self.check("update-failed", last.get("outcome") == "failed"
                   and "rebooted before the update was committed" in (last.get("reason") or ""), last)
        status = self.http_status()
        self.check("host-sees-failed", (status.get("last_result") or {}).get("outcome") == "failed"
                   and status.get("phase") == "idle", status.get("last_result"))

        links = self.vm.succeed(
            "cat /var/lib/fake-boot/default; readlink /run/booted-system; readlink /run/current-system;"
            " readlink /nix/var/nix/profiles/system; ls /nix/var/nix/profiles").split()
        self.check("previous-generation-booted", links == [gen1, gen1, gen1, "system-1-link", "system",
                                                           "system-1-link"], links)
        runs = self.vm.succeed("cat /var/lib/fake-nixos/log").strip().splitlines()
        self.check("bad-update-was-tested-never-booted",
                   any("gen=3 action=test" in r for r in runs) and not any("action=boot" in r for r in runs), runs)


class KilledSwitch(Scenario):
    """d. A switch killed at the switch timeout leaves switch-to-configuration's
    unit lists (/run/nixos/*-list), which every later run resumes: the
    rollback must not see them, and the deploy ends rolled-back."""

    name = "killed-switch"
    switch_timeout = 40

    def body(self):
        gen1 = self.build_system(1)
        gen2 = self.build_system(2, behaviour="hang-lists")
        self.publish([gen1, gen2])
        self.prepare_share(self.agent_config(switch_timeout_secs=self.switch_timeout, health_timeout_secs=60))
        self.boot()
        self.install()
        self.provision(gen1)
        self.vm.succeed("systemctl start nixless-agent", 120)
        self.wait_agent_active()

        seq = int(time.time())
        p = self.nixless("deploy", "--key", os.path.join(KEYS, "deploy.sec"), "--host", "vmtest",
                         "--system", gen2, "--seq", str(seq), "--agent", f"http://127.0.0.1:{self.host_port}",
                         "--no-wait", timeout=120)
        self.check("deploy-accepted", p.returncode == 0, p.stderr.strip()[-200:])
        # While it hangs: its unit runs, its lists are on disk.
        hung = self.vm.wait_until_succeeds(
            "systemctl is-active -q vmtest-gen2-only.service && cat /run/nixos/start-list", 180)
        self.check("lists-written-while-hanging", "vmtest-gen2-only.service" in hung, hung.strip())

        last = {}
        deadline = time.time() + self.switch_timeout + 240
        while time.time() < deadline:
            try:
                status = self.http_status(timeout=5)
            except Exception:  # the rollback restarts the agent
                status = {}
            last = status.get("last_result") or {}
            if last.get("seq") == seq and status.get("phase") == "idle":
                break
            time.sleep(2)
        self.check("rolled-back", last.get("seq") == seq and last.get("outcome") == "rolled-back"
                   and "killed after" in (last.get("reason") or ""), last)

        runs = self.vm.succeed("cat /var/lib/fake-nixos/log").strip().splitlines()
        fields = [dict(f.split("=", 1) for f in r.split()[1:] if "=" in f) for r in runs]
        seen = [(f.get("gen"), f.get("action"), f.get("left")) for f in fields]
        self.check("rollback-saw-no-lists", seen == [("2", "test", "none"), ("1", "test", "none")], seen)
        files = self.vm.succeed("ls /run/nixos").split()
        hang = self.vm.succeed("pid=$(cat /var/lib/fake-nixos/hang.pid);"
                               " if kill -0 $pid 2>/dev/null; then echo alive $pid; else echo gone; fi").strip()
        self.check("lists-gone-child-killed", not [f for f in files if f.endswith("-list")] and hang == "gone",
                   f"/run/nixos: {files}; the hung switch's child: {hang}")
        journal = self.vm.succeed("journalctl -b --no-pager -u nixless-switch | grep 'removed /run/nixos' || true")
        self.check("helper-logged-removal", "vmtest-gen2-only.service" in journal, journal.strip()[-300:])
        links = self.vm.succeed("readlink /run/current-system; readlink /nix/var/nix/profiles/system").split()
        self.check("previous-system-runs", links == [gen1, "system-1-link"], links)



OVMF_CODE = "/usr/share/OVMF/OVMF_CODE_4M.fd"
OVMF_VARS = "/usr/share/OVMF/OVMF_VARS_4M.fd"
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
ESP_OFFSET = 1 << 20  # the partition's first byte: sector 2048
LOADER_VENDOR = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"  # systemd-boot's EFI variables
KERNEL_ON_ESP = "/EFI/nixos/vmtest-linux-bzImage.efi"
INITRD_ON_ESP = "/EFI/nixos/vmtest-initrd-initrd.efi"


def make_esp(path, files, size_mib=64):
    """A raw disk: GPT, one EFI system partition (FAT) holding `files`
    ({path on the ESP: bytes or a host file}); made without mounting."""
    sectors = size_mib * 2048
    part = sectors - 2048 - 2048  # room for the backup GPT at the end
    with open(path, "wb") as f:
        f.truncate(sectors * 512)
    subprocess.run(["sfdisk", "-q", path], input=f"label: gpt\nstart=2048, size={part}, type={ESP_TYPE}, "
                   "name=\"EFI system partition\"\n", text=True, check=True, capture_output=True)
    subprocess.run(["mkfs.vfat", "-n", "ESP", "--offset", "2048", path, str(part // 2)], check=True,
                   capture_output=True)
    img = f"{path}@@{ESP_OFFSET}"
    made = set()
    for dest, src in sorted(files.items()):
        parts = dest.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in made:
                subprocess.run(["mmd", "-i", img, "::/" + d], check=True, capture_output=True)
                made.add(d)
        if isinstance(src, bytes):
            tmp = path + ".file"
            with open(tmp, "wb") as f:
                f.write(src)
            src = tmp
        subprocess.run(["mcopy", "-i", img, src, "::" + dest], check=True, capture_output=True)


class UefiBoot(Scenario):
    """d. `boot` deploys through real UEFI firmware (OVMF) and a real
    systemd-boot, with entries written as NixOS's builder writes them: the
    one-time entry, the confirmed first boot that becomes the default, and a
    generation that hangs at boot, reset by the hardware watchdog, after
    which the old entry boots; then boot counting (boot_counting)."""

    name = "uefi-boot"
    runtime_watchdog = 10

    # ---- guest helpers --------------------------------------------------
    def efivar(self, name):
        """A systemd-boot EFI variable as text ("" if unset)."""
        return self.vm.succeed(
            f"f=/sys/firmware/efi/efivars/{name}-{LOADER_VENDOR}; "
            "if [ -e $f ]; then cat $f | tail -c +5 | tr -d '\\000'; fi").strip()

    def loader_default(self):
        return self.vm.succeed("sed -n 's/^default //p' /boot/loader/loader.conf").strip()

    def reboot(self, timeout=None):
        self.vm.succeed("systemctl --no-block reboot")
        return self.vm.wait_for_reboot(timeout or self.args.boot_timeout)

    def booted(self):
        """(entry systemd-boot booted, /run/booted-system)."""
        return self.efivar("LoaderEntrySelected"), self.vm.succeed("readlink /run/booted-system").strip()

    def deploy_boot(self, system, seq):
        p = self.nixless("deploy", "--key", os.path.join(KEYS, "deploy.sec"), "--host", "vmtest",
                         "--system", system, "--seq", str(seq), "--action", "boot",
                         "--agent", f"http://127.0.0.1:{self.host_port}", "--no-wait", timeout=120)
        if p.returncode != 0:
            raise CheckFailed(f"deploy of {system} not accepted: {p.stderr.strip()[-300:]}")
        deadline = time.time() + 300
        while time.time() < deadline:
            st = self.guest_status()
            if st.get("phase") == "awaiting-reboot":
                return st
            if (st.get("last_result") or {}).get("seq") == seq:
                raise CheckFailed(f"boot deploy ended before the reboot: {st.get('last_result')}")
            time.sleep(2)
        raise CheckFailed(f"boot deploy of {system} never reached awaiting-reboot: {self.guest_status()}")

    def wait_result(self, seq, timeout=240):
        deadline = time.time() + timeout
        last = {}
        while time.time() < deadline:
            try:
                last = self.guest_status().get("last_result") or {}
            except (VMError, ValueError):
                last = {}
            if last.get("seq") == seq:
                return last
            time.sleep(2)
        return last

    def build(self, gen, behaviour="ok", tries=""):
        env = dict(os.environ, NIX_CONFIG=NIX_CONFIG)
        link = os.path.join(self.work, f"system-{gen}")
        with open(os.path.join(self.args.image, "cmdline")) as f:
            params = f.read().strip()
        out = subprocess.run(
            ["nix-build", os.path.join(HERE, "fake-system.nix"), "--argstr", "gen", str(gen),
             "--argstr", "behaviour", behaviour, "--argstr", "kernelParams", params,
             "--argstr", "bootCountingTries", tries, "--out-link", link],
            env=env, capture_output=True, text=True, timeout=300)
        if out.returncode != 0:
            raise VMError(f"nix-build of fake system {gen}: {out.stderr[-2000:]}")
        return out.stdout.strip().splitlines()[-1]

    def boot_uefi(self):
        with open(os.path.join(self.args.image, "cmdline")) as f:
            cmdline = f.read().strip()
        efi = os.path.join(self.args.image, "systemd-bootx64.efi")
        esp = os.path.join(self.work, "esp.raw")
        # What an installer leaves: systemd-boot (as `bootctl install` puts
        # it), the kernel and initrd, and an entry for the installer system.
        make_esp(esp, {
            "/EFI/BOOT/BOOTX64.EFI": efi,
            "/EFI/systemd/systemd-bootx64.efi": efi,
            KERNEL_ON_ESP: os.path.join(self.args.image, "vmlinuz"),
            INITRD_ON_ESP: os.path.join(self.args.image, "initrd.img"),
            "/loader/loader.conf": b"timeout 0\ndefault vmtest-installer.conf\neditor 0\n",
            "/loader/entries/vmtest-installer.conf":
                f"title Debian (vmtest installer)\nlinux {KERNEL_ON_ESP}\ninitrd {INITRD_ON_ESP}\n"
                f"options {cmdline}\n".encode(),
        })
        vars_copy = os.path.join(self.work, "OVMF_VARS.fd")
        shutil.copyfile(OVMF_VARS, vars_copy)
        self.vm = VM(self.args.image, os.path.join(self.work, "vm"), self.share,
                     fwd={self.host_port: GUEST_PORT}, guestfwd={80: self.cache_port},
                     uefi={"code": OVMF_CODE, "vars": vars_copy, "esp": esp})
        self.vm.start(boot_timeout=self.args.boot_timeout)

    def body(self):
        for f in (OVMF_CODE, OVMF_VARS, os.path.join(self.args.image, "systemd-bootx64.efi")):
            if not os.path.exists(f):
                raise VMError(f"missing {f} (apt-get install ovmf; rebuild the image)")
        gen1 = self.build(1)
        gen2 = self.build(2)
        gen3 = self.build(3, behaviour="boot-hang")
        gen4 = self.build(4, tries="3")
        self.publish([gen1, gen2, gen3, gen4])
        self.prepare_share(self.agent_config(health_timeout_secs=120), etc={
            "systemd/system/nixless-agent.service.d/vmtest.conf": "[Service]\nWatchdogSec=10s\n",
            "systemd/system.conf.d/vmtest-watchdog.conf":
                f"[Manager]\nRuntimeWatchdogSec={self.runtime_watchdog}s\n",
            # The bad generation (kernel parameter nixless.vmtest.hang) hangs
            # the machine at boot, once the hardware watchdog is armed.
            "systemd/system/vmtest-boot-hang.service": """[Unit]
Description=VM test: this generation hangs at boot
ConditionKernelCommandLine=nixless.vmtest.hang
DefaultDependencies=no
After=systemd-modules-load.service
Before=sysinit.target vmtest-backdoor.service

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'for i in $(seq 90); do [ "$(cat /sys/class/watchdog/watchdog0/state 2>/dev/null)" = active ] && break; sleep 1; done; echo "<2>vmtest: hanging at boot" >/dev/kmsg; echo c >/proc/sysrq-trigger'

[Install]
WantedBy=sysinit.target
""",
        })
        self.boot_uefi()
        efi = self.vm.succeed("test -d /sys/firmware/efi && findmnt -n -o FSTYPE /sys/firmware/efi/efivars").strip()
        self.check("uefi-booted", efi == "efivarfs" and self.efivar("LoaderEntrySelected") == "vmtest-installer.conf",
                   f"efivars {efi!r}, LoaderEntrySelected {self.efivar('LoaderEntrySelected')!r}, "
                   f"loader {self.efivar('LoaderInfo')!r}")
        self.install()
        # The ESP at /boot (NixOS's default efiSysMountPoint), then what
        # nixos-install does: generation 1, its boot loader entries.
        self.vm.succeed("mkdir -p /boot && echo '/dev/vdb1 /boot vfat umask=0077 0 2' >>/etc/fstab"
                        " && systemctl daemon-reload && mount /boot && systemctl enable -q vmtest-boot-hang.service")
        self.provision(gen1)
        self.vm.succeed(f"{gen1}/bin/switch-to-configuration boot", 120)
        st = self.vm.succeed("bootctl is-installed && bootctl --print-esp-path && ls /boot/loader/entries")
        self.check("installed", "nixos-generation-1.conf" in st and self.loader_default() == "nixos-generation-1.conf",
                   st.strip().replace("\n", " | "))
        t = time.time()
        self.reboot()
        sel, booted = self.booted()
        self.check("boots-generation-1", sel == "nixos-generation-1.conf" and booted == gen1,
                   f"{sel} {booted} ({time.time() - t:.0f} s)")
        wd = self.vm.wait_until_succeeds(
            "[ \"$(cat /sys/class/watchdog/watchdog0/state)\" = active ] && "
            "echo $(cat /sys/class/watchdog/watchdog0/identity) $(cat /sys/class/watchdog/watchdog0/timeout)", 60)
        self.check("hw-watchdog-armed", wd.split()[-1] == str(self.runtime_watchdog), wd.strip())
        self.wait_agent_active(180)

        # ---- a boot deploy: one-time entry, confirmed, the new default ----
        seq = int(time.time())
        self.deploy_boot(gen2, seq)
        state = (self.loader_default(), self.efivar("LoaderEntryDefault"), self.efivar("LoaderEntryOneShot"))
        self.check("one-time-entry", state == ("nixos-generation-2.conf", "nixos-generation-1.conf",
                                               "nixos-generation-2.conf"),
                   f"loader.conf default, LoaderEntryDefault, LoaderEntryOneShot = {state}")
        self.check_override_before_move("nixos-generation-1.conf")
        self.reboot()
        sel, booted = self.booted()
        self.check("one-time-boot-of-generation-2", sel == "nixos-generation-2.conf" and booted == gen2
                   and self.efivar("LoaderEntryOneShot") == "", f"{sel} {booted}")
        last = self.wait_result(seq)
        state = (self.loader_default(), self.efivar("LoaderEntryDefault"))
        self.check("confirmed-and-default", last.get("outcome") == "committed"
                   and state == ("nixos-generation-2.conf", ""), f"{last}; loader.conf, LoaderEntryDefault = {state}")
        self.reboot()
        sel, booted = self.booted()
        self.check("generation-2-is-the-default", sel == "nixos-generation-2.conf" and booted == gen2,
                   f"plain reboot: {sel} {booted}")
        self.wait_agent_active(180)

        # ---- a generation that hangs at boot ------------------------------
        seq = int(time.time())
        self.deploy_boot(gen3, seq)
        state = (self.loader_default(), self.efivar("LoaderEntryDefault"), self.efivar("LoaderEntryOneShot"))
        self.check("one-time-entry-3", state == ("nixos-generation-3.conf", "nixos-generation-2.conf",
                                                 "nixos-generation-3.conf"), state)
        self.check_override_before_move("nixos-generation-2.conf")
        boot_before = self.vm.boot_id
        t = time.time()
        self.vm.succeed("systemctl --no-block reboot")
        # The hanging generation may or may not get its backdoor up before it
        # hangs: wait for a boot that follows the watchdog's reset.
        deadline = time.time() + 2 * self.args.boot_timeout + 120
        while True:
            self.vm.wait_for_backdoor(max(10, deadline - time.time()))
            if any(ev[1] == "WATCHDOG" for ev in self.vm.events):
                break
            log(f"a boot before the watchdog reset: {self.efivar('LoaderEntrySelected')}")
        wd_events = [ev[2] for ev in self.vm.events if ev[1] == "WATCHDOG"]
        console = self.vm.console()
        sel, booted = self.booted()
        # The one-time boot did boot generation 3: its hang unit started
        # (it runs only with generation 3's kernel parameters).
        self.check("hang-reset-by-watchdog", wd_events and self.vm.boot_id != boot_before
                   and "vmtest-boot-hang" in console,
                   f"qemu WATCHDOG {wd_events}, back {time.time() - t:.0f} s after the reboot; "
                   f"hang logged: {'vmtest: hanging at boot' in console}")
        self.check("old-entry-booted", sel == "nixos-generation-2.conf" and booted == gen2, f"{sel} {booted}")
        last = self.wait_result(seq)
        state = (self.loader_default(), self.efivar("LoaderEntryDefault"), self.efivar("LoaderEntryOneShot"))
        self.check("boot-deploy-failed", last.get("outcome") == "failed"
                   and "did not come up" in (last.get("reason") or ""), last)
        links = self.vm.succeed("readlink /nix/var/nix/profiles/system; readlink /run/current-system").split()
        self.check("back-on-generation-2", state == ("nixos-generation-2.conf", "", "")
                   and links == ["system-2-link", gen2], f"loader.conf, LoaderEntryDefault, OneShot = {state}; {links}")
        # Every time the builder moved loader.conf's default after the
        # installation, LoaderEntryDefault pinned the generation that was
        # running: the default the firmware boots never moved to an
        # unconfirmed generation.
        lines = self.vm.succeed("cat /var/lib/fake-nixos/bootloader-log").strip().splitlines()
        self.check("effective-default-never-moved",
                   len(lines) >= 4 and all(l.split("LoaderEntryDefault=", 1)[-1] for l in lines[1:]),
                   " | ".join(lines))

        self.boot_counting(gen2, gen4)

    def boot_counting(self, gen2, gen4):
        """boot.loader.systemd-boot.bootCounting: the builder writes a new
        entry as nixos-generation-N+TRIES.conf. The one-time entry must still
        be found (systemd-boot 252 keeps the counter in the entry id), the
        boot counts down, and systemd-bless-boot blesses it at
        boot-complete.target."""
        seq = int(time.time())
        self.wait_agent_active(180)
        self.deploy_boot(gen4, seq)
        files = self.vm.succeed("ls /boot/loader/entries").split()
        state = (self.loader_default(), self.efivar("LoaderEntryDefault"), self.efivar("LoaderEntryOneShot"))
        self.check("counted-one-time-entry", "nixos-generation-4+3.conf" in files
                   and state == ("nixos-generation-4.conf", "nixos-generation-2.conf", "nixos-generation-4[+.]*"),
                   f"entries {files}; loader.conf, LoaderEntryDefault, LoaderEntryOneShot = {state}")
        self.reboot()
        sel, booted = self.booted()
        self.check("counted-entry-booted", sel.startswith("nixos-generation-4") and booted == gen4,
                   f"LoaderEntrySelected {sel!r} (systemd-boot 252: the whole file name), {booted}")
        # systemd-bless-boot renames the entry once boot-complete.target is
        # reached; nixless's confirmation is independent of it.
        out = self.vm.wait_until_succeeds(
            "systemctl is-active -q systemd-bless-boot.service && ls /boot/loader/entries | grep '^nixos-generation-4'"
            " && journalctl -b -o short-monotonic --no-pager -u systemd-bless-boot -u nixless-agent"
            " | grep -E 'bless|Successfully|boot-complete|committed|healthy' | tail -5", 120)
        self.check("blessed-by-systemd-bless-boot", out.split()[0] == "nixos-generation-4.conf",
                   out.strip().replace("\n", " | "))
        last = self.wait_result(seq)
        state = (self.loader_default(), self.efivar("LoaderEntryDefault"))
        self.check("counted-boot-confirmed", last.get("outcome") == "committed"
                   and state == ("nixos-generation-4.conf", ""), f"{last}; loader.conf, LoaderEntryDefault = {state}")
        self.reboot()
        sel, booted = self.booted()
        self.check("blessed-entry-is-the-default", sel == "nixos-generation-4.conf" and booted == gen4,
                   f"plain reboot: {sel} {booted}")

    def check_override_before_move(self, old_entry):
        """When the builder moved loader.conf's default to the new entry,
        LoaderEntryDefault already held the old one: no moment in which a
        reset would boot the new generation for good."""
        line = self.vm.succeed("tail -n 1 /var/lib/fake-nixos/bootloader-log").strip()
        self.check("override-set-before-loader-conf-moved", line.endswith(f"LoaderEntryDefault={old_entry}"), line)


class InstallBench(Scenario):
    """`nixless install` throughput in the guest: tests/support/bench.nix
    (n small paths and one file half random, half repetitive, zstd) from the
    host's nginx into a fresh --root, ROUNDS times, timed in the guest; the
    process's peak RSS sampled from /proc. Under TCG these are emulated
    speeds: compare the two architectures on one machine, not with
    hardware."""

    name = "install-bench"
    arches = ("x86_64", "aarch64")
    rounds = 3
    n_small = 200
    big_mib = 32

    def body(self):
        env = dict(os.environ, NIX_CONFIG=NIX_CONFIG)
        out = subprocess.run(
            ["nix-build", os.path.join(REPO, "tests", "support", "bench.nix"), "--argstr", "salt", "vmbench-v1",
             "--arg", "n", str(self.n_small), "--arg", "bigMiB", str(self.big_mib),
             "--out-link", os.path.join(self.work, "bench-top")],
            env=env, capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            raise VMError(f"nix-build of the bench closure: {out.stderr[-2000:]}")
        top = out.stdout.strip().splitlines()[-1]
        closure = subprocess.run(["nix-store", "-qR", top], env=env, capture_output=True, text=True,
                                 check=True, timeout=120).stdout.split()
        info = subprocess.run(["nix", "path-info", "-S", "--json", top], env=env, capture_output=True, text=True,
                              check=True, timeout=120).stdout
        nar = int(json.loads(info)[0]["closureSize"])
        self.publish([top])
        self.prepare_share(self.agent_config())
        self.boot()
        self.vm.succeed("install -m 0755 /mnt/vmtest/nixless /usr/local/bin/nixless")
        key = read_key("cache.pub")
        times = []
        for r in range(1, self.rounds + 1):
            res = self.vm.succeed(f"""
                d=/var/tmp/bench; rm -rf $d; mkdir -p $d; sync
                t0=$(date +%s%N)
                nixless install --root $d --cache http://{CACHE_IP} --trusted-key '{key}' {top} 2>/var/tmp/bench.err &
                pid=$!; hwm=0
                while kill -0 $pid 2>/dev/null; do
                  h=$(awk '/^VmHWM:/ {{print $2}}' /proc/$pid/status 2>/dev/null); [ -n "$h" ] && hwm=$h; sleep 0.1
                done
                wait $pid; rc=$?; t1=$(date +%s%N)
                [ $rc -eq 0 ] || {{ tail -5 /var/tmp/bench.err; exit $rc; }}
                echo $(( (t1 - t0) / 1000000 )) $hwm $(ls $d/nix/store | grep -cv '^\.')""", 900)
            ms, hwm, count = (int(x) for x in res.split()[-3:])
            self.check(f"round-{r}-complete", count == len(closure),
                       f"{count} of {len(closure)} store paths installed in {ms} ms")
            bench(self.args.arch, f"install-round-{r}",
                  f"{len(closure)} paths, NAR {nar / 2**20:.1f} MiB in {ms / 1000:.1f} s = "
                  f"{nar / 2**20 / (ms / 1000):.2f} MiB/s (emulated, TCG), peak VmHWM {hwm} KiB")
            times.append(ms)
        ms = sorted(times)[len(times) // 2]
        bench(self.args.arch, "install-median", f"{nar / 2**20 / (ms / 1000):.2f} MiB/s of NAR over {self.rounds} rounds"
              " (emulated, TCG)")


SCENARIOS = {c.name: c for c in (ReadyWatchdog, Deploy, HwWatchdog, KilledSwitch, UefiBoot, InstallBench)}
DEFAULT = ("ready-watchdog", "deploy", "hw-watchdog", "killed-switch", "uefi-boot")


def private_copy(src, dst):
    shutil.copy2(src, dst + ".tmp")
    os.replace(dst + ".tmp", dst)
    return dst


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", required=True)
    ap.add_argument("--bin", required=True, help="the nixless binary installed in the guest")
    ap.add_argument("--host-bin", help="the nixless binary the host runs (default: --bin)")
    ap.add_argument("--arch", default="x86_64", choices=("x86_64", "aarch64"), help="the guest's architecture")
    ap.add_argument("--units", default=os.path.join(REPO, "nixos", "units.json"))
    ap.add_argument("--work", default=os.path.join(REPO, "target", "debian-vm", "run"))
    ap.add_argument("--boot-timeout", type=int, default=300)
    ap.add_argument("--skip-unsupported", action="store_true",
                    help="leave out named scenarios not written for --arch (instead of an error)")
    ap.add_argument("scenarios", nargs="*")
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    # A private copy: cargo may rebuild the binary while we run.
    host_bin = args.host_bin or args.bin
    args.bin = private_copy(args.bin, os.path.join(args.work, "nixless"))
    args.host_bin = private_copy(host_bin, os.path.join(args.work, "nixless-host"))
    # SIGTERM (e.g. from `timeout`) unwinds through the scenarios' cleanup,
    # which stops qemu and nginx.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    names = args.scenarios or [n for n in DEFAULT if args.arch in SCENARIOS[n].arches]
    for n in names:
        if n not in SCENARIOS:
            ap.error(f"unknown scenario {n!r}; known: {', '.join(SCENARIOS)}")
        if args.arch not in SCENARIOS[n].arches and not args.skip_unsupported:
            ap.error(f"scenario {n!r} needs a {' or '.join(SCENARIOS[n].arches)} guest, not {args.arch}")
    names = [n for n in names if args.arch in SCENARIOS[n].arches]
    if not names:
        log(f"no scenario to run for {args.arch}")
        print("0 passed, 0 failed", flush=True)
        sys.exit(0)
    results = Results()
    t0 = time.time()
    for n in names:
        SCENARIOS[n](args, results).run()
    log(f"all scenarios done in {time.time() - t0:.0f} s")
    print(f"{results.passed} passed, {results.failed} failed", flush=True)
    sys.exit(1 if results.failed or not results.passed else 0)


if __name__ == "__main__":
    main()
