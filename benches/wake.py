#!/usr/bin/env python3
"""Issue 22's wake row: user-space instructions per request when each request wakes a
keep-alive connection that has been idle for a while (callgrind).

`hop-load rate` holds C connections (500 by default) at a fixed total rate, so each request
wakes a connection idle C/rate seconds: 500 req/s for a 1 s gap, 100 req/s for 5 s. Each server
runs twice under callgrind, instrumented from the start of the load, for a short and a long run
(4 s and 12 s); the difference of the two, divided by the difference of the requests, cancels
the connections' set-up and the server's start. Servers: the demo's reactor (1 poller,
defaults), the same with parking off (`--park-after-ms never`), hop's tokio backend, and the
peers `axum-serve` and `hyper-tuned` (1 worker). Server on CPU 0, load on CPU 1.

With `--wall N,...` it gives the wall-clock rows instead: N connections at N req/s in all (each
connection wakes once a second), no callgrind. Server CPU per request (user + system, from
/proc/PID/stat) is differenced from a short and a long run (4 s and 16 s) on fresh servers; the
long run also gives the p99 latency and the server's peak RSS. Each figure is the median of the
rounds (3 by default here), servers interleaved.

    cargo build --release --example server -p hop-load -p hop-peers
    benches/wake.py                       # 1 s and 5 s gaps, every server
    benches/wake.py --gaps 1 --servers reactor,hyper-tuned --rounds 2
    benches/wake.py --wall 2000,10000 --servers reactor,axum-serve,hyper-tuned
"""

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402

EXTRA = {"reactor-nopark": ["--park-after-ms", "never"]}


def argv(server, addr):
    backend = "reactor" if server == "reactor-nopark" else server
    return [*compare.server_argv(compare.SERVER, backend, addr), *EXTRA.get(server, [])]


def instructions(server, conns, rps, secs):
    """(instructions, requests) of one run of `secs` seconds under callgrind."""
    port = compare.next_port()
    addr = f"127.0.0.1:{port}"
    out = os.path.join(tempfile.mkdtemp(prefix="hop-cg-"), "callgrind.out")
    proc = subprocess.Popen(
        ["taskset", "-c", compare.SERVER_CPU, "valgrind", "--tool=callgrind",
         "--instr-atstart=no", f"--callgrind-out-file={out}", *argv(server, addr)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    compare.STARTED.append(proc)
    try:
        for _ in range(600):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        subprocess.run(["callgrind_control", "-i", "on", str(proc.pid)], capture_output=True,
                       check=True, timeout=30)
        r = compare.hop_load(["rate", "--rps", rps, "-d", f"{secs}s", "-c", conns, "--addr", addr],
                             timeout=secs * 10 + 120)
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
        total = 0
        with open(out) as f:
            for line in f:
                if line.startswith(("summary:", "totals:")):
                    total = int(line.split()[1])
        return total, r["requests"]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(os.path.dirname(out), ignore_errors=True)


def wall(server, conns, secs):
    """(CPU seconds, requests, p99 µs, peak RSS KB) of one `secs` run on a fresh server."""
    srv = compare.Server(compare.SERVER, server, argv=lambda addr: argv(server, addr))
    try:
        r = compare.hop_load(["rate", "--rps", conns, "-d", f"{secs}s", "-c", conns,
                              "--addr", srv.addr, "--server-pid", srv.pid],
                             timeout=secs * 10 + 300)
    finally:
        srv.stop()
    if r.get("errors"):
        compare.log(f"{server} {conns} connections: {r['errors']} errors")
    cpu = r["server_cpu_user_s"] + r["server_cpu_sys_s"]
    return cpu, r["requests"], r["latency"].get("p99_us", 0), r["server_max_rss_kb"]


def wall_rows(a, servers):
    """The wall-clock rows (see the module docs), printed as a Markdown table."""
    rounds = a.rounds or 3
    counts = [int(n) for n in a.wall.split(",")]
    got = {}
    for n in counts:
        for i in range(rounds):
            for s in servers:
                c0, n0, _, _ = wall(s, n, a.short)
                c1, n1, p99, rss = wall(s, n, a.wall_long)
                per = (c1 - c0) / max(1, n1 - n0) * 1e6
                got.setdefault((n, s), []).append((per, p99 / 1000, rss / 1024))
                compare.log(f"{n} connections {s} round {i + 1}: {per:.1f} µs CPU/request, "
                            f"p99 {p99 / 1000:.2f} ms, RSS {rss / 1024:.0f} MB")
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    print(f"| N connections, N req/s (median of {rounds}) | " + " | ".join(servers) + " |")
    print("|---|" + "---|" * len(servers))
    for n in counts:
        for label, col, fmt in (("server CPU µs/request", 0, "{:.1f}"), ("p99 ms", 1, "{:.2f}"),
                                ("peak RSS MB", 2, "{:.0f}")):
            vals = {s: med([g[col] for g in got[(n, s)]]) for s in servers}
            first = vals[servers[0]]
            cells = [fmt.format(vals[servers[0]])]
            for s in servers[1:]:
                ratio = f" ({first / vals[s]:.2f}×)" if col != 1 and vals[s] else ""
                cells.append(fmt.format(vals[s]) + ratio)
            print(f"| {n:,}: {label} | " + " | ".join(cells) + " |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--servers", default="reactor,reactor-nopark,tokio,axum-serve,hyper-tuned")
    ap.add_argument("--gaps", default="1,5", help="idle seconds between a connection's requests")
    ap.add_argument("--conns", type=int, default=500)
    ap.add_argument("--short", type=int, default=4)
    ap.add_argument("--long", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=None,
                    help="rounds, servers interleaved (default 1; 3 with --wall)")
    ap.add_argument("--wall", default="",
                    help="comma-separated connection counts: the wall-clock rows instead")
    ap.add_argument("--wall-long", type=int, default=16, help="the long run of --wall, seconds")
    a = ap.parse_args()
    servers = a.servers.split(",")
    if a.wall:
        wall_rows(a, servers)
        return
    gaps = [float(g) for g in a.gaps.split(",")]
    got = {}
    for gap in gaps:
        rps = max(1, round(a.conns / gap))
        for i in range(a.rounds or 1):
            for s in servers:
                i0, n0 = instructions(s, a.conns, rps, a.short)
                i1, n1 = instructions(s, a.conns, rps, a.long)
                per = (i1 - i0) / max(1, n1 - n0)
                got.setdefault((gap, s), []).append(per)
                compare.log(f"gap {gap:g} s ({rps} req/s) {s} round {i + 1}: {per:,.0f} "
                            f"instructions/request ({n0} and {n1} requests)")
    print(f"| idle gap ({a.conns} connections) | " + " | ".join(servers) + " |")
    print("|---|" + "---|" * len(servers))
    for gap in gaps:
        rps = max(1, round(a.conns / gap))
        cells = []
        for s in servers:
            v = sorted(got[(gap, s)])
            cells.append(f"{v[len(v) // 2]:,.0f}" + (f" ({v[0]:,.0f}–{v[-1]:,.0f})" if len(v) > 1 else ""))
        print(f"| {gap:g} s ({rps} req/s) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    try:
        main()
    finally:
        compare.cleanup()
