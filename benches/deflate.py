#!/usr/bin/env python3
"""The permessage-deflate rows of hop's benchmark (issue 14; rows 15 and 16 of
benches/compare.sh), run against the release demo server's `/ws` (a hop::ws echo), server pinned
to CPU 0 with one poller or worker, the client on CPU 1.

    cargo build --release --example server && python3 benches/deflate.py [--quick] [--runs N]
                                                                         [--only A|B|AB]

Row A, a JSON event stream (three kinds of event, 208 bytes on average, the same every run), for
each server setting (the demo's `--ws-deflate*` flags):
- wire: the bytes the server sends (frame headers included) per payload byte, the stream echoed
  one message at a time over one connection, and over ten connections taken in turn. The client
  is Python `websockets`, offering permessage-deflate with `client_max_window_bits`;
- CPU: the server's CPU time (/proc/PID/stat, user + system) per echoed message, with one
  connection sending bursts of 50, and with 50 connections sending one message each in turn
  (hand-made frames, compressed message by message as hop asks of clients).
The reference for the ratio is a Python `websockets` server with full context takeover (15-bit
windows kept each way for the connection's life, level 6).

Row B, idle compressed WebSockets: 10,000 connections (from 127.0.0.2-251, in this process), each
sends one compressed JSON message and reads its echo, then stays open. The server's RSS growth
per connection is taken once they are all open (each holds its compression history), and again
12 s later, after `history_idle` (10 s by default) released it; uncompressed WebSockets are the
baseline. Reactor and tokio backends.

Prints markdown tables on stdout, progress on stderr. Needs python3 with `websockets`, taskset.
"""

import argparse
import asyncio
import json
import os
import random
import resource
import socket
import statistics
import struct
import sys
import threading
import time
import zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare import LOAD_CPU, HZ, SERVER, Server, cpu_ticks, log  # noqa: E402


def messages(n):
    """A JSON event stream: trades, chat messages and order-book snapshots, in turn."""
    rnd = random.Random(7)
    syms = ["BTC-USD", "ETH-USD", "SOL-USD", "ADA-USD", "DOGE-USD", "XRP-USD"]
    users = ["alice", "bob", "carol", "dave", "erin", "frank", "grace"]
    out = []
    for i in range(n):
        k = i % 3
        if k == 0:
            m = {"type": "trade", "symbol": rnd.choice(syms),
                 "price": f"{rnd.uniform(10, 50000):.2f}", "size": f"{rnd.uniform(0, 5):.4f}",
                 "side": rnd.choice(["buy", "sell"]),
                 "time": f"2026-11-29T14:{i // 60 % 60:02d}:{i % 60:02d}."
                         f"{rnd.randint(0, 999999):06d}Z",
                 "trade_id": 100000000 + i}
        elif k == 1:
            m = {"type": "chat", "room": "general",
                 "user": {"id": rnd.randint(1, 9999), "name": rnd.choice(users),
                          "roles": ["member"]},
                 "text": "message number %d about %s" % (i, rnd.choice(syms)),
                 "sent_at": 1764427000 + i}
        else:
            book = lambda: [[f"{rnd.uniform(10, 50000):.2f}", f"{rnd.uniform(0, 5):.4f}"]
                            for _ in range(5)]
            m = {"type": "book", "symbol": rnd.choice(syms), "bids": book(), "asks": book(),
                 "seq": i}
        out.append(json.dumps(m))
    return out


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def hop_server(backend, *flags):
    return Server(SERVER, backend, extra=flags)


PY_SERVER = r"""
import asyncio, sys
from websockets.asyncio.server import serve
from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory

async def echo(ws):
    async for m in ws:
        await ws.send(m)

async def main():
    f = ServerPerMessageDeflateFactory(server_max_window_bits=15, client_max_window_bits=15,
                                       compress_settings={"level": 6})
    async with serve(echo, "127.0.0.1", int(sys.argv[1]), extensions=[f], compression=None,
                     max_size=None):
        await asyncio.Future()

asyncio.run(main())
"""


