#!/usr/bin/env python3
"""Side-by-side benchmark of hop's reactor and tokio backends and two peer servers (run through
benches/compare.sh).

The peers (benches/peers, issue 11) serve the same routes: `axum-serve` is axum::serve as users
run it (stock settings, a 1-worker multi-thread runtime), `hyper-tuned` a tuned hyper-util http1
server (tokio current_thread, TCP_NODELAY, pipeline_flush). They get columns in rows 1, 2, 3, 4, 5
and 9; the HTTP/2 rows (10: h2load, 11: idle h2c connections) compare hop's backends with
axum-serve only (hyper-tuned speaks HTTP/1 alone); rows 6-8 compare hop's two backends only.
The TLS rows (12: new TLS 1.3 handshakes, 13: keep-alive over TLS, 14: idle TLS connections)
compare hop's backends serving HTTPS (`examples/server --tls-cert --tls-key`) with `axum-server`
(`axum_server::bind_rustls`, stock settings), the peer users pick for TLS, on a throwaway ECDSA
P-256 certificate made with the openssl CLI at run time. `--no-peers` leaves the peers out
everywhere. Rows 15 and 16 (permessage-deflate) come from benches/deflate.py: hop::ws's settings
against each other, with a Python `websockets` server as the reference for the ratio.

Servers run pinned to CPU 0 with one poller / one worker, the load (wrk, hop-load) pinned to
CPU 1 (one churn row caps the server at half a CPU with a cgroup quota; row 9 counts
instructions under callgrind). Each measurement is preceded by a warm-up; backends alternate (reactor, tokio, reactor,
tokio, ...); each cell is the median of the runs with the min-max spread. Prints a markdown
table on stdout; progress goes to stderr.
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target")
REL = os.path.join(TARGET, "release")
SERVER = os.path.join(REL, "examples", "server")
ECHO = os.path.join(REL, "examples", "echo")
LOAD = os.path.join(REL, "hop-load")
WRK_DIR = os.path.join(ROOT, "benches", "wrk")
HOP = ["reactor", "tokio"]
PEERS = {name: os.path.join(REL, name) for name in ("axum-serve", "hyper-tuned")}
# The backends of the peer rows (1-5, 9); `--no-peers` makes it HOP.
BACKENDS = HOP + list(PEERS)
# The HTTP/2 rows (10, 11) leave out hyper-tuned, an http1-only server.
H2_PEERS = ["axum-serve"]
# The peer of the TLS rows (12-14): axum-server over rustls (aws-lc-rs, as hop's default).
TLS_PEERS = {"axum-server": os.path.join(REL, "axum-server")}
# The columns of the TLS rows; `--no-peers` makes it HOP.
TLS_BACKENDS = HOP + list(TLS_PEERS)
# Requests per h2load run for each second of a measurement: 200,000 quick, 1,000,000 full (about
# 1 s and 5 s at axum-serve's 200,000 req/s on a quiet core; the warm-up's share likewise).
H2_REQUESTS_PER_SEC = 100_000
SERVER_CPU, LOAD_CPU = "0", "1"
HZ = os.sysconf("SC_CLK_TCK")

STARTED = []
PORT = [18300]


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def next_port():
    PORT[0] += 1
    return PORT[0]


def server_argv(binary, backend, addr, tls=None):
    """The command line of `binary` (a hop example) on `backend`, or of the peer server named
    `backend`, with one poller / one worker; with `tls` (a (cert, key) pair of PEM files) it
    serves HTTPS."""
    tls_args = ["--tls-cert", tls[0], "--tls-key", tls[1]] if tls else []
    if backend in PEERS:
        return [PEERS[backend], "--addr", addr, "--workers", "1"]
    if backend in TLS_PEERS:
        return [TLS_PEERS[backend], "--addr", addr, "--workers", "1", *tls_args]
    # The demo keeps no metrics recorder here: the peers keep none (hop's `metrics` feature is
    # compiled into the examples; without a recorder its calls do nothing).
    quiet = ["--metrics", "off"] if os.path.basename(binary) == "server" else []
    return [binary, "--backend", backend, "--addr", addr, "--pollers", "1", *tls_args, *quiet]


class Server:
    """A server on CPU 0, listening on a port of its own once constructed: `binary` on
    `backend` (see `server_argv`) with `extra` flags after its own, or, with `argv`, the command
    line `argv(addr)` gives (another program, say)."""

    def __init__(self, binary, backend, tls=None, extra=(), argv=None):
        self.port = next_port()
        self.addr = f"127.0.0.1:{self.port}"
        env = dict(os.environ, RUST_LOG="warn")
        cmd = argv(self.addr) if argv else [*server_argv(binary, backend, self.addr, tls), *extra]
        self.proc = subprocess.Popen(
            ["taskset", "-c", SERVER_CPU, *cmd],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        STARTED.append(self.proc)
        self.pid = self.proc.pid
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{' '.join(cmd)} exited at start")
                time.sleep(0.025)
        raise RuntimeError(f"{cmd[0]} did not listen on {self.addr}")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(2)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def cleanup():
    for p in STARTED:
        if p.poll() is None:
            p.kill()


class CpuCap:
    """A cgroup whose processes get at most `fraction` of one CPU (a CFS quota per 10 ms).

    Capping the server makes it, not the single-core load generator, set the pace; the row then
    measures what the server can do with the CPU it has. Needs root and a cgroup v1 `cpu`
    hierarchy or cgroup v2 with the cpu controller; `ok` is False otherwise."""

    PERIOD_US = 10000

    def __init__(self, fraction):
        self.ok, self.dir, self.why = False, None, ""
        quota = int(self.PERIOD_US * fraction)
        v1, v2 = "/sys/fs/cgroup/cpu", "/sys/fs/cgroup"
        try:
            if os.path.isfile(os.path.join(v1, "cpu.cfs_quota_us")):
                self.dir = os.path.join(v1, "hop-bench")
                os.makedirs(self.dir, exist_ok=True)
                self._write("cpu.cfs_period_us", self.PERIOD_US)
                self._write("cpu.cfs_quota_us", quota)
            elif os.path.isfile(os.path.join(v2, "cgroup.controllers")):
                with open(os.path.join(v2, "cgroup.subtree_control"), "a") as f:
                    f.write("+cpu")
                self.dir = os.path.join(v2, "hop-bench")
                os.makedirs(self.dir, exist_ok=True)
                self._write("cpu.max", f"{quota} {self.PERIOD_US}")
            else:
                self.why = "no cgroup cpu controller"
                return
            self.ok = True
        except OSError as e:
            self.why = f"cgroup: {e}"

    def _write(self, name, value):
        with open(os.path.join(self.dir, name), "w") as f:
            f.write(str(value))

    def add(self, pid):
        self._write("cgroup.procs", pid)

    def remove(self):
        """Removes the group (once its processes have exited)."""
        for _ in range(20):
            try:
                os.rmdir(self.dir)
                return
            except OSError:
                time.sleep(0.05)


ALLOC_FNS = {"malloc", "calloc", "posix_memalign", "aligned_alloc", "memalign"}


def callgrind_calls(path):
    """Calls to each function in a callgrind output file, summed over all callers: the
    `calls=N` line that follows a `cfn=` line counts N calls to that function. Names are
    compressed (`(id) name` the first time, `(id)` after) in one table for `fn=` and `cfn=`."""
    names, calls, callee = {}, {}, None
    with open(path) as f:
        for line in f:
            if line.startswith(("fn=", "cfn=")):
                v = line.split("=", 1)[1].strip()
                if v.startswith("("):
                    ident, _, name = v.partition(")")
                    name = name.strip()
                    if name:
                        names[ident] = name
                    v = names.get(ident, ident)
                if line.startswith("cfn="):
                    callee = v.split("'")[0]
            elif line.startswith("calls=") and callee is not None:
                calls[callee] = calls.get(callee, 0) + int(line.split()[0][6:])
                callee = None
    return calls


def callgrind_per_unit(backend, warm_up, measure, tls=None):
    """Instructions the server executes in user space per unit of work (callgrind), and heap
    allocations (calls to malloc, calloc and the aligned allocators) and reallocs per unit.

    The server starts uninstrumented; `warm_up(addr)` runs, instrumentation is switched on,
    `measure(addr)` runs and returns how many units it completed, and the counts are dumped
    when the server exits. With `tls` (a (cert, key) pair) the server serves HTTPS."""
    port = next_port()
    addr = f"127.0.0.1:{port}"
    out = os.path.join(tempfile.mkdtemp(prefix="hop-cg-"), "callgrind.out")
    proc = subprocess.Popen(
        ["taskset", "-c", SERVER_CPU, "valgrind", "--tool=callgrind", "--instr-atstart=no",
         f"--callgrind-out-file={out}", *server_argv(SERVER, backend, addr, tls)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    STARTED.append(proc)
    try:
        for _ in range(600):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        warm_up(addr)
        subprocess.run(["callgrind_control", "-i", "on", str(proc.pid)], capture_output=True,
                       check=True, timeout=30)
        units = measure(addr)
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
        total = 0
        with open(out) as f:
            for line in f:
                if line.startswith(("summary:", "totals:")):
                    total = int(line.split()[1])
        calls = callgrind_calls(out)
        allocs = sum(calls.get(n, 0) for n in ALLOC_FNS)
        units = max(units, 1)
        return total / units, allocs / units, calls.get("realloc", 0) / units
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(os.path.dirname(out), ignore_errors=True)


def callgrind_per_request(backend):
    """User-space instructions per keep-alive request on /plaintext (wrk, 10 connections)."""
    url = lambda addr: f"http://{addr}/plaintext"
    return callgrind_per_unit(backend, lambda addr: wrk(url(addr), 10, 2, "report.lua"),
                              lambda addr: wrk(url(addr), 10, 8, "report.lua")["requests"])


def callgrind_per_message(backend):
    """User-space instructions per echoed WebSocket message (100 connections, ping-pong; the
    measured part includes their 100 handshakes). The reactor serves hop::ws, tokio the
    tokio-tungstenite loop, as in row 6; the peers axum's WebSocketUpgrade."""
    path = "/ws-tungstenite" if backend == "tokio" else "/ws"
    run = lambda addr, secs: hop_load(["ws-echo", "-c", 100, "-d", secs, "--addr", addr,
                                       "--path", path])
    return callgrind_per_unit(backend, lambda addr: run(addr, 1),
                              lambda addr: run(addr, 6)["messages"])


