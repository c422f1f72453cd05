#!/usr/bin/env python3
"""A user-space slow link between loopback clients and one loopback server.

    bench/delay-proxy.py --upstream-port 8080 --rtt-ms 100 --mbit 20 \
        --port-file P --stats S --max-seconds 900 [--parent-pid PID]

Listens on 127.0.0.1 (an ephemeral port, written to --port-file once it
listens) and forwards every connection to 127.0.0.1:--upstream-port through a
model of one shared access link (`tc netem` is not available here):

- Latency: every byte reaches the other side RTT/2 after it leaves the link.
  The TCP handshake costs a round trip as on a real link: the upstream
  connect is made RTT/2 after the accept, and no client byte reaches the
  server before accept + RTT + RTT/2 (SYN, SYN-ACK, then the first data).
- Bandwidth: one FIFO bottleneck per direction, shared by ALL connections
  (--mbit down, --up-mbit up, default the same; 0 = no cap). A chunk leaves
  the link at max(now, when the link is free) + len / rate. The bottleneck
  buffer holds at most --queue-ms of data; a sender that would overflow it
  waits (no loss is modelled, as with a delay-based congestion control).
- TCP windows: each direction of each connection starts with a 10-segment
  window (14600 bytes) that grows by the bytes acknowledged (slow start: it
  doubles every round trip, up to --max-window) and falls back to 10
  segments after an idle RTO (RTT + 200 ms, Linux's tcp_slow_start_after_idle).
  An acknowledgement comes back RTT/2 after its bytes were delivered; a
  reader that stops reading stops the acknowledgements, so flow control holds
  end to end. So a fresh connection needs several round trips to fill a
  link, as on a real one.

Not modelled: loss, retransmits, reordering, congestion avoidance after loss.

Counts per period (since the previous SIGUSR1, or since start): connections
accepted, the most open at once, client→server and server→client bytes, and
HTTP requests (request heads, i.e. CRLFCRLF in the client→server stream; the
clients here send no bodies). SIGUSR1 writes them as one JSON line to --stats
(atomically, with a sequence number) and starts a new period.

Bounded: only 127.0.0.1 on both sides; at most --max-conns connections at
once (more are refused); exits after --max-seconds, or as soon as
--parent-pid is gone, or on SIGTERM/SIGINT.
"""

import argparse
import asyncio
import collections
import json
import os
import signal
import socket
import sys
import time

MSS = 1460
IW = 10 * MSS
CHUNK = 64 * 1024


class Link:
    """One direction of the shared access link: a FIFO bottleneck."""

    def __init__(self, bytes_per_s, queue_s):
        self.rate = bytes_per_s  # None: no cap
        self.queue_s = queue_s
        self.free_at = 0.0  # when the last queued byte has left the link

    def backlog_wait(self, now):
        """Seconds to wait before the bottleneck buffer has room."""
        if self.rate is None:
            return 0.0
        return max(0.0, self.free_at - now - self.queue_s)

    def room(self, now):
        """Bytes the bottleneck buffer can still take (at least one segment)."""
        if self.rate is None:
            return CHUNK
        return max(MSS, int((self.queue_s - max(0.0, self.free_at - now)) * self.rate))

    def depart(self, now, n):
        if self.rate is None:
            return now
        self.free_at = max(now, self.free_at) + n / self.rate
        return self.free_at


class Stats:
    def __init__(self):
        self.seq = 0
        self.active = 0
        self.reset()

    def reset(self):
        self.conns = 0
        self.peak = self.active
        self.up = 0
        self.down = 0
        self.requests = 0
        self.refused = 0
        self.started = time.monotonic()

    def snapshot(self):
        self.seq += 1
        s = {
            "seq": self.seq,
            "seconds": round(time.monotonic() - self.started, 3),
            "connections": self.conns,
            "peak_open": self.peak,
            "bytes_up": self.up,
            "bytes_down": self.down,
            "requests": self.requests,
            "refused": self.refused,
            "open_now": self.active,
        }
        self.reset()
        return s


class Pipe:
    """One direction of one proxied connection."""

    def __init__(self, proxy, link, reader, writer, not_before, upstream):
        self.p = proxy
        self.link = link
        self.reader = reader
        self.writer = writer
        self.not_before = not_before  # no byte arrives before this (handshake)
        self.upstream = upstream  # client→server: count requests
        self.cwnd = IW
        self.inflight = 0
        self.last_send = time.monotonic()
        self.acked = asyncio.Event()
        self.queue = collections.deque()
        self.queued = asyncio.Event()
        self.tail = b""

    async def pump(self):
        """Read from the source as the window and the link allow."""
        loop = asyncio.get_running_loop()
        half = self.p.rtt / 2
        while True:
            now = loop.time()
            if self.inflight == 0 and now - self.last_send > self.p.rtt + 0.2:
                self.cwnd = min(self.cwnd, IW)
            room = min(self.cwnd, self.p.max_window) - self.inflight
            if room <= 0:
                self.acked.clear()
                await self.acked.wait()
                continue
            wait = self.link.backlog_wait(now)
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            # Small reads while the buffer is nearly full, so that the
            # connections waiting on it cannot overfill it together.
            data = await self.reader.read(min(room, CHUNK, self.link.room(now)))
            now = loop.time()
            if not data:
                self.queue.append((max(now + half, self.not_before), None))
                self.queued.set()
                return
            self.count(data)
            at = max(self.link.depart(now, len(data)) + half, self.not_before)
            self.inflight += len(data)
            self.last_send = now
            self.queue.append((at, data))
            self.queued.set()

    def count(self, data):
        if self.upstream:
            self.p.stats.up += len(data)
            joined = self.tail + data
            self.p.stats.requests += joined.count(b"\r\n\r\n")
            self.tail = joined[-3:]
        else:
            self.p.stats.down += len(data)

    async def deliver(self):
        """Write each chunk to the destination when it arrives there."""
        loop = asyncio.get_running_loop()
        while True:
            while not self.queue:
                self.queued.clear()
                await self.queued.wait()
            at, data = self.queue[0]
            delay = at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if data is None:
                self.queue.popleft()
                if self.writer.can_write_eof():
                    self.writer.write_eof()
                return
            self.writer.write(data)
            await self.writer.drain()
            self.queue.popleft()
            loop.call_later(self.p.rtt / 2, self.ack, len(data))

    def ack(self, n):
        self.inflight -= n
        self.cwnd += n
        self.acked.set()


