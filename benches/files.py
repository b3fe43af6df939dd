#!/usr/bin/env python3
"""Server CPU per GiB served: /big (64 MiB) over plain HTTP/1.1 keep-alive, curl downloading it
N times on one connection, the server pinned to CPU 0 and curl to CPU 1. Servers: the demo's
reactor (hop::fs::ServeFile: sendfile), the demo's tokio backend (tower-http's body), and
hop-peers' axum-serve (tower-http's ServeFile on axum::serve). Rounds are interleaved; the
figure is the median of the rounds' CPU seconds (user + system, /proc/PID/stat) per GiB.

Usage: cargo build --release --example server -p hop -p hop-peers; python3 benches/files.py [rounds] [downloads]
"""
import os, socket, subprocess, sys, time, statistics

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
REL = os.path.join(ROOT, "target", "release")
ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 3
N = int(sys.argv[2]) if len(sys.argv) > 2 else 32
TICK = os.sysconf("SC_CLK_TCK")

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

def cpu(pid):
    total = 0
    for t in os.listdir(f"/proc/{pid}/task"):
        f = open(f"/proc/{pid}/task/{t}/stat").read().rsplit(")", 1)[1].split()
        total += int(f[11]) + int(f[12])
    return total / TICK

SERVERS = {
    "reactor": lambda a: [os.path.join(REL, "examples", "server"), "--backend", "reactor", "--pollers", "1", "--addr", a],
    "tokio": lambda a: [os.path.join(REL, "examples", "server"), "--backend", "tokio", "--pollers", "1", "--addr", a],
    "axum-serve": lambda a: [os.path.join(REL, "axum-serve"), "--workers", "1", "--addr", a],
}

def run(name):
    port = free_port(); addr = f"127.0.0.1:{port}"
    p = subprocess.Popen(["taskset", "-c", "0"] + SERVERS[name](addr), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://{addr}/big"
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port)).close(); break
        except OSError:
            time.sleep(0.05)
    # Warm the page cache and the server.
    subprocess.run(["curl", "-s", "-o", "/dev/null", url], check=True)
    c0 = cpu(p.pid); t0 = time.time()
    out = subprocess.run(["taskset", "-c", "1", "curl", "-s", "-w", "%{size_download}\n"] + sum([["-o", "/dev/null", url] for _ in range(N)], []),
                         check=True, capture_output=True, text=True).stdout.split()
    wall = time.time() - t0; c1 = cpu(p.pid)
    p.kill(); p.wait()
    got = sum(int(x) for x in out)
    assert got == N * (64 << 20), (name, got)
    gib = got / (1 << 30)
    return (c1 - c0) / gib, gib / wall

res = {k: [] for k in SERVERS}
for r in range(ROUNDS):
    for k in SERVERS:
        cpu_per_gib, gibps = run(k)
        res[k].append((cpu_per_gib, gibps))
        print(f"round {r+1} {k:10} {cpu_per_gib:.3f} CPU s/GiB  {gibps:.2f} GiB/s", flush=True)
base = statistics.median(c for c, _ in res["axum-serve"])
for k, v in res.items():
    m = statistics.median(c for c, _ in v)
    print(f"{k:10} median {m:.3f} CPU s/GiB ({m / base:.2f}x axum-serve), {statistics.median(g for _, g in v):.2f} GiB/s")