def steal_ticks(cpu):
    """Ticks the hypervisor took from `cpu` (the steal column of /proc/stat)."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{cpu} "):
                return int(line.split()[8])
    return 0


def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def wrk(url, conns, secs, script, extra=()):
    cmd = ["taskset", "-c", LOAD_CPU, "wrk", "-t1", f"-c{conns}", f"-d{secs}s", "--timeout", "5s",
           "-s", os.path.join(WRK_DIR, script), url]
    if extra:
        cmd += ["--", *extra]
    for _ in range(2):
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=secs + 30)
        for line in p.stdout.splitlines():
            if line.startswith("JSON "):
                return json.loads(line[5:])
        log(f"wrk printed no result (rc {p.returncode}): {p.stdout[-300:]} {p.stderr[-300:]}")
        time.sleep(0.5)
    raise RuntimeError(f"wrk failed against {url}")


def wrk_runs(servers, runs, warm, secs, script, extra=(), row=0, raw=None):
    """Interleaved wrk runs on /plaintext, 100 connections: yields (backend, result, server CPU
    ticks during the run), each after a warm-up."""
    for i, b in interleave(runs):
        s = servers[b]
        url = f"http://{s.addr}/plaintext"
        wrk(url, 100, warm, script, extra)
        t0 = cpu_ticks(s.pid)
        r = wrk(url, 100, secs, script, extra)
        dt = cpu_ticks(s.pid) - t0
        raw.append({"row": row, "backend": b, **r, "cpu_ticks": dt})
        log(f"{row} {script} {b} run {i + 1}: {r['requests'] / (r['duration_us'] / 1e6):,.0f} req/s")
        yield b, r, dt


def hop_load(args, timeout=120):
    cmd = ["taskset", "-c", LOAD_CPU, LOAD, *map(str, args), "--json"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
    if not lines:
        raise RuntimeError(f"hop-load {' '.join(map(str, args))}: {p.stderr.strip()[-500:]}")
    v = json.loads(lines[-1])
    if "error" in v and args[0] != "sse":
        raise RuntimeError(f"hop-load {args[0]}: {v['error']}")
    return v


def make_cert(directory):
    """A throwaway self-signed ECDSA P-256 certificate for `localhost` (and 127.0.0.1), valid
    for a day, made with the openssl CLI: (cert.pem, key.pem) in `directory`, or None (with
    the reason logged) when openssl is missing or fails."""
    cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    if not shutil.which("openssl"):
        log("TLS rows: openssl is missing (apt-get install openssl)")
        return None
    p = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", key, "-out", cert, "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
         # An end-entity certificate (req -x509 makes a CA by default, which webpki refuses).
         "-addext", "basicConstraints=critical,CA:FALSE"],
        capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        log(f"TLS rows: openssl req failed: {p.stderr.strip()[-300:]}")
        return None
    return cert, key


def wrk_https(addr, conns, secs):
    """wrk on https://localhost:PORT/plaintext (wrk's OpenSSL client: TLS 1.3, no ALPN, so
    HTTP/1.1, and no certificate check), one thread, `conns` keep-alive connections."""
    port = addr.rsplit(":", 1)[1]
    return wrk(f"https://localhost:{port}/plaintext", conns, secs, "report.lua")


def target_cell(cell, b, peer, limit, at_least):
    """A target's cell: `b`'s median over `peer`'s, and whether it is at least (`at_least`) or
    at most `limit`; n/a when either has no median."""
    mine = cell[b].median()
    theirs = cell[peer].median() if peer in cell else None
    if mine is None or not theirs:
        return "n/a"
    x = mine / theirs
    met = x >= limit if at_least else x <= limit
    return f"{x:.2f}× ({'met' if met else 'no'})"


def capped_churn(table, raw, what, row, backends, runs, warm, secs, tls=None, extra=()):
    """Connection churn (`hop-load churn -c 32`, `extra` added: the TLS arguments) with each
    server capped at half a CPU by a cgroup quota, on fresh servers (`tls`: a (cert, key) pair
    to serve HTTPS): connections/s and server CPU per connection, added to `table` as `what`,
    each run to `raw` as row `row`-capped. Uncapped, the load generator's CPU runs out first,
    so connections/s says little about the server; capped, it is the server's capacity.
    Returns the cells, or None (a row of n/a) where the cgroup is not available."""
    cap = CpuCap(0.5)
    if not cap.ok:
        table.na(what, "connections/s", cap.why, backends)
        return None
    capped = {b: Server(SERVER, b, tls) for b in backends}
    try:
        for s in capped.values():
            cap.add(s.pid)
        cc = cells("cps", "cpu", backends=backends)
        for i, b in interleave(runs, backends):
            s = capped[b]
            hop_load(["churn", "-c", 32, "-d", warm, "--addr", s.addr, *extra])
            r = hop_load(["churn", "-c", 32, "-d", secs, "--addr", s.addr,
                          "--server-pid", s.pid, *extra])
            raw.append({"row": f"{row}-capped", "backend": b, **r})
            cc["cps"][b].add(r["conn_per_s"])
            cpu = r.get("server_cpu_user_s", 0) + r.get("server_cpu_sys_s", 0)
            cc["cpu"][b].add(cpu * 1e6 / max(r["connections"], 1))
            log(f"{row} churn capped {b} run {i + 1}: {r['conn_per_s']:,.0f} conn/s")
    finally:
        for s in capped.values():
            s.stop()
        cap.remove()
    table.add(what, "connections/s", cc["cps"])
    table.add(what, "server CPU µs/conn", cc["cpu"], 1)
    return cc


def tls_targets(hs, ka, idle_tls):
    """A markdown table of the TLS targets for each of hop's backends measured, against
    axum-server's medians: new handshakes/s at least 1.1× (row 12), server CPU per keep-alive
    request over TLS at most 0.9× (row 13), idle TLS memory per connection at most 0.3× (row
    14). Empty when none of the rows ran or axum-server has no column."""
    peer = "axum-server"
    hop = [b for b in HOP if b in TLS_BACKENDS]

    def against(cell, b, limit, at_least):
        return target_cell(cell, b, peer, limit, at_least)

    rows = []
    if hs is not None:
        # Capped at half a CPU when the cgroup allowed it (uncapped, the client sets the pace).
        cps, how = (hs["capped"], "server at 0.5 CPU") if "capped" in hs else (hs["cps"], "uncapped")
        rows.append((f"new TLS handshakes/s ≥ 1.1× axum-server ({how})",
                     [against(cps, b, 1.1, True) for b in hop]))
    if ka is not None:
        rows.append(("server CPU µs/request over TLS (keep-alive) ≤ 0.9× axum-server",
                     [against(ka["cpu"], b, 0.9, False) for b in hop]))
        if "ins" in ka:
            rows.append(("user-space instructions/request over TLS (callgrind) ≤ 0.9× axum-server",
                         [against(ka["ins"], b, 0.9, False) for b in hop]))
    if idle_tls is not None:
        rows.append(("idle TLS keep-alive KB/conn ≤ 0.3× axum-server",
                     [against(idle_tls["kb"], b, 0.3, False) for b in hop]))
    if not rows or peer not in TLS_BACKENDS:
        return ""
    out = ["| target | " + " | ".join(hop) + " |", "|---|" + "---|" * len(hop)]
    out += [f"| {what} | " + " | ".join(vals) + " |" for what, vals in rows]
    return "\n".join(out)


def tls_rows(table, raw, runs, idle_runs, warm, secs, want, tmp):
    """Rows 12-14, on servers serving HTTPS with a throwaway certificate made in `tmp`: returns
    the cells of each row (None for a row that did not run) for the targets."""
    hs = ka = idle_tls = None
    tb = TLS_BACKENDS
    w12 = "new TLS 1.3 handshakes (full, no resumption), a connection per request, 32 workers"
    w13 = "keep-alive over TLS 1.3 (HTTP/1.1), wrk 10 conns"
    w14 = "10,000 idle TLS keep-alive (TLS 1.3, one GET /plaintext over HTTP/1.1)"
    pair = make_cert(tmp)
    if pair is None:
        for n, w in ((12, w12), (13, w13), (14, w14)):
            if want(n):
                table.num = n
                table.na(w, "n/a", "no certificate (the openssl CLI is missing or failed)", tb)
        return hs, ka, idle_tls
    cert = pair[0]
    tls_args = ["--tls", "--ca", cert, "--server-name", "localhost"]
    if want(12) or want(13):
        servers = {b: Server(SERVER, b, pair) for b in tb}
        try:
            # 12. New TLS handshakes: hop-load churn over TLS 1.3, no session resumption.
            if want(12):
                hs = cells("cps", "p99", "cpu", "busy", backends=tb)
                for i, b in interleave(runs, tb):
                    s = servers[b]
                    hop_load(["churn", "-c", 32, "-d", warm, "--addr", s.addr, *tls_args])
                    r = hop_load(["churn", "-c", 32, "-d", secs, "--addr", s.addr,
                                  "--server-pid", s.pid, *tls_args])
                    raw.append({"row": 12, "backend": b, **r})
                    hs["cps"][b].add(r["conn_per_s"])
                    hs["p99"][b].add(r["latency"].get("p99_us", 0) / 1000)
                    cpu = r.get("server_cpu_user_s", 0) + r.get("server_cpu_sys_s", 0)
                    hs["cpu"][b].add(cpu * 1e6 / max(r["connections"], 1))
                    hs["busy"][b].add(cpu / max(r["secs"], 1e-9) * 100)
                    first = f", first: {r['first_error']}" if r.get("first_error") else ""
                    log(f"12 tls churn {b} run {i + 1}: {r['conn_per_s']:,.0f} conn/s "
                        f"({r['errors']} errors{first})")
                table.num = 12
                table.add(w12, "connections/s", hs["cps"])
                table.add(w12, "p99 ms (connect to close)", hs["p99"], 2)
                table.add(w12, "server CPU µs/conn", hs["cpu"], 1)
                table.add(w12, "server CPU busy % (below 100: the client set the pace)",
                          hs["busy"], 0)
                # The same with the server capped at half a CPU, as row 3 (the client's own
                # handshakes make it run out first here too); the handshake target reads it.
                hc = capped_churn(table, raw, "new TLS 1.3 handshakes, server capped at 0.5 CPU "
                                  "(cgroup quota)", "12", tb, runs, warm, secs, pair, tls_args)
                if hc is not None:
                    hs["capped"] = hc["cps"]
            # 13. Keep-alive requests over TLS: wrk, 10 connections, /plaintext.
            if want(13):
                ka = cells("rps", "p99", "cpu", backends=tb)
                for i, b in interleave(runs, tb):
                    s = servers[b]
                    wrk_https(s.addr, 10, warm)
                    t0 = cpu_ticks(s.pid)
                    r = wrk_https(s.addr, 10, secs)
                    dt = cpu_ticks(s.pid) - t0
                    raw.append({"row": 13, "backend": b, **r, "cpu_ticks": dt})
                    n = r["requests"]
                    ka["rps"][b].add(n / (r["duration_us"] / 1e6))
                    ka["p99"][b].add(r["p99_us"] / 1000)
                    ka["cpu"][b].add(dt / HZ * 1e6 / max(n, 1))
                    log(f"13 tls keep-alive {b} run {i + 1}: "
                        f"{n / (r['duration_us'] / 1e6):,.0f} req/s")
                table.num = 13
                table.add(w13, "req/s", ka["rps"])
                table.add(w13, "p99 ms", ka["p99"], 2)
                table.add(w13, "server CPU µs/req", ka["cpu"], 2)
                # User-space instructions per request (callgrind, which repeats to about 1%,
                # where CPU time moves by 10% between runs here), once per server, as row 9.
                if shutil.which("valgrind") and shutil.which("callgrind_control"):
                    ka["ins"] = {b: Cell() for b in tb}
                    for b in tb:
                        ins, allocs, _ = callgrind_per_unit(
                            b, lambda addr: wrk_https(addr, 10, 2),
                            lambda addr: wrk_https(addr, 10, 8)["requests"], tls=pair)
                        ka["ins"][b].add(ins)
                        log(f"13 tls callgrind {b}: {ins:,.0f} instructions/req, "
                            f"{allocs:.2f} allocations/req")
                    table.add(w13, "user-space instructions/req (callgrind)", ka["ins"], 0)
                else:
                    table.na(w13, "user-space instructions/req (callgrind)", "no valgrind", tb)
        finally:
            for s in servers.values():
                s.stop()
    # 14. Idle TLS keep-alive connections: a fresh server for each measurement, as in row 5.
    if want(14):
        idle_tls = cells("kb", "thr", backends=tb)
        for i, b in interleave(idle_runs, tb):
            s = Server(SERVER, b, pair)
            try:
                r = hop_load(["idle", "--kind", "https", "-n", 10000, "--addr", s.addr,
                              "--server-pid", s.pid, "--ca", cert, "--server-name", "localhost"])
            finally:
                s.stop()
            raw.append({"row": 14, "backend": b, **r})
            if r["failed"]:
                log(f"14 idle https {b}: {r['failed']} failed ({r['first_error']})")
            if r.get("closed_by_server"):
                log(f"14 idle https {b}: the server closed {r['closed_by_server']}")
            idle_tls["kb"][b].add(r["rss_per_conn_bytes"] / 1024)
            idle_tls["thr"][b].add(r["threads_after"])
            log(f"14 idle https {b}: {r['rss_per_conn_bytes']:.0f} B/conn, "
                f"{r['threads_after']} threads")
        table.num = 14
        table.add(w14, "server RSS growth KB/conn", idle_tls["kb"], 2)
        table.add(w14, "server threads", idle_tls["thr"], 0)
    return hs, ka, idle_tls


def h2_backends():
    """The columns of the HTTP/2 rows: hop's backends and the peers that speak h2c."""
    return [b for b in BACKENDS if b in HOP or b in H2_PEERS]


