#!/usr/bin/env python3
"""Checks that bench/delay-proxy.py models the link it claims to.

    bench/delay-proxy-check.py        # ~15 s; exit 1 naming the first check that fails

Starts a small HTTP/1.1 keep-alive server on loopback ("GET /N" answers N
bytes), puts the proxy in front of it and measures, with tolerances wide
enough for a loaded machine (the proxy only ever adds delay, so the lower
bounds are tight and the upper ones loose):

- a fresh connection's first response byte arrives after 2 RTT (handshake +
  request), a keep-alive request's after 1 RTT;
- one connection's 1 MB through a 8 Mbit/s cap takes about 1 s once its window
  is open, and is slower on a fresh connection (slow start);
- two connections at once share the cap: 2 × 1 MB take about 2 s, not 1 s;
- a connection beyond --max-conns is refused.
"""

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RTT = 0.2
MBIT = 8.0
RATE = MBIT * 1e6 / 8


def server():
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", 0))
    ls.listen(64)

    def serve(c):
        buf = b""
        with c:
            while True:
                while b"\r\n\r\n" not in buf:
                    d = c.recv(65536)
                    if not d:
                        return
                    buf += d
                head, buf = buf.split(b"\r\n\r\n", 1)
                n = int(head.split(b" ")[1].lstrip(b"/"))
                c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % n + b"x" * n)

    def accept():
        while True:
            c, _ = ls.accept()
            threading.Thread(target=serve, args=(c,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return ls.getsockname()[1]


def get(s, n):
    """Sends GET /n on s; returns (seconds to the first byte, seconds to the last)."""
    t0 = time.monotonic()
    s.sendall(b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % n)
    buf, first = b"", None
    while b"\r\n\r\n" not in buf:
        d = s.recv(65536)
        if not d:
            raise AssertionError("connection closed before the response head")
        first = first or time.monotonic() - t0
        buf += d
    body = len(buf.split(b"\r\n\r\n", 1)[1])
    while body < n:
        d = s.recv(1 << 20)
        if not d:
            raise AssertionError("connection closed after %d of %d bytes" % (body, n))
        body += len(d)
    return first, time.monotonic() - t0


def connect(port):
    t0 = time.monotonic()
    s = socket.create_connection(("127.0.0.1", port))
    return s, t0


def check(name, value, lo, hi):
    ok = lo <= value <= hi
    print("%-58s %6.3f s  (%.3f..%.3f) %s" % (name, value, lo, hi, "ok" if ok else "FAIL"))
    if not ok:
        sys.exit(1)


def main():
    up = server()
    with tempfile.TemporaryDirectory() as tmp:
        pf = os.path.join(tmp, "port")
        proxy = subprocess.Popen([sys.executable, os.path.join(HERE, "delay-proxy.py"), "--upstream-port", str(up),
                                  "--rtt-ms", str(RTT * 1000), "--mbit", str(MBIT), "--port-file", pf,
                                  "--max-conns", "3", "--max-seconds", "120", "--parent-pid", str(os.getpid())])
        try:
            for _ in range(100):
                if os.path.exists(pf):
                    break
                time.sleep(0.05)
            port = int(open(pf).read())

            s, t0 = connect(port)
            s.sendall(b"GET /10 HTTP/1.1\r\nHost: x\r\n\r\n")
            s.recv(100)
            check("fresh connection: first byte (2 RTT)", time.monotonic() - t0, 2 * RTT, 2 * RTT + 0.15)
            first, _ = get(s, 10)
            check("keep-alive request: first byte (1 RTT)", first, RTT, RTT + 0.1)
            _, cold = get(s, 1_000_000)
            _, warm = get(s, 1_000_000)
            # 1 MB at 1 MB/s + 1 RTT; cold also pays slow start (10 segments, x2 per RTT).
            check("1 MB, window open: RTT + 1 MB / cap", warm, RTT + 1e6 / RATE, RTT + 1e6 / RATE + 0.4)
            check("1 MB, same connection, first time (slow start)", cold, warm + 0.1, warm + 8 * RTT)
            s.close()

            a, _ = connect(port)
            b, _ = connect(port)
            for c in (a, b):
                get(c, 1_000_000)  # open both windows
            res = {}

            def one(c, k):
                res[k] = get(c, 1_000_000)[1]

            ts = [threading.Thread(target=one, args=(c, k)) for k, c in enumerate((a, b))]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            check("2 connections x 1 MB at once share the cap", max(res.values()), RTT + 2e6 / RATE - 0.1,
                  RTT + 2e6 / RATE + 0.6)

            c, _ = connect(port)  # the third
            d, _ = connect(port)  # one too many: closed at once
            d.settimeout(5)
            check("beyond --max-conns: closed (seconds to EOF)",
                  (lambda t: (d.recv(1), time.monotonic() - t)[1])(time.monotonic()), 0, 0.5)
            for x in (a, b, c, d):
                x.close()
        finally:
            proxy.terminate()
            proxy.wait(10)
    print("delay-proxy: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
