#!/usr/bin/env bash
# Side-by-side benchmark: hop's reactor backend against its tokio backend and the peer servers
# (benches/peers: axum-serve and hyper-tuned, in rows 1-5 and 9; axum-serve alone in the HTTP/2
# rows 10 and 11; axum-server over TLS in the TLS rows 12-14), same machine, same run. Rows 15
# and 16 (permessage-deflate: a JSON stream, idle compressed WebSockets) run benches/deflate.py,
# whose client and reference server are Python `websockets`.
#
#   benches/compare.sh [--quick] [--runs N] [--only 1,2,10] [--json-out FILE] [--no-peers]
#                      [--backends reactor,tokio,axum-serve,hyper-tuned,axum-server]
#
# Builds the examples, the peers and hop-load in release mode, then runs benches/compare.py, which
# prints a markdown table (progress on stderr). Needs wrk, taskset (util-linux), python3 and 2+
# CPUs; as root it installs wrk and h2load (nghttp2-client, for row 10) with apt-get when
# missing. --quick takes about 9 minutes once built (about 5 with --no-peers). The capped churn
# row needs root and a cgroup cpu controller; row 9 needs valgrind; the TLS rows 12-14 need the
# openssl CLI, which makes their throwaway certificate (n/a without).
# SSE_PUBLISH=/path (default /sse/broadcast; empty: wait for the server's own events) is POSTed to
# publish the SSE fan-out row's events; RATE=N fixes the rate of the fixed-rate row.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"

if ! command -v wrk >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null
    else
        echo "compare.sh: wrk is missing; install it (Debian/Ubuntu: sudo apt-get install -y wrk)" >&2
        exit 1
    fi
fi
if ! command -v h2load >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nghttp2-client >/dev/null
    else
        echo "compare.sh: h2load is missing, row 10 reads n/a (Debian/Ubuntu:" \
            "sudo apt-get install -y nghttp2-client)" >&2
    fi
fi
for tool in taskset python3; do
    command -v "$tool" >/dev/null 2>&1 || { echo "compare.sh: $tool is missing" >&2; exit 1; }
done
if [ "$(nproc --all)" -lt 2 ]; then
    echo "compare.sh: needs 2 CPUs (server on CPU 0, load on CPU 1)" >&2
    exit 1
fi

cargo build --release --quiet --examples -p hop
cargo build --release --quiet -p hop-load
cargo build --release --quiet -p hop-peers
exec python3 benches/compare.py "$@"