class Proxy:
    def __init__(self, args):
        self.args = args
        self.rtt = args.rtt_ms / 1000.0
        self.max_window = args.max_window
        down = args.mbit * 1e6 / 8 if args.mbit > 0 else None
        up_mbit = args.mbit if args.up_mbit is None else args.up_mbit
        up = up_mbit * 1e6 / 8 if up_mbit > 0 else None
        self.down = Link(down, args.queue_ms / 1000.0)
        self.up = Link(up, args.queue_ms / 1000.0)
        self.stats = Stats()

    async def handle(self, creader, cwriter):
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        st = self.stats
        if st.active >= self.args.max_conns:
            st.refused += 1
            cwriter.close()
            return
        st.active += 1
        st.conns += 1
        st.peak = max(st.peak, st.active)
        swriter = None
        try:
            await asyncio.sleep(self.rtt / 2)  # the SYN reaching the server
            sreader, swriter = await asyncio.open_connection("127.0.0.1", self.args.upstream_port)
            c2s = Pipe(self, self.up, creader, swriter, t0 + 1.5 * self.rtt, True)
            s2c = Pipe(self, self.down, sreader, cwriter, t0, False)
            tasks = [asyncio.ensure_future(x) for x in (c2s.pump(), c2s.deliver(), s2c.pump(), s2c.deliver())]
            try:
                # Until both directions delivered their EOF, or one side failed.
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
                for t in done:
                    t.result()
            finally:
                for t in tasks:
                    t.cancel()
        except (OSError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            # Shutdown with the connection still open: nothing to report.
            pass
        finally:
            st.active -= 1
            for w in (cwriter, swriter):
                if w is not None:
                    w.close()

    def write_stats(self):
        path = self.args.stats
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(json.dumps(self.stats.snapshot()) + "\n")
        os.replace(tmp, path)

    async def run(self):
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if self.args.stats:
            loop.add_signal_handler(signal.SIGUSR1, self.write_stats)
        server = await asyncio.start_server(self.handle, "127.0.0.1", 0, backlog=128)
        port = server.sockets[0].getsockname()[1]
        tmp = self.args.port_file + ".tmp"
        with open(tmp, "w") as f:
            f.write("%d\n" % port)
        os.replace(tmp, self.args.port_file)
        deadline = loop.time() + self.args.max_seconds
        while not stop.is_set() and loop.time() < deadline:
            if self.args.parent_pid and not alive(self.args.parent_pid):
                break
            try:
                await asyncio.wait_for(stop.wait(), timeout=min(1.0, max(0.0, deadline - loop.time())))
            except asyncio.TimeoutError:
                pass
        server.close()


def alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def parse():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--upstream-port", type=int, required=True)
    ap.add_argument("--rtt-ms", type=float, default=0.0)
    ap.add_argument("--mbit", type=float, default=0.0, help="downstream cap, Mbit/s (0: none)")
    ap.add_argument("--up-mbit", type=float, default=None, help="upstream cap (default: --mbit)")
    ap.add_argument("--queue-ms", type=float, default=100.0, help="bottleneck buffer, in ms of data")
    ap.add_argument("--max-window", type=int, default=4 << 20, help="largest TCP window, bytes")
    ap.add_argument("--max-conns", type=int, default=256)
    ap.add_argument("--max-seconds", type=float, default=1800.0)
    ap.add_argument("--parent-pid", type=int, default=0)
    ap.add_argument("--port-file", required=True)
    ap.add_argument("--stats", default="")
    a = ap.parse_args()
    checks = [
        (1 <= a.upstream_port <= 65535, "--upstream-port must be 1..65535"),
        (0 <= a.rtt_ms <= 10000, "--rtt-ms must be 0..10000"),
        (0 <= a.mbit <= 100000, "--mbit must be 0..100000"),
        (a.up_mbit is None or 0 <= a.up_mbit <= 100000, "--up-mbit must be 0..100000"),
        (1 <= a.queue_ms <= 10000, "--queue-ms must be 1..10000"),
        (IW <= a.max_window <= 1 << 30, "--max-window must be %d..2^30" % IW),
        (1 <= a.max_conns <= 4096, "--max-conns must be 1..4096"),
        (0 < a.max_seconds <= 86400, "--max-seconds must be in (0, 86400]"),
    ]
    for ok, msg in checks:
        if not ok:
            ap.error(msg)
    return a


def main():
    args = parse()
    try:
        asyncio.run(Proxy(args).run())
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
