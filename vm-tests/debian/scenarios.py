#!/usr/bin/env python3
"""The Debian VM scenarios: nixless under a real systemd, driven from the host.

    scenarios.py --image DIR --bin NIXLESS [--units nixos/units.json]
                 [--work DIR] [SCENARIO ...]

Scenarios (default: all, in this order):
  ready-watchdog  Type=notify READY, the host reaches /v1/status through a
                  port forward, the service watchdog restarts a frozen agent
  deploy          a signed deploy from the host through nixless-switch.path /
                  nixless-switch.service; the switch restarts the agent (its
                  self-update); the deploy ends committed
  hw-watchdog     a system that hangs the machine while it is being verified:
                  the hardware watchdog resets the VM, the previous generation
                  boots, the agent records the update as failed
  killed-switch   a switch that records its units in /run/nixos/*-list and
                  hangs: killed at the switch timeout, its lists removed, the
                  rollback sees none and the deploy ends rolled-back

Each check prints `VMTEST:<scenario>:<check>:PASS|FAIL:<detail>`; the last
line is `N passed, N failed`. The exit status is non-zero if any check failed.
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


class Scenario:
    """One scenario: a work dir, a share for the guest, a VM, checks."""

    name = ""
    needs_cache = False

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
        p = subprocess.run([self.args.bin, *argv], capture_output=True, text=True, timeout=timeout)
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
                     fwd={self.host_port: GUEST_PORT}, guestfwd={80: self.cache_port})
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
                echo "--- seccomp kills (audit type=1326; syscall numbers are x86_64):"
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
    watchdog_sec = 10

    def body(self):
        self.prepare_share(self.agent_config(), etc={
            "systemd/system/nixless-agent.service.d/vmtest.conf":
                f"[Service]\nWatchdogSec={self.watchdog_sec}s\n",
        })
        self.boot()
        self.install()
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


class Deploy(Scenario):
    """b. A signed deploy through the oneshot switch unit; the switch
    restarts the agent (self-update); the deploy ends committed."""

    name = "deploy"

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

        seq = int(time.time())
        t = time.time()
        p = self.nixless("deploy", "--key", os.path.join(KEYS, "deploy.sec"), "--host", "vmtest",
                         "--system", gen2, "--seq", str(seq), "--agent", f"http://127.0.0.1:{self.host_port}",
                         "--timeout", "300", timeout=360)
        self.check("deploy-committed", p.returncode == 0 and "committed" in p.stderr,
                   f"{time.time() - t:.0f} s: {p.stderr.strip()[-300:]}")

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


SCENARIOS = {c.name: c for c in (ReadyWatchdog, Deploy, HwWatchdog, KilledSwitch)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", required=True)
    ap.add_argument("--bin", required=True)
    ap.add_argument("--units", default=os.path.join(REPO, "nixos", "units.json"))
    ap.add_argument("--work", default=os.path.join(REPO, "target", "debian-vm", "run"))
    ap.add_argument("--boot-timeout", type=int, default=300)
    ap.add_argument("scenarios", nargs="*")
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    # A private copy: cargo may rebuild the binary while we run.
    bin_copy = os.path.join(args.work, "nixless")
    shutil.copy2(args.bin, bin_copy + ".tmp")
    os.replace(bin_copy + ".tmp", bin_copy)
    args.bin = bin_copy
    # SIGTERM (e.g. from `timeout`) unwinds through the scenarios' cleanup,
    # which stops qemu and nginx.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    names = args.scenarios or list(SCENARIOS)
    for n in names:
        if n not in SCENARIOS:
            ap.error(f"unknown scenario {n!r}; known: {', '.join(SCENARIOS)}")
    results = Results()
    t0 = time.time()
    for n in names:
        SCENARIOS[n](args, results).run()
    log(f"all scenarios done in {time.time() - t0:.0f} s")
    print(f"{results.passed} passed, {results.failed} failed", flush=True)
    sys.exit(1 if results.failed or not results.passed else 0)


if __name__ == "__main__":
    main()
