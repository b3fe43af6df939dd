#!/usr/bin/env python3
"""Hostile HTTP/2 clients against a server process, and what they cost it.

    benches/h2_attack.py noread CMD...   # N h2c clients that open every window and never read
    benches/h2_attack.py flood KIND CMD... # a WINDOW_UPDATE, PING or SETTINGS flood

CMD is the server's command line; it must listen on --addr 127.0.0.1:PORT (PORT from $PORT,
default a free one), as the demo (`target/debug/examples/server --backend reactor|tokio --addr ..`)
and the peers (`target/debug/axum-serve --addr ..`) do.

noread: N connections (default 100, $CONNS), each with SO_RCVBUF 4 KB, send the preface,
SETTINGS (initial window 2^31-1), a connection WINDOW_UPDATE to 2^31-1, then a GET ($PATH_,
default /file: hop's README.md, its size as of the run) on each of $STREAMS streams (default 100, the most both
servers allow); they hold 5 s, then close. Prints the server's RSS before, with them (per connection) and 3 s after they left.

flood: one connection sends KIND frames as fast as the server takes them, reading all it
answers, for up to 6 s. Prints whether and when the server closed it, the GOAWAY code, and the
server's CPU time meanwhile.
"""
import os, socket, struct, subprocess, sys, time, select

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PORT = int(os.environ.get("PORT") or free_port())


def frame(kind, flags, stream, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def cpu_s(pid):
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


def start(cmd):
    p = subprocess.Popen(cmd + ["--addr", f"127.0.0.1:{PORT}"], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    for _ in range(200):
        if p.poll() is not None:
            sys.exit(f"server exited: {p.returncode}")
        try:
            socket.create_connection(("127.0.0.1", PORT), timeout=0.2).close()
            return p
        except OSError:
            time.sleep(0.05)
    p.kill()
    sys.exit("server did not start")


def get_block(path):
    # HPACK: :method GET (static 2), :scheme http (6), :path literal (name 4), :authority (1).
    out = bytes([0x82, 0x86, 0x04, len(path)]) + path.encode()
    host = b"127.0.0.1"
    return out + bytes([0x01, len(host)]) + host


def noread(cmd):
    n = int(os.environ.get("CONNS", "100"))
    path = os.environ.get("PATH_", "/file")
    p = start(cmd)
    time.sleep(1)
    before = rss_kb(p.pid)
    conns = []
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", PORT))
        s.setblocking(False)
        opening = PREFACE + frame(0x4, 0, 0, struct.pack(">HI", 0x4, 2**31 - 1))
        opening += frame(0x8, 0, 0, struct.pack(">I", 2**31 - 1 - 65535))
        s.send(opening)
        conns.append([s, 1, b""])
    block = get_block(path)
    streams = int(os.environ.get("STREAMS", "100"))
    # Every stream the server allows (100 by default on both), one request each.
    for c in conns:
        reqs = b"".join(frame(0x1, 0x5, 2 * i + 1, block) for i in range(streams))
        c[0].setblocking(True)
        c[0].sendall(reqs)
    time.sleep(5)
    during = rss_kb(p.pid)
    streams = streams * n
    for c in conns:
        c[0].setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c[0].close()
    time.sleep(3)
    after = rss_kb(p.pid)
    p.kill()
    p.wait()
    print(f"{' '.join(cmd)}: {n} non-reading h2 connections ({streams} requests sent): "
          f"RSS {before/1024:.1f} MB -> {during/1024:.1f} MB "
          f"({(during-before)/n/1024:.2f} MB per connection) -> {after/1024:.1f} MB 3 s after they left")


def flood(kind, cmd):
    kinds = {"window_update": (0x8, 0, struct.pack(">I", 1)), "ping": (0x6, 0, b"\x07" * 8),
             "settings": (0x4, 0, b"")}
    t, flags, payload = kinds[kind]
    p = start(cmd)
    time.sleep(0.5)
    cpu0 = cpu_s(p.pid)
    s = socket.create_connection(("127.0.0.1", PORT))
    s.setblocking(False)
    batch = frame(t, flags, 0, payload) * 1000
    s.sendall(PREFACE + frame(0x4, 0, 0))
    t0 = time.time()
    goaway = None
    closed = None
    buf = b""
    sent = 0
    pend = b""
    while time.time() - t0 < 6 and closed is None:
        r, w, _ = select.select([s], [s], [], 0.1)
        if r:
            try:
                d = s.recv(65536)
            except OSError:
                d = b""
            if not d:
                closed = time.time() - t0
                break
            buf += d
            while len(buf) >= 9:
                ln = int.from_bytes(buf[:3], "big")
                if len(buf) < 9 + ln:
                    break
                if buf[3] == 0x7:
                    goaway = int.from_bytes(buf[13:17], "big")
                buf = buf[9 + ln:]
        if w:
            try:
                if not pend:
                    pend = batch
                k = s.send(pend)
                pend = pend[k:]
                sent += k // 13
            except BlockingIOError:
                pass
            except OSError:
                closed = time.time() - t0
    cpu = cpu_s(p.pid) - cpu0
    p.kill()
    p.wait()
    verdict = f"closed after {closed:.2f} s" if closed is not None else "still open at 6 s"
    print(f"{' '.join(cmd)}: {kind} flood: {verdict}, GOAWAY {goaway}, server CPU {cpu:.2f} s")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    if sys.argv[1] == "noread":
        noread(sys.argv[2:])
    elif sys.argv[1] == "flood":
        flood(sys.argv[2], sys.argv[3:])
    else:
        sys.exit(__doc__)
