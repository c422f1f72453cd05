"""Host side of the Debian VM tests: boots the base image under qemu and
drives the guest through its backdoor (guest/backdoor.sh on /dev/hvc0).

    vm = VM(image_dir, work_dir, share_dir, fwd={18731: 8731})
    vm.start()                      # boots, waits for the backdoor
    out = vm.succeed("systemctl is-active nixless-agent")
    vm.wait_until_succeeds("curl -sf http://127.0.0.1:8731/v1/status", 60)
    vm.crash_expected(...)          # a command during which the guest resets
    vm.stop()

`arch` picks the guest: "x86_64" (q35, i6300esb hardware watchdog, UEFI
optional) or "aarch64" (`virt` machine, a Cortex-A57, console on the PL011
UART ttyAMA0, no hardware watchdog device); both run under TCG.

Every wait is bounded. qemu's serial console (kernel, systemd, journal) goes
to WORK/console.log; QMP events (WATCHDOG, RESET, SHUTDOWN) are recorded in
`vm.events`. The guest reaches nothing outside qemu: user-mode networking with
restrict=on, the host's files via a read-only 9p share mounted at
/mnt/vmtest, host ports only through explicit forwards.
"""

import base64
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import time


class VMError(Exception):
    pass


class Rebooted(VMError):
    """The guest came up again (new backdoor) while a command was running."""

    def __init__(self, boot_id):
        super().__init__(f"guest rebooted (new boot id {boot_id})")
        self.boot_id = boot_id


