"""qemu guestfwd helper: connects stdin/stdout (one guest connection) to
HOST:PORT on the host. Used as
  guestfwd=tcp:10.0.2.100:GPORT-cmd:python3 tcpfwd.py 127.0.0.1 HPORT
so that a guest under restrict=on user networking reaches exactly one host
service (e.g. nginx serving a binary cache) and nothing else."""
import os
import select
import socket
import sys

host, port = sys.argv[1], int(sys.argv[2])
s = socket.create_connection((host, port), timeout=10)
s.settimeout(None)
fin, fout = sys.stdin.fileno(), sys.stdout.fileno()
open_in = True
while True:
    fds = [s] + ([fin] if open_in else [])
    r, _, _ = select.select(fds, [], [], 300)
    if not r:
        break  # idle for 5 minutes
    if fin in r:
        data = os.read(fin, 65536)
        if not data:
            open_in = False
            s.shutdown(socket.SHUT_WR)
        else:
            s.sendall(data)
    if s in r:
        data = s.recv(65536)
        if not data:
            break
        view = memoryview(data)
        while view:
            n = os.write(fout, view)
            view = view[n:]