def h2load_seconds(text):
    """h2load's `finished in 1.33s` / `850.12ms` / `418us` as seconds."""
    for unit, scale in (("us", 1e-6), ("ms", 1e-3), ("s", 1.0)):
        if text.endswith(unit):
            return float(text[:-len(unit)]) * scale
    raise ValueError(f"h2load duration {text!r}")


def h2load(url, n, conns=10, streams=100):
    """`h2load -c conns -m streams -n n url` (h2c with prior knowledge, one client thread) on
    the load CPU: the `requests:` counts (total, succeeded, failed, ...) and, from the
    `finished in 1.01s, 198019.80 req/s` line, the run's seconds (as printed, to 10 ms) and its
    rate (requests that succeeded over the unrounded duration)."""
    cmd = ["taskset", "-c", LOAD_CPU, "h2load", "-c", str(conns), "-m", str(streams),
           "-n", str(n), url]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    r = {}
    for line in p.stdout.splitlines():
        if line.startswith("finished in "):
            words = line.split()
            r["secs"] = h2load_seconds(words[2].rstrip(","))
            r["rps"] = float(words[3])
        elif line.startswith("requests: "):
            # requests: 200000 total, 200000 started, 200000 done, 200000 succeeded, 0 failed, ...
            words = line[len("requests: "):].replace(",", "").split()
            r.update({k: int(v) for v, k in zip(words[::2], words[1::2])})
    if "secs" not in r or "succeeded" not in r:
        raise RuntimeError(f"h2load {url}: rc {p.returncode}: {p.stdout[-300:]} {p.stderr[-300:]}")
    return r


