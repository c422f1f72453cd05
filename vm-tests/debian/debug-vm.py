#!/usr/bin/env python3
"""Keeps a test VM running for poking at by hand (development aid).

    debug-vm.py start IMAGE_DIR SHARE_DIR WORK_DIR [HOSTPORT]   # boots, then serves (background it)
    debug-vm.py run WORK_DIR 'shell script' [TIMEOUT]           # runs it in the guest
    debug-vm.py stop WORK_DIR

The guest sees SHARE_DIR at /mnt/vmtest; HOSTPORT (default 18731) forwards
to the guest's 8731; the console log is WORK_DIR/console.log.
VMTEST_ARCH=aarch64 boots an arm64 image (build-image.sh with the same
variable) instead of an x86_64 one.
"""
import json
import os
import socket
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vm import VM  # noqa: E402


def serve(image, share, work, port):
    vm = VM(image, work, share, fwd={port: 8731}, arch=os.environ.get("VMTEST_ARCH", "x86_64"))
    vm.start()
    ctl = os.path.join(work, "ctl.sock")
    if os.path.exists(ctl):
        os.unlink(ctl)
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(ctl)
    srv.listen(1)
    print("ready", flush=True)
    try:
        while True:
            c, _ = srv.accept()
            req = json.loads(c.makefile().readline())
            if req.get("stop"):
                c.close()
                break
            try:
                rc, out = vm.execute(req["script"], req.get("timeout", 60))
            except Exception as e:
                rc, out = -1, f"driver: {type(e).__name__}: {e}"
            c.sendall(json.dumps({"rc": rc, "out": out}).encode() + b"\n")
            c.close()
    finally:
        vm.stop(30)


def call(work, req):
    c = socket.socket(socket.AF_UNIX)
    c.connect(os.path.join(work, "ctl.sock"))
    c.sendall(json.dumps(req).encode() + b"\n")
    return c.makefile().readline()


def main():
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    if cmd == "start" and len(sys.argv) >= 5:
        serve(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]) if len(sys.argv) > 5 else 18731)
    elif cmd == "run" and len(sys.argv) >= 4:
        resp = json.loads(call(sys.argv[2], {"script": sys.argv[3],
                                             "timeout": int(sys.argv[4]) if len(sys.argv) > 4 else 60}))
        sys.stdout.write(resp["out"])
        sys.exit(resp["rc"] if 0 <= resp["rc"] < 256 else 1)
    elif cmd == "stop" and len(sys.argv) >= 3:
        call(sys.argv[2], {"stop": True})
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