def python_server():
    return Server(None, None, argv=lambda addr: [sys.executable, "-c", PY_SERVER,
                                                 addr.rsplit(":", 1)[1]])


class Counting(socket.socket):
    """A client socket that counts what it receives: the server's bytes on the wire."""
    received = 0

    def recv(self, n, *a):
        d = super().recv(n, *a)
        self.received += len(d)
        return d


def stream_run(port, msgs, conns):
    """Echoes `msgs` over each of `conns` WebSockets, one message at a time, taking the
    connections in turn: (wire bytes from the server after the handshakes, payload bytes,
    negotiated extension)."""
    from contextlib import ExitStack
    from websockets.sync.client import connect
    socks, wss = [], []
    with ExitStack() as stack:
        for _ in range(conns):
            sock = Counting(socket.AF_INET, socket.SOCK_STREAM)
            sock.connect(("127.0.0.1", port))
            wss.append(stack.enter_context(connect(f"ws://127.0.0.1:{port}/ws", sock=sock,
                                                   max_size=None, open_timeout=20)))
            socks.append(sock)
        ext = wss[0].response.headers.get("Sec-WebSocket-Extensions", "")
        start = [s.received for s in socks]
        for m in msgs:
            for ws in wss:
                ws.send(m)
            for ws in wss:
                assert ws.recv(timeout=20) == m
        wire = sum(s.received - b for s, b in zip(socks, start))
    return wire, sum(len(m) for m in msgs) * conns, ext