def h2c_answer(addr):
    """None when `addr` answers one h2c request on /plaintext, else why not."""
    try:
        r = h2load(f"http://{addr}/plaintext", 1, conns=1, streams=1)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        return str(e)[:200]
    return None if r["succeeded"] == 1 else "no HTTP/2 answer to h2c prior knowledge"


class Cell:
    """Values of one metric for one backend over the runs."""

    def __init__(self):
        self.v = []

    def add(self, x):
        if x is not None:
            self.v.append(x)

    def median(self):
        return statistics.median(self.v) if self.v else None


def fmt(x, digits=None):
    if x is None:
        return "n/a"
    if digits is None:
        digits = 0 if abs(x) >= 100 else (1 if abs(x) >= 10 else 2)
    return f"{x:,.{digits}f}"


def cell_str(c, digits=None):
    if not c.v:
        return "n/a"
    if len(c.v) == 1:
        return fmt(c.v[0], digits)
    return f"{fmt(c.median(), digits)} ({fmt(min(c.v), digits)}–{fmt(max(c.v), digits)})"


def ratio(a, b):
    ma, mb = a.median(), b.median()
    if ma is None or mb is None or mb == 0:
        return "n/a"
    return f"{ma / mb:.2f}"


class Table:
    def __init__(self):
        self.rows = []
        self.num = 0

    def add(self, what, metric, cells, digits=None, note=""):
        """A row: `cells` maps each backend measured to its Cell; a backend not in it reads
        `–`. The ratios are reactor against each other backend."""
        vals = {b: cell_str(c, digits) for b, c in cells.items()}
        ratios = {b: ratio(cells["reactor"], c) for b, c in cells.items() if b != "reactor"}
        self.rows.append((self.num, what, metric, vals, ratios, note))

    def na(self, what, metric, note, backends=None):
        backends = backends or BACKENDS
        self.rows.append((self.num, what, metric, {b: "n/a" for b in backends},
                          {b: "n/a" for b in backends if b != "reactor"}, note))

    def render(self):
        cols = [b for b in HOP + list(PEERS) + list(TLS_PEERS)
                if any(b in r[3] for r in self.rows)]
        others = [b for b in cols if b != "reactor"]
        head = ["#", "measurement", "metric", *cols, *(f"reactor/{b}" for b in others)]
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for num, what, metric, vals, ratios, note in sorted(self.rows, key=lambda x: x[0]):
            label = what + (f" ({note})" if note else "")
            row = [str(num), label, metric, *(vals.get(b, "–") for b in cols),
                   *(ratios.get(b, "–") for b in others)]
            out.append("| " + " | ".join(row) + " |")
        return "\n".join(out)