def log(msg):
    print(f"[vm {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# What differs between the guest architectures. The arm64 guest is the
# `virt` board: PCI (virtio-*-pci as on x86_64), a PL011 UART for -serial.
# Cortex-A57 rather than `max`: `max` emulates pointer authentication, which
# makes TCG several times slower, and the musl binary needs only ARMv8.0.
ARCHES = {
    "x86_64": {
        "qemu": "qemu-system-x86_64", "machine": "q35", "cpu": [],
        # The hardware watchdog; what it does when it fires:
        "watchdog": ["-device", "i6300esb", "-action", "watchdog=reset"],
    },
    "aarch64": {
        "qemu": "qemu-system-aarch64", "machine": "virt", "cpu": ["-cpu", "cortex-a57"],
        "watchdog": [],
    },
}


class VM:
    def __init__(self, image_dir, work_dir, share_dir, fwd=None, guestfwd=None,
                 memory=1024, accel="tcg", append_extra="", max_runtime=1200, uefi=None, arch="x86_64"):
        if arch not in ARCHES:
            raise VMError(f"unknown guest architecture {arch!r}; known: {', '.join(ARCHES)}")
        if uefi is not None and arch != "x86_64":
            raise VMError("UEFI boot is set up for x86_64 guests only (OVMF)")
        self.arch = arch
        self.image_dir = os.path.abspath(image_dir)
        self.work = os.path.abspath(work_dir)
        self.share = os.path.abspath(share_dir)
        self.fwd = fwd or {}  # host port -> guest port
        # guest port on 10.0.2.100 -> host 127.0.0.1 port (through tcpfwd.py)
        self.guestfwd = guestfwd or {}
        self.memory = memory
        self.accel = accel
        self.append_extra = append_extra
        self.max_runtime = max_runtime
        # UEFI boot instead of -kernel/-initrd: {"code": OVMF_CODE (read-only),
        # "vars": a writable OVMF_VARS copy (the EFI variables: kept across
        # the guest's reboots, which stay in this qemu process), "esp": a raw
        # disk image with a GPT and an EFI system partition (the second
        # virtio disk, /dev/vdb; the firmware boots its \EFI\BOOT\BOOTX64.EFI)}.
        # Debian's OVMF_CODE_4M.fd is built without SMM, so the machine has
        # none (SMM emulation only slows TCG down).
        self.uefi = uefi
        self.proc = None
        self.bd = None
        self.qmp = None
        self.buf = b""
        self.qbuf = b""
        self.events = []
        self.boot_id = None
        self.boots = 0
        self.frozen_once = False

    # ---- lifecycle --------------------------------------------------------
    def start(self, boot_timeout=300):
        os.makedirs(self.work, exist_ok=True)
        overlay = os.path.join(self.work, "overlay.qcow2")
        if os.path.exists(overlay):
            os.unlink(overlay)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                        os.path.join(self.image_dir, "disk.qcow2"), overlay], check=True)
        # A new machine: no console output from an earlier run (the log is
        # appended to across power cycles).
        console = os.path.join(self.work, "console.log")
        if os.path.exists(console):
            os.unlink(console)
        self._launch(overlay)
        self.wait_for_backdoor(boot_timeout)
        log(f"guest up after {time.time() - self.t_start:.1f} s (boot {self.boot_id})")

    def _launch(self, overlay):
        """Starts qemu on the disks as they are (the overlay, the ESP, the
        EFI variables) and connects to it; the guest then boots."""
        self.reset_at = None
        self.buf = self.qbuf = b""
        self.bd_path = os.path.join(self.work, "backdoor.sock")
        self.qmp_path = os.path.join(self.work, "qmp.sock")
        for p in (self.bd_path, self.qmp_path):
            if os.path.exists(p):
                os.unlink(p)
        with open(os.path.join(self.image_dir, "cmdline")) as f:
            cmdline = f.read().strip()
        if self.append_extra:
            cmdline += " " + self.append_extra
        net = "user,id=n0,restrict=on"
        for hp, gp in self.fwd.items():
            net += f",hostfwd=tcp:127.0.0.1:{hp}-:{gp}"
        fwd_script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tcpfwd.py")
        for gp, hp in self.guestfwd.items():
            net += f",guestfwd=tcp:10.0.2.100:{gp}-cmd:python3 {fwd_script} 127.0.0.1 {hp}"
        accel = "kvm" if self.accel == "kvm" else "tcg"
        cmd = [
            # A hard bound on the VM's life, whatever happens to this driver.
            "timeout", "-s", "KILL", str(self.max_runtime),
            *self._machine_args(accel), "-m", str(self.memory),
            "-smp", "1", "-no-user-config", "-nodefaults", "-display", "none",
            *self._boot_args(cmdline, overlay),
            # Appended to, not truncated: a power cycle (below) keeps what
            # the boots before it printed.
            "-chardev", "file,id=ser0,append=on,path=" + os.path.join(self.work, "console.log"),
            "-serial", "chardev:ser0",
            "-netdev", net, "-device", "virtio-net-pci,netdev=n0",
            "-device", "virtio-rng-pci",
            *ARCHES[self.arch]["watchdog"],
            "-virtfs", f"local,path={self.share},mount_tag=vmtest,security_model=none,readonly=on",
            "-device", "virtio-serial-pci",
            "-chardev", f"socket,id=bd,path={self.bd_path},server=on,wait=on",
            "-device", "virtconsole,chardev=bd",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
        ]
        with open(os.path.join(self.work, "qemu.cmd"), "w") as f:
            f.write(" ".join(cmd) + "\n")
        self.stderr = open(os.path.join(self.work, "qemu.stderr"), "wb")
        self.t_start = time.time()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self.stderr,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        # qemu waits (wait=on) for the backdoor connection before running.
        self.bd = self._connect(self.bd_path, 30)
        self.qmp = self._connect(self.qmp_path, 30)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.bd, selectors.EVENT_READ, "bd")
        self.sel.register(self.qmp, selectors.EVENT_READ, "qmp")
        self._qmp_send({"execute": "qmp_capabilities"})

    # OVMF under TCG sometimes never starts again after a warm reset (the
    # guest's reboot, or the watchdog's): not one byte on the serial
    # console, where it normally prints within seconds (a known class of
    # edk2 warm-reset hangs, e.g. tianocore/edk2#12441). A real board's
    # power button is what helps then; the harness presses it: qemu quits
    # (flushing the disks) and starts again on the same disks and EFI
    # variables, a cold boot. Logged, and recorded as a POWER_CYCLE event;
    # the firmware is never given a boot entry or a variable by it.
    FIRMWARE_SILENT_SECS = 150

    def _console_size(self):
        try:
            return os.path.getsize(os.path.join(self.work, "console.log"))
        except OSError:
            return 0

    def _firmware_stalled(self):
        if self.uefi is None or self.reset_at is None:
            return False
        t, size = self.reset_at
        return time.time() - t > self.FIRMWARE_SILENT_SECS and self._console_size() == size

    def _power_cycle(self):
        log(f"firmware silent for {self.FIRMWARE_SILENT_SECS} s after a reset (an OVMF warm-reset hang under "
            "TCG): power-cycling the VM (qemu quits, starts again on the same disks and EFI variables)")
        self.events.append((time.time(), "POWER_CYCLE", {}))
        try:
            self._qmp_send({"execute": "quit"})
            self.proc.wait(30)
        except Exception:
            pass
        self._cleanup()
        self._launch(os.path.join(self.work, "overlay.qcow2"))

    def _machine_args(self, accel):
        a = ARCHES[self.arch]
        machine = a["machine"] + f",accel={accel}" + (",smm=off" if self.uefi else "")
        return [a["qemu"], "-machine", machine, *a["cpu"]]

    def _boot_args(self, cmdline, overlay):
        root = ["-drive", f"file={overlay},if=virtio,format=qcow2,cache=unsafe"]
        if self.uefi is None:
            return ["-kernel", os.path.join(self.image_dir, "vmlinuz"),
                    "-initrd", os.path.join(self.image_dir, "initrd.img"),
                    "-append", cmdline, *root]
        # The kernel command line comes from the boot entry the loader picks.
        return ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={self.uefi['code']}",
                "-drive", f"if=pflash,format=raw,unit=1,file={self.uefi['vars']}",
                *root,
                "-drive", f"file={self.uefi['esp']},if=virtio,format=raw,cache=writethrough"]

    def _connect(self, path, timeout):
        deadline = time.time() + timeout
        while True:
            if self.proc.poll() is not None:
                raise VMError(f"qemu exited with {self.proc.returncode}: {self._stderr_tail()}")
            try:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(path)
                s.setblocking(False)
                return s
            except OSError:
                s.close()
                if time.time() > deadline:
                    raise VMError(f"no qemu socket {path} after {timeout} s")
                time.sleep(0.05)

    def _stderr_tail(self):
        try:
            with open(os.path.join(self.work, "qemu.stderr"), "rb") as f:
                return f.read()[-2000:].decode(errors="replace")
        except OSError:
            return ""

    def _qmp_send(self, obj):
        self.qmp.setblocking(True)
        self.qmp.sendall(json.dumps(obj).encode() + b"\n")
        self.qmp.setblocking(False)

    def _pump(self, timeout):
        """Reads whatever arrives within `timeout` seconds."""
        if self.proc.poll() is not None:
            raise VMError(f"qemu exited with {self.proc.returncode}")
        for key, _ in self.sel.select(timeout):
            try:
                data = key.fileobj.recv(1 << 16)
            except BlockingIOError:
                continue
            if not data:
                self.sel.unregister(key.fileobj)
                if key.data == "bd":
                    raise VMError("backdoor connection closed (qemu gone?)")
                continue
            if key.data == "bd":
                self.buf += data
            else:
                self.qbuf += data
                while b"\n" in self.qbuf:
                    line, self.qbuf = self.qbuf.split(b"\n", 1)
                    try:
                        msg = json.loads(line)
                    except ValueError:
                        continue
                    if "event" in msg:
                        self.events.append((time.time(), msg["event"], msg.get("data")))
                        if msg["event"] == "RESET":
                            self.reset_at = (time.time(), self._console_size())
                            # Harness self-test: freeze the vCPU after the
                            # first reset, as the firmware hang looks.
                            if os.environ.get("VMTEST_FREEZE_AFTER_RESET") == "1" and not self.frozen_once:
                                self.frozen_once = True
                                log("VMTEST_FREEZE_AFTER_RESET: stopping the vCPU (harness self-test)")
                                self._qmp_send({"execute": "stop"})
                        log(f"qemu event {msg['event']} {json.dumps(msg.get('data', {}))}")

    def _lines(self):
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            yield line.decode(errors="replace").strip("\r")

    def _next_message(self, deadline):
        """The next READY or RESULT line from the backdoor."""
        while True:
            for line in self._lines():
                if line.startswith("VMTEST-BACKDOOR-READY ") or line.startswith("VMTEST-RESULT "):
                    return line
            left = deadline - time.time()
            if left <= 0:
                return None
            if self._firmware_stalled():
                self._power_cycle()
            self._pump(min(left, 1.0))

    def wait_for_backdoor(self, timeout):
        line = self._next_message(time.time() + timeout)
        if line is None:
            raise VMError(f"no backdoor within {timeout} s; see {self.work}/console.log")
        if not line.startswith("VMTEST-BACKDOOR-READY "):
            raise VMError(f"unexpected backdoor line: {line[:200]}")
        self.boot_id = line.split(" ", 1)[1].strip()
        self.boots += 1
        return self.boot_id

    def stop(self, timeout=60):
        """Powers the guest off cleanly (then kills qemu if it lingers)."""
        if self.proc is None or self.proc.poll() is not None:
            return self._cleanup()
        try:
            self._send("systemctl poweroff --no-block", 30)
        except Exception:
            pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log("guest did not power off; killing qemu")
        self._cleanup()

    def kill(self):
        self._cleanup()

    def _cleanup(self):
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        for s in (self.bd, self.qmp):
            if s is not None:
                s.close()
        self.bd = self.qmp = None

    # ---- commands ---------------------------------------------------------
    def _send(self, script, timeout):
        payload = base64.b64encode(script.encode()).decode()
        self.bd.setblocking(True)
        self.bd.sendall(f"{int(timeout)} {payload}\n".encode())
        self.bd.setblocking(False)

    def execute(self, script, timeout=60):
        """Runs a bash script in the guest: (exit code, output). Raises
        Rebooted if the guest restarted meanwhile, VMError on no answer."""
        self._send(script, timeout)
        line = self._next_message(time.time() + timeout + 30)
        if line is None:
            raise VMError(f"no answer within {timeout + 30} s to: {script[:200]}")
        if line.startswith("VMTEST-BACKDOOR-READY "):
            self.boot_id = line.split(" ", 1)[1].strip()
            self.boots += 1
            raise Rebooted(self.boot_id)
        parts = line.split(" ", 2)
        rc = int(parts[1])
        out = base64.b64decode(parts[2]).decode(errors="replace") if len(parts) > 2 else ""
        return rc, out

    def succeed(self, script, timeout=60):
        rc, out = self.execute(script, timeout)
        if rc != 0:
            raise VMError(f"command failed (exit {rc}): {script[:300]}\n{out[-3000:]}")
        return out

    def fail(self, script, timeout=60):
        rc, out = self.execute(script, timeout)
        if rc == 0:
            raise VMError(f"command unexpectedly succeeded: {script[:300]}\n{out[-3000:]}")
        return out

    def wait_until_succeeds(self, script, timeout, interval=1.0):
        deadline = time.time() + timeout
        while True:
            rc, out = self.execute(script, max(5, int(deadline - time.time()) + 1))
            if rc == 0:
                return out
            if time.time() > deadline:
                raise VMError(f"still failing after {timeout} s (exit {rc}): {script[:300]}\n{out[-3000:]}")
            time.sleep(interval)

    def wait_for_reboot(self, timeout):
        """Waits for the backdoor of the next boot (e.g. after a watchdog reset)."""
        old = self.boot_id
        self.wait_for_backdoor(timeout)
        if self.boot_id == old:
            raise VMError("backdoor restarted but the boot id did not change")
        return self.boot_id

    def console(self):
        try:
            with open(os.path.join(self.work, "console.log"), "rb") as f:
                return f.read().decode(errors="replace")
        except OSError:
            return ""


def find_free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def have(cmd):
    return shutil.which(cmd) is not None