def ws_open_raw(port, deflate):
    s = socket.create_connection(("127.0.0.1", port))
    ext = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n" \
        if deflate else ""
    s.sendall((f"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
               f"{ext}\r\n").encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += s.recv(65536)
    head, buf = buf.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 101") and (b"permessage-deflate" in head) == deflate, head
    assert not buf
    return s


def read_frames(s, buf, want, deflate):
    """Reads `want` server frames from `s` (after `buf`): what is left over."""
    got = 0
    while got < want:
        if len(buf) >= 2:
            n, off = buf[1] & 0x7F, 2
            if n == 126:
                n, off = (struct.unpack(">H", buf[2:4])[0], 4) if len(buf) >= 4 else (None, 4)
            if n is not None and len(buf) >= off + n:
                assert bool(buf[0] & 0x40) == deflate or n < 32
                buf = buf[off + n:]
                got += 1
                continue
        buf += s.recv(1 << 20)
    return buf


def burst_run(port, frames, pid, deflate, total, conns, per_conn):
    """Echoes pre-built client `frames` (cycled) until `total` messages: each round sends
    `per_conn` frames in one write to each of `conns` connections, then reads their echoes.
    (messages, server CPU ticks)."""
    socks = [ws_open_raw(port, deflate) for _ in range(conns)]
    bufs = [b""] * conns
    t0 = cpu_ticks(pid)
    done, i = 0, 0
    while done < total:
        for s in socks:
            batch = [frames[(i + k) % len(frames)] for k in range(per_conn)]
            i += per_conn
            s.sendall(b"".join(batch))
        for k, s in enumerate(socks):
            bufs[k] = read_frames(s, bufs[k], per_conn, deflate)
        done += conns * per_conn
    t1 = cpu_ticks(pid)
    for s in socks:
        s.close()
    return done, t1 - t0


def client_frames(msgs, deflate):
    return [client_frame(compress(m.encode()) if deflate else m.encode(), deflate) for m in msgs]


def row_a(runs, n):
    msgs = messages(n)
    settings = [
        ("hop reactor, uncompressed (`--ws-deflate off`)", "hop", "reactor", ["--ws-deflate", "off"]),
        ("hop reactor, defaults (level 6, 4 KiB history)", "hop", "reactor", []),
        ("hop tokio backend, defaults", "hop", "tokio", []),
        ("hop reactor, no history (`--ws-deflate-history 0`)", "hop", "reactor",
         ["--ws-deflate-history", "0"]),
        ("hop reactor, 1 KiB history", "hop", "reactor", ["--ws-deflate-history", "1024"]),
        ("hop reactor, 32 KiB history (the whole window)", "hop", "reactor",
         ["--ws-deflate-history", "32768"]),
        ("hop reactor, level 1, 4 KiB history", "hop", "reactor", ["--ws-deflate-level", "1"]),
        ("Python websockets, full context takeover (reference)", "py", None, []),
    ]
    cols = ["r1", "r10", "c1", "c50"]
    res = {name: {c: [] for c in cols} | {"ext": ""} for name, *_ in settings}
    frames = {d: client_frames(msgs, d) for d in (False, True)}
    total = n * 20
    for r in range(runs):
        for name, kind, backend, flags in settings:
            srv = hop_server(backend, *flags) if kind == "hop" else python_server()
            try:
                wire, payload, ext = stream_run(srv.port, msgs, 1)
                res[name]["r1"].append(wire / payload)
                wire, payload, _ = stream_run(srv.port, msgs[: n // 5], 10)
                res[name]["r10"].append(wire / payload)
                res[name]["ext"] = ext
                if kind == "hop":
                    deflate = "off" not in flags
                    for col, conns, per in (("c1", 1, 50), ("c50", 50, 1)):
                        burst_run(srv.port, frames[deflate], srv.pid, deflate, total // 10,
                                  conns, per)  # warm-up
                        done, ticks = burst_run(srv.port, frames[deflate], srv.pid, deflate,
                                                total, conns, per)
                        res[name][col].append(ticks / HZ * 1e6 / done)
            finally:
                srv.stop()
            log(f"A run {r + 1} {name}: " + ", ".join(
                f"{c} {res[name][c][-1]:.3f}" for c in cols if res[name][c]) + f" {ext!r}")
    med = lambda name, c: statistics.median(res[name][c]) if res[name][c] else None
    ref = settings[-1][0]
    plain = settings[0][0]
    avg = sum(len(m) for m in msgs) / len(msgs)
    print(f"\n#### A. A JSON stream ({n:,} messages, {avg:.0f} B on average), echoed (median of "
          f"{runs})\n")
    print("Wire: bytes the server sent (frame headers included) per payload byte, the stream "
          f"echoed one message at a time over 1 connection, and ({n // 5:,} messages) over 10 "
          "connections taken in turn. CPU: server CPU µs per echoed message, "
          f"{total:,} messages, 1 connection sent bursts of 50, or 50 connections sent one "
          "message each in turn.\n")
    print("| server setting | wire/payload, 1 conn | vs full takeover | wire/payload, 10 conns "
          "in turn | vs full takeover | CPU µs/msg, 1 conn | CPU µs/msg, 50 conns in turn "
          "| extension answered |")
    print("|---|---|---|---|---|---|---|---|")
    for name, kind, *_ in settings:
        cells = []
        for c in ("r1", "r10"):
            v = med(name, c)
            cells += [f"{v:.3f}", f"{v / med(ref, c):.3f}×"]
        for c in ("c1", "c50"):
            v = med(name, c)
            cells.append("(Python)" if v is None else
                         f"{v:.2f} ({v / max(med(plain, c), 1e-9):.1f}×)")
        print(f"| {name} | " + " | ".join(cells) + f" | `{res[name]['ext'] or '-'}` |")
    return res


def mask(payload):
    key = os.urandom(4)
    return key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def client_frame(payload, rsv1):
    head = bytes([0x81 | (0x40 if rsv1 else 0)])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    else:
        head += bytes([0x80 | 126]) + struct.pack(">H", n)
    return head + mask(payload)


def compress(data):
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    z = c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH)
    assert z.endswith(b"\x00\x00\xff\xff")
    return z[:-4]


async def open_one(i, port, deflate, msg, held, errors):
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port,
                                             local_addr=(f"127.0.0.{2 + i % 250}", 0))
        ext = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n" \
            if deflate else ""
        w.write((f"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                 f"{ext}\r\n").encode())
        head = await r.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        assert (b"permessage-deflate" in head.lower()) == deflate, head
        w.write(client_frame(compress(msg) if deflate else msg, deflate))
        h = await r.readexactly(2)
        n = h[1] & 0x7F
        if n == 126:
            n = struct.unpack(">H", await r.readexactly(2))[0]
        await r.readexactly(n)
        assert bool(h[0] & 0x40) == deflate
        held.append(w)
    except Exception as e:  # noqa: BLE001 - counted and reported
        errors.append(repr(e))


async def open_idle(port, n, deflate, msg):
    held, errors = [], []
    sem = asyncio.Semaphore(200)

    async def one(i):
        async with sem:
            await open_one(i, port, deflate, msg, held, errors)

    await asyncio.gather(*(one(i) for i in range(n)))
    return held, errors


def row_b(runs, n, release_wait):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    os.sched_setaffinity(0, {int(LOAD_CPU)})
    msg = messages(1)[0].encode()
    res = {}
    for r in range(runs):
        for backend in ("reactor", "tokio"):
            for deflate in (False, True):
                srv = hop_server(backend)
                try:
                    before = rss_kb(srv.pid)
                    loop = asyncio.new_event_loop()
                    held, errors = loop.run_until_complete(open_idle(srv.port, n, deflate, msg))
                    time.sleep(1)
                    open_kb = (rss_kb(srv.pid) - before) * 1024 / max(len(held), 1) / 1024
                    released_kb = None
                    if deflate:
                        time.sleep(release_wait)
                        released_kb = (rss_kb(srv.pid) - before) * 1024 / max(len(held), 1) / 1024
                    for w in held:
                        w.close()
                    # Let the transports close their sockets before the next server.
                    loop.run_until_complete(asyncio.sleep(1))
                    loop.close()
                finally:
                    srv.stop()
                key = (backend, deflate)
                res.setdefault(key, {"open": [], "released": []})
                res[key]["open"].append(open_kb)
                if released_kb is not None:
                    res[key]["released"].append(released_kb)
                log(f"B run {r + 1} {backend} deflate={deflate}: {len(held)} open, "
                    f"{len(errors)} failed {errors[:1]}, {open_kb:.2f} KB/conn"
                    + (f", {released_kb:.2f} KB/conn after {release_wait} s" if deflate else ""))
    print(f"\n#### B. {n:,} idle WebSockets, each after one echoed JSON message "
          f"(server RSS growth KB per connection, median of {runs})\n")
    print("| backend | uncompressed | compressed, history held | compressed, after "
          f"{release_wait} s (history released) |")
    print("|---|---|---|---|")
    for backend in ("reactor", "tokio"):
        plain = statistics.median(res[(backend, False)]["open"])
        held = statistics.median(res[(backend, True)]["open"])
        rel = statistics.median(res[(backend, True)]["released"])
        print(f"| {backend} | {plain:.2f} | {held:.2f} | {rel:.2f} |")
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--only", default="AB")
    a = ap.parse_args()
    if not os.path.exists(SERVER):
        sys.exit(f"deflate.py: {SERVER} is missing (cargo build --release --example server)")
    os.sched_setaffinity(0, {int(LOAD_CPU)})
    runs = 1 if a.quick else a.runs
    if "A" in a.only:
        row_a(runs, 5000 if a.quick else 10000)
    if "B" in a.only:
        row_b(runs, 1000 if a.quick else 10000, 12)


if __name__ == "__main__":
    threading.stack_size(1 << 20)
    main()
