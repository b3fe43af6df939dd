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

    cargo build --release --example server -p hop-load -p hop-peers
    benches/wake.py                       # 1 s and 5 s gaps, every server
    benches/wake.py --gaps 1 --servers reactor,hyper-tuned --rounds 2
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--servers", default="reactor,reactor-nopark,tokio,axum-serve,hyper-tuned")
    ap.add_argument("--gaps", default="1,5", help="idle seconds between a connection's requests")
    ap.add_argument("--conns", type=int, default=500)
    ap.add_argument("--short", type=int, default=4)
    ap.add_argument("--long", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=1, help="rounds, servers interleaved")
    a = ap.parse_args()
    servers = a.servers.split(",")
    gaps = [float(g) for g in a.gaps.split(",")]
    got = {}
    for gap in gaps:
        rps = max(1, round(a.conns / gap))
        for i in range(a.rounds):
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
