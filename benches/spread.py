#!/usr/bin/env python3
"""Scaling row (issue 23): how evenly the reactor's pollers share a few busy connections.

For each C in --conns, C busy keep-alive connections (wrk, one thread, on /plaintext; h2c:
h2load, one stream at a time per connection; TLS: wrk over https, HTTP/1.1) load the demo server
(`examples/server --pollers N`, defaults otherwise) for --secs seconds. Each poller thread's CPU
time (user + system, /proc/PID/task/TID/stat) is read before and after; the busiest poller's
share is its time over all the pollers' time. Each cell is the worst share of --rounds rounds,
with the median req/s (the server's CPU time per request goes to stderr). Servers and load are not pinned: on a small machine they share the
cores, which is the case the share is meant for.

    benches/spread.py [--server PATH] [--pollers 2] [--conns 2,3,4,6] [--rounds 3] [--secs 3]
                      [--kinds http,h2c,tls] [--backend reactor|tokio|axum-serve]

Needs wrk (and h2load for h2c, the openssl CLI for TLS). Build first:
`cargo build --release --example server` (and `-p hop-peers` for axum-serve, which runs with
`--workers N` as N pollers). Prints a markdown table on stdout.
"""

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HZ = os.sysconf("SC_CLK_TCK")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target")
SERVER = os.path.join(TARGET, "release", "examples", "server")
# Peer servers (benches/peers, `cargo build --release -p hop-peers`), HTTP/1.1 and h2c only.
PEERS = ("axum-serve",)


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, secs=20):
    end = time.time() + secs
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("the server did not start")


def poller_ticks(pid):
    """CPU ticks (user + system) of each poller thread (hop-poller-*; the workers, hop-tokio, on
    the tokio backend; tokio's workers in axum-serve), by thread id."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        # axum-serve's workers: tokio's default name, cut to 15 bytes by the kernel.
        if not (name.startswith("hop-poller") or name in ("hop-tokio", "tokio-rt-worker", "tokio-runtime-w")):
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        out[tid] = int(fields[11]) + int(fields[12])
    return out


def process_ticks(pid):
    """CPU ticks (user + system) of the whole server process."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12])


def certificate(directory):
    cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", key, "-out", cert, "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost"], check=True, capture_output=True)
    return cert, key


def load(kind, port, conns, secs):
    """Runs the load; requests per second."""
    if kind == "h2c":
        cmd = ["h2load", "-c", str(conns), "-m", "1", "-D", str(secs),
               f"http://127.0.0.1:{port}/plaintext"]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=secs + 60)
        for line in p.stdout.splitlines():
            if line.startswith("requests: "):
                words = line[len("requests: "):].replace(",", "").split()
                done = dict(zip(words[1::2], words[::2]))
                return int(done["succeeded"]) / secs
        raise RuntimeError(f"h2load: {p.stdout[-300:]} {p.stderr[-300:]}")
    host = "localhost" if kind == "tls" else "127.0.0.1"
    scheme = "https" if kind == "tls" else "http"
    cmd = ["wrk", "-t1", f"-c{conns}", f"-d{secs}s", f"{scheme}://{host}:{port}/plaintext"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=secs + 60)
    for line in p.stdout.splitlines():
        if line.startswith("Requests/sec:"):
            return float(line.split()[1])
    raise RuntimeError(f"wrk: {p.stdout[-300:]} {p.stderr[-300:]}")


def run(args, kind, conns, tls):
    port = free_port()
    if args.backend in PEERS:
        cmd = [os.path.join(TARGET, "release", args.backend), "--addr", f"127.0.0.1:{port}",
               "--pollers", str(args.pollers)]
    else:
        cmd = [args.server, "--addr", f"127.0.0.1:{port}", "--backend", args.backend,
               "--pollers", str(args.pollers)]
    if kind == "tls":
        cmd += ["--tls-cert", tls[0], "--tls-key", tls[1]]
    srv = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        load(kind, port, conns, 1)  # warm-up
        time.sleep(0.3)  # its connections close before the measured ones open
        before, cpu0 = poller_ticks(srv.pid), process_ticks(srv.pid)
        rps = load(kind, port, conns, args.secs)
        after, cpu1 = poller_ticks(srv.pid), process_ticks(srv.pid)
    finally:
        srv.terminate()
        srv.wait(timeout=30)
    used = [after[t] - before.get(t, 0) for t in after]
    total = sum(used)
    if not total:
        raise RuntimeError("no poller or worker thread used any CPU (thread names?)")
    share = max(used) / total
    us_per_request = (cpu1 - cpu0) / HZ * 1e6 / max(rps * args.secs, 1)
    return share, rps, us_per_request


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--server", default=SERVER)
    ap.add_argument("--backend", default="reactor")
    ap.add_argument("--pollers", type=int, default=2)
    ap.add_argument("--conns", default="2,3,4,6")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--secs", type=int, default=3)
    ap.add_argument("--kinds", default="http")
    args = ap.parse_args()
    conns = [int(c) for c in args.conns.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        tls = certificate(tmp) if "tls" in args.kinds else None
        print(f"| {args.backend}, {args.pollers} pollers | "
              + " | ".join(f"C={c}" for c in conns) + " |")
        print("|---|" + "---|" * len(conns))
        for kind in args.kinds.split(","):
            cells = []
            for c in conns:
                rounds = [run(args, kind, c, tls) for _ in range(args.rounds)]
                worst = max(s for s, _, _ in rounds)
                rps = statistics.median(r for _, r, _ in rounds)
                log(f"{kind} C={c}: shares {[round(s, 2) for s, _, _ in rounds]}, "
                    f"req/s {[round(r) for _, r, _ in rounds]}, "
                    f"server CPU us/request {[round(u, 2) for _, _, u in rounds]}")
                cells.append(f"{worst:.0%} ({rps / 1000:.1f}k req/s)")
            print(f"| {kind}: busiest poller's share, worst of {args.rounds} (median req/s) | "
                  + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