def cells(*names, backends=None):
    return {n: {b: Cell() for b in backends or BACKENDS} for n in names}


def interleave(runs, backends=None):
    """(run, backend) pairs: reactor, tokio, axum-serve, hyper-tuned, reactor, tokio, ..."""
    for i in range(runs):
        for b in backends or BACKENDS:
            yield i, b


def h2_targets(h2, idle_h2, row10, row11):
    """A markdown table of the HTTP/2 targets for each of hop's backends measured: h2 req/s at
    least 1.2× axum-serve's at most 0.8× its CPU per request (row 10), idle h2c memory per
    connection at most 0.8× axum-serve's and no thread added by the connections (row 11).
    Empty when neither row ran."""
    hop = [b for b in HOP if b in h2["rps"]]

    def against(cell, b, limit, at_least):
        return target_cell(cell, b, "axum-serve", limit, at_least)

    rows = []
    if row10:
        rows.append(("h2 req/s ≥ 1.2× axum-serve",
                     [against(h2["rps"], b, 1.2, True) for b in hop]))
        rows.append(("h2 server CPU µs/req ≤ 0.8× axum-serve",
                     [against(h2["cpu"], b, 0.8, False) for b in hop]))
    if row11:
        rows.append(("idle h2c KB/conn ≤ 0.8× axum-serve",
                     [against(idle_h2["kb"], b, 0.8, False) for b in hop]))
        added = []
        for b in hop:
            v = idle_h2["added"][b].v
            added.append("n/a" if not v else f"{max(v)} ({'met' if max(v) == 0 else 'no'})")
        rows.append(("threads added by 10,000 idle h2c connections: none", added))
    if not rows:
        return ""
    out = ["| target | " + " | ".join(hop) + " |", "|---|" + "---|" * len(hop)]
    out += [f"| {what} | " + " | ".join(vals) + " |" for what, vals in rows]
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="short runs (< 3 minutes)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--only", default="", help="comma-separated row numbers to run (1-16)")
    ap.add_argument("--svg", default=os.path.join(ROOT, "benches", "idle-memory.svg"))
    ap.add_argument("--json-out", default="", help="also write every raw result here")
    ap.add_argument("--no-peers", action="store_true",
                    help="hop's two backends only (no axum-serve / hyper-tuned columns)")
    ap.add_argument("--backends", default="",
                    help="the columns of the peer rows (1-5, 9; 10-11 without hyper-tuned; "
                         "12-14: reactor, tokio, axum-server), comma-separated; reactor and "
                         "any of tokio, axum-serve, hyper-tuned, axum-server (default: all)")
    a = ap.parse_args()
    global BACKENDS, TLS_BACKENDS
    if a.no_peers:
        BACKENDS = list(HOP)
        TLS_BACKENDS = list(HOP)
    if a.backends:
        names = a.backends.split(",")
        BACKENDS = [b for b in HOP + list(PEERS) if b in names]
        TLS_BACKENDS = [b for b in HOP + list(TLS_PEERS) if b in names]
        if "reactor" not in BACKENDS or set(names) - set(BACKENDS) - set(TLS_BACKENDS):
            sys.exit(f"compare.py: --backends takes reactor and any of "
                     f"{HOP[1:] + list(PEERS) + list(TLS_PEERS)}")
    for b in BACKENDS:
        if b in PEERS and not os.path.exists(PEERS[b]):
            sys.exit(f"compare.py: {PEERS[b]} is missing (cargo build --release -p hop-peers)")
    for b in TLS_BACKENDS:
        if b in TLS_PEERS and not os.path.exists(TLS_PEERS[b]):
            sys.exit(f"compare.py: {TLS_PEERS[b]} is missing (cargo build --release -p hop-peers)")
    quick = a.quick
    secs = 2 if quick else 10
    warm = 1 if quick else 3
    echo_secs = 1 if quick else 5
    runs = max(3, a.runs)
    idle_runs = 1 if quick else 3
    only = {int(x) for x in a.only.split(",") if x}
    want = lambda n: not only or n in only
    raw = []
    table = Table()
    t_start = time.time()

    # The HTTP/2 rows' columns and figures, and why a column has none (no h2c answer).
    h2b = h2_backends()
    no_h2 = {}
    h2 = cells("rps", "cpu", backends=h2b)
    idle_h2 = cells("kb", "thr", "added", backends=h2b)

    servers = {b: Server(SERVER, b) for b in BACKENDS}
    try:
        # 1. plaintext keep-alive
        plain = cells("rps", "p50", "p99", "cpu")
        if want(1) or want(4):
            for b, r, dt in wrk_runs(servers, runs, warm, secs, "report.lua", row=1, raw=raw):
                n = r["requests"]
                plain["rps"][b].add(n / (r["duration_us"] / 1e6))
                plain["p50"][b].add(r["p50_us"] / 1000)
                plain["p99"][b].add(r["p99_us"] / 1000)
                plain["cpu"][b].add(dt / HZ * 1e6 / max(n, 1))
            w = "plaintext keep-alive, wrk 100 conns"
            table.num = 1
            table.add(w, "req/s", plain["rps"])
            table.add(w, "p50 ms", plain["p50"], 2)
            table.add(w, "p99 ms", plain["p99"], 2)
            table.add(w, "server CPU µs/req", plain["cpu"], 2)

        # 2. pipelined
        if want(2):
            pipe = cells("rps", "cpu")
            for b, r, dt in wrk_runs(servers, runs, warm, secs, "pipeline.lua", ["16"], row=2,
                                     raw=raw):
                n = r["requests"]
                pipe["rps"][b].add(n / (r["duration_us"] / 1e6))
                pipe["cpu"][b].add(dt / HZ * 1e6 / max(n, 1))
            w = "pipelined depth 16, wrk 100 conns"
            table.num = 2
            table.add(w, "req/s", pipe["rps"])
            table.add(w, "server CPU µs/req", pipe["cpu"], 2)

        # 3. connection churn
        if want(3):
            ch = cells("cps", "p99", "cpu")
            for i, b in interleave(runs):
                s = servers[b]
                hop_load(["churn", "-c", 32, "-d", warm, "--addr", s.addr])
                r = hop_load(["churn", "-c", 32, "-d", secs, "--addr", s.addr,
                              "--server-pid", s.pid])
                raw.append({"row": 3, "backend": b, **r})
                ch["cps"][b].add(r["conn_per_s"])
                ch["p99"][b].add(r["latency"].get("p99_us", 0) / 1000)
                cpu = r.get("server_cpu_user_s", 0) + r.get("server_cpu_sys_s", 0)
                ch["cpu"][b].add(cpu * 1e6 / max(r["connections"], 1))
                log(f"3 churn {b} run {i + 1}: {r['conn_per_s']:,.0f} conn/s "
                    f"({r['errors']} errors)")
            w = "connection churn, Connection: close, 32 workers"
            table.num = 3
            table.add(w, "connections/s", ch["cps"])
            table.add(w, "p99 ms (connect to close)", ch["p99"], 2)
            table.add(w, "server CPU µs/conn", ch["cpu"], 1)
            # The same with the server capped at half a CPU: uncapped, the load generator's CPU
            # (which also does the kernel's work for every handshake on loopback) runs out first.
            capped_churn(table, raw, "connection churn, server capped at 0.5 CPU (cgroup quota)",
                         "3", BACKENDS, runs, warm, secs)

        # 4. fixed-rate latency (coordinated omission corrected)
        if want(4):
            maxima = [plain["rps"][b].median() for b in BACKENDS]
            target = int(os.environ.get("RATE") or 0)
            if not target:
                low = min(m for m in maxima if m) if all(maxima) else 20000
                target = max(1000, min(20000, int(low * 0.5) // 1000 * 1000))
            fr = cells("p50", "p95", "p99", "p999", "ach", "steal")
            # Tails are noisy on a VM: at least 5 runs each.
            for i, b in interleave(max(runs, 5)):
                s = servers[b]
                hop_load(["rate", "--rps", target, "-d", warm, "-c", 50, "--addr", s.addr])
                st0, t0 = steal_ticks(SERVER_CPU), time.time()
                r = hop_load(["rate", "--rps", target, "-d", secs, "-c", 50, "--addr", s.addr,
                              "--server-pid", s.pid])
                stolen = (steal_ticks(SERVER_CPU) - st0) / HZ / (time.time() - t0) * 100
                raw.append({"row": 4, "backend": b, **r, "steal_pct": stolen})
                lat = r["latency"]
                fr["steal"][b].add(stolen)
                fr["p50"][b].add(lat.get("p50_us", 0) / 1000)
                fr["p95"][b].add(lat.get("p95_us", 0) / 1000)
                fr["p99"][b].add(lat.get("p99_us", 0) / 1000)
                fr["p999"][b].add(lat.get("p999_us", 0) / 1000)
                fr["ach"][b].add(r["achieved_rps"])
                log(f"4 rate {b} run {i + 1}: p99 {lat.get('p99_us', 0) / 1000:.2f} ms")
            w = f"fixed rate {target:,} req/s, 50 conns, CO-corrected, median of {max(runs, 5)}"
            table.num = 4
            table.add(w, "p50 ms", fr["p50"], 2)
            table.add(w, "p95 ms", fr["p95"], 2)
            table.add(w, "p99 ms", fr["p99"], 2)
            table.add(w, "p99.9 ms", fr["p999"], 2)
            table.add(w, "achieved req/s", fr["ach"])
            table.add(w, "CPU time stolen from the server's CPU by the hypervisor, %",
                      fr["steal"], 1)

        # 6. WebSocket echo, 7. SSE fan-out (on the long-lived servers)
        ws_rows, sse_rows = [], []
        if want(6):
            probe = hop_load(["ws-echo", "-c", 1, "-d", "0.2", "--addr", servers["reactor"].addr])
            if not probe.get("available", True) or probe.get("connections", 0) == 0:
                ws_rows.append(("na", probe.get("first_error") or "no /ws route"))
            else:
                # Ping-pong, then 16 messages in flight per connection (sent in one write).
                for burst in (1, 16):
                    we = cells("mps", "p99", "cpu", backends=HOP)
                    for i, b in interleave(runs, HOP):
                        s = servers[b]
                        # The reference is tokio-tungstenite on tokio (issue 6), not hop::ws there.
                        path = "/ws" if b == "reactor" else "/ws-tungstenite"
                        args = ["ws-echo", "-c", 100, "--burst", burst, "--addr", s.addr,
                                "--path", path]
                        hop_load(args + ["-d", warm])
                        r = hop_load(args + ["-d", secs, "--server-pid", s.pid])
                        raw.append({"row": 6, "backend": b, **r})
                        we["mps"][b].add(r.get("msg_per_s"))
                        cpu = r.get("server_cpu_user_s", 0) + r.get("server_cpu_sys_s", 0)
                        we["cpu"][b].add(cpu * 1e6 / max(r.get("messages", 0), 1))
                        we["p99"][b].add(r.get("latency", {}).get("p99_us", 0) / 1000)
                        log(f"6 ws-echo burst {burst} {b} run {i + 1}: {r.get('msg_per_s')} msg/s")
                    ws_rows.append(("ok", (burst, we)))
        if want(7):
            pub = os.environ.get("SSE_PUBLISH", "/sse/broadcast")
            args = ["sse", "-n", 1000, "--rounds", 3, "--wait", "3s"]
            if pub:
                args += ["--publish", pub]
            probe = hop_load(["sse", "-n", 1, "--rounds", 1, "--wait", "3s",
                              "--addr", servers["reactor"].addr] + (["--publish", pub] if pub else []))
            if "error" in probe or not probe.get("available", True) or probe.get("subscribers", 0) == 0:
                sse_rows.append(("na", probe.get("first_error") or "no /sse route"))
            else:
                se = cells("ms", backends=HOP)
                for i, b in interleave(runs, HOP):
                    s = servers[b]
                    r = hop_load(args + ["--addr", s.addr, "--server-pid", s.pid])
                    raw.append({"row": 7, "backend": b, **r})
                    se["ms"][b].add(r.get("fanout_median_ms"))
                    log(f"7 sse {b} run {i + 1}: {r.get('fanout_median_ms')} ms")
                sse_rows.append(("ok", se))

        # 10. HTTP/2: h2load, h2c with prior knowledge, 10 connections × 100 streams each.
        if want(10):
            table.num = 10
            w = "h2c (prior knowledge) /plaintext, h2load 10 conns × 100 streams"
            if not shutil.which("h2load"):
                table.na(w, "req/s; server CPU µs/req", "h2load not installed (nghttp2-client)",
                         h2b)
            else:
                for b in h2b:
                    why = h2c_answer(servers[b].addr)
                    if why:
                        no_h2[b] = why
                        log(f"10 h2load {b}: {why}")
                n = H2_REQUESTS_PER_SEC * secs
                for i, b in interleave(runs, [b for b in h2b if b not in no_h2]):
                    s = servers[b]
                    url = f"http://{s.addr}/plaintext"
                    h2load(url, H2_REQUESTS_PER_SEC * warm)
                    t0 = cpu_ticks(s.pid)
                    r = h2load(url, n)
                    dt = cpu_ticks(s.pid) - t0
                    raw.append({"row": 10, "backend": b, **r, "cpu_ticks": dt})
                    ok = r["succeeded"]
                    if ok < r["total"]:
                        log(f"10 h2load {b} run {i + 1}: {r['total'] - ok} of {r['total']} failed")
                    h2["rps"][b].add(r["rps"])
                    h2["cpu"][b].add(dt / HZ * 1e6 / max(ok, 1))
                    log(f"10 h2load {b} run {i + 1}: {r['rps']:,.0f} req/s")
                note = "; ".join(f"{b}: {why}" for b, why in no_h2.items())
                table.add(w, "req/s", h2["rps"], note=note)
                table.add(w, "server CPU µs/req", h2["cpu"], 2, note=note)
    finally:
        for s in servers.values():
            s.stop()

    # 5. idle connections: a fresh server for each measurement.
    chart_pts = {b: {} for b in BACKENDS}
    if want(5):
        for kind, label in [("http", "HTTP keep-alive"), ("ws", "WebSocket"), ("sse", "SSE")]:
            idle = cells("kb", "thr")
            absent = None
            for i, b in interleave(idle_runs):
                s = Server(SERVER, b)
                try:
                    r = hop_load(["idle", "--kind", kind, "-n", 10000, "--addr", s.addr,
                                  "--server-pid", s.pid])
                finally:
                    s.stop()
                raw.append({"row": 5, "backend": b, **r})
                if not r.get("available", True):
                    absent = r.get("first_error")
                    break
                if r["failed"]:
                    log(f"5 idle {kind} {b}: {r['failed']} failed ({r['first_error']})")
                idle["kb"][b].add(r["rss_per_conn_bytes"] / 1024)
                idle["thr"][b].add(r["threads_after"])
                if kind == "http":
                    chart_pts[b].setdefault(10000, []).append(r["rss_growth_kb"] / 1024)
                log(f"5 idle {kind} {b}: {r['rss_per_conn_bytes']:.0f} B/conn, "
                    f"{r['threads_after']} threads")
            w = f"10,000 idle {label}"
            table.num = 5
            if absent:
                table.na(w, "server RSS KB/conn; threads", absent)
            else:
                table.add(w, "server RSS growth KB/conn", idle["kb"], 2)
                table.add(w, "server threads", idle["thr"], 0)
        # Memory against idle HTTP connections for the chart: 1k and 5k (10k from above).
        for n in (1000, 5000):
            for _, b in interleave(idle_runs):
                s = Server(SERVER, b)
                try:
                    r = hop_load(["idle", "--kind", "http", "-n", n, "--addr", s.addr,
                                  "--server-pid", s.pid])
                finally:
                    s.stop()
                chart_pts[b].setdefault(n, []).append(r["rss_growth_kb"] / 1024)
        series = []
        for b in BACKENDS:
            pts = ",".join(f"{n}:{statistics.median(v):.2f}"
                           for n, v in sorted(chart_pts[b].items()))
            series += ["--series", f"{b}={pts}"]
        subprocess.run([LOAD, "chart", "--out", a.svg,
                        "--title", "hop: server memory with idle HTTP keep-alive connections",
                        "--xlabel", "idle connections (each did one request)",
                        "--ylabel", "server RSS growth (MiB)", *series], check=True)
        log(f"chart: {a.svg} {series}")

    # 11. idle HTTP/2 connections: a fresh server for each measurement, as in row 5.
    if want(11):
        w = "10,000 idle h2c (prior knowledge; SETTINGS exchanged, one GET /plaintext)"
        for i, b in interleave(idle_runs, h2b):
            if b in no_h2:
                continue
            s = Server(SERVER, b)
            try:
                r = hop_load(["idle", "--kind", "h2", "-n", 10000, "--addr", s.addr,
                              "--server-pid", s.pid])
            finally:
                s.stop()
            raw.append({"row": 11, "backend": b, **r})
            if r["opened"] == 0:
                no_h2[b] = r.get("first_error") or "no connection opened"
                log(f"11 idle h2 {b}: {no_h2[b]}")
                continue
            if r["failed"]:
                log(f"11 idle h2 {b}: {r['failed']} failed ({r['first_error']})")
            if r.get("closed_by_server"):
                log(f"11 idle h2 {b}: the server closed {r['closed_by_server']} (an idle timeout?)")
            idle_h2["kb"][b].add(r["rss_per_conn_bytes"] / 1024)
            idle_h2["thr"][b].add(r["threads_after"])
            idle_h2["added"][b].add(r["threads_after"] - r["threads_before"])
            log(f"11 idle h2 {b}: {r['rss_per_conn_bytes']:.0f} B/conn, threads "
                f"{r['threads_before']} -> {r['threads_after']}")
        table.num = 11
        note = "; ".join(f"{b}: {why}" for b, why in no_h2.items())
        table.add(w, "server RSS growth KB/conn", idle_h2["kb"], 2, note=note)
        table.add(w, "server threads", idle_h2["thr"], 0, note=note)
        table.add(w, "server threads added by the connections", idle_h2["added"], 0, note=note)

    # 12-14. TLS: new handshakes, keep-alive requests and idle connections over HTTPS.
    tls_cells = (None, None, None)
    if want(12) or want(13) or want(14):
        tmp = tempfile.mkdtemp(prefix="hop-tls-")
        try:
            tls_cells = tls_rows(table, raw, runs, idle_runs, warm, secs, want, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    for status, v in ws_rows:
        w = ("WebSocket echo, 100 conns, 64-byte text, raw-frame client (reactor: hop::ws /ws; "
             "tokio: tokio-tungstenite /ws-tungstenite)")
        table.num = 6
        if status == "na":
            table.na(w, "messages/s; p99", v, HOP)
            continue
        burst, v = v
        w += ", ping-pong" if burst == 1 else f", {burst} messages in flight per connection"
        table.add(w, "messages/s", v["mps"])
        table.add(w, "p99 ms" + (" (one burst)" if burst > 1 else ""), v["p99"], 2)
        table.add(w, "server CPU µs/message", v["cpu"], 2)
    for status, v in sse_rows:
        w = "SSE fan-out, 1,000 subscribers"
        table.num = 7
        if status == "na":
            table.na(w, "ms for one event to reach all", v, HOP)
        else:
            table.add(w, "ms for one event to reach all", v["ms"], 2)

    # 8. TCP echo (the seed tcp-echo-servers table).
    echo_rows = []
    if want(8):
        conns = 1000
        ss = {b: Server(ECHO, b) for b in HOP}
        try:
            for reqs in (0, 50, 5, 1):
                m = {k: {b: Cell() for b in HOP} for k in
                     ("rps", "cps", "avg", "min", "max", "p95", "p99", "rss", "usr", "sys")}
                for i, b in interleave(runs, HOP):
                    s = ss[b]
                    hop_load(["echo", "-c", conns, "-r", reqs, "-d", "0.5", "--addr", s.addr])
                    r = hop_load(["echo", "-c", conns, "-r", reqs, "-d", echo_secs,
                                  "--addr", s.addr, "--server-pid", s.pid])
                    raw.append({"row": 8, "backend": b, **r})
                    lat = r["latency"]
                    for k, x in (("rps", r["req_per_s"]), ("cps", r["conn_per_s"]),
                                 ("avg", lat.get("avg_us")), ("min", lat.get("min_us")),
                                 ("max", lat.get("max_us")), ("p95", lat.get("p95_us")),
                                 ("p99", lat.get("p99_us")),
                                 ("rss", r.get("server_max_rss_kb")),
                                 ("usr", r.get("server_cpu_user_s")),
                                 ("sys", r.get("server_cpu_sys_s"))):
                        m[k][b].add(x)
                    log(f"8 echo -r {reqs} {b} run {i + 1}: {r['req_per_s']:,.0f} req/s")
                echo_rows.append((reqs, m))
        finally:
            for s in ss.values():
                s.stop()

    # 9. User-space instructions per keep-alive request and per echoed WebSocket message under
    # callgrind: repeatable where CPU time on a shared VM is not (the kernel's share is not
    # counted).
    if want(9):
        table.num = 9
        w = "under callgrind: plaintext keep-alive (wrk 10 conns); WebSocket ping-pong (100 conns)"
        if not (shutil.which("valgrind") and shutil.which("callgrind_control")):
            table.na(w, "user-space instructions", "valgrind not installed")
        else:
            ir = cells("req", "msg", "req_alloc", "msg_alloc", "req_realloc", "msg_realloc")
            for b in BACKENDS:
                for kind, measure in (("req", callgrind_per_request),
                                      ("msg", callgrind_per_message)):
                    instr, allocs, reallocs = measure(b)
                    ir[kind][b].add(instr)
                    ir[kind + "_alloc"][b].add(allocs)
                    ir[kind + "_realloc"][b].add(reallocs)
                log(f"9 callgrind {b}: {ir['req'][b].v[-1]:,.0f} instructions/req "
                    f"({ir['req_alloc'][b].v[-1]:.2f} allocations), "
                    f"{ir['msg'][b].v[-1]:,.0f} instructions/message "
                    f"({ir['msg_alloc'][b].v[-1]:.2f} allocations)")
            ws = ("WebSocket message (reactor: hop::ws; tokio: tokio-tungstenite; peers: axum's "
                  "WebSocketUpgrade)")
            table.add(w, "user-space instructions/request", ir["req"])
            table.add(w, "heap allocations/request (malloc, calloc, aligned)", ir["req_alloc"], 2)
            table.add(w, "reallocs/request", ir["req_realloc"], 3)
            table.add(w, f"user-space instructions/{ws}", ir["msg"])
            table.add(w, "heap allocations/WebSocket message (malloc, calloc, aligned)",
                      ir["msg_alloc"], 2)
            table.add(w, "reallocs/WebSocket message", ir["msg_realloc"], 3)

    # Output.
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    # The peers with a column in the table.
    peers = [b for b in list(PEERS) + list(TLS_PEERS) if any(b in r[3] for r in table.rows)]
    print(f"### hop: reactor vs tokio backend{' and ' + ', '.join(peers) if peers else ''} "
          f"({'quick' if quick else 'full'} run)\n")
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; {cpu}; "
          f"{os.cpu_count()} cores; Linux {platform.release()}; server on CPU {SERVER_CPU} "
          f"(1 poller / 1 worker), load on CPU {LOAD_CPU}; {secs} s per measurement after a "
          f"{warm} s warm-up; median of {runs} interleaved runs (min–max)"
          f"{'' if idle_runs > 1 else '; idle rows: one run each'}.\n")
    if table.rows:
        print(table.render())
    targets = h2_targets(h2, idle_h2, want(10), want(11))
    if targets:
        print("\n#### HTTP/2 targets (rows 10 and 11: hop's backends against axum-serve's medians)\n")
        print(targets)
    targets = tls_targets(*tls_cells)
    if targets:
        print("\n#### TLS targets (rows 12-14: hop's backends against axum-server's medians)\n")
        print(targets)
    if echo_rows:
        print(f"\n#### 8. TCP echo (examples/echo; `hop-load echo -c {conns} -r R -d {echo_secs}s "
              f"--size 64`; median of {runs})\n")
        print("| -r | backend | req/s | conn/s | avg | min | max | p95 | p99 | max rss KB | "
              "cpu user s | cpu system s |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")

        def us(x):
            if x is None:
                return "n/a"
            return f"{x / 1000:.2f}ms" if x >= 1000 else f"{x:.0f}µs"

        for reqs, m in echo_rows:
            for b in HOP:
                med = {k: m[k][b].median() for k in m}
                print(f"| {reqs or '∞'} | {b} | {fmt(med['rps'], 0)} | {fmt(med['cps'], 0)} | "
                      f"{us(med['avg'])} | {us(med['min'])} | {us(med['max'])} | "
                      f"{us(med['p95'])} | {us(med['p99'])} | {fmt(med['rss'], 0)} | "
                      f"{fmt(med['usr'], 2)} | {fmt(med['sys'], 2)} |")
            print(f"| {reqs or '∞'} | reactor/tokio | {ratio(m['rps']['reactor'], m['rps']['tokio'])} | "
                  f"{ratio(m['cps']['reactor'], m['cps']['tokio'])} | "
                  f"{ratio(m['avg']['reactor'], m['avg']['tokio'])} | | | | "
                  f"{ratio(m['p99']['reactor'], m['p99']['tokio'])} | "
                  f"{ratio(m['rss']['reactor'], m['rss']['tokio'])} | | |")
    # 15. permessage-deflate: a JSON stream (wire bytes, CPU per message) and 16. idle compressed
    # WebSockets, from benches/deflate.py (Python `websockets` is its client and reference).
    if want(15) or want(16):
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        # deflate.py imports this file's helpers as `compare`: this run's, with its port count.
        sys.modules.setdefault("compare", sys.modules[__name__])
        import deflate
        if want(15):
            raw.append({"row": 15, **{k: v for k, v in deflate.row_a(
                1 if quick else runs, 5000 if quick else 10000).items()}})
        if want(16):
            raw.append({"row": 16, "result": {f"{b} deflate={d}": v for (b, d), v in deflate.row_b(
                idle_runs, 1000 if quick else 10000, 12).items()}})
    log(f"total {time.time() - t_start:.0f} s")
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(raw, f)


if __name__ == "__main__":
    try:
        main()
    finally:
        cleanup()
