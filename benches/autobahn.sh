#!/usr/bin/env bash
# The Autobahn WebSocket testsuite's fuzzing client against the release demo server's `/ws`
# (hop::ws echo, default settings: permessage-deflate on), on one backend:
#
#   benches/autobahn.sh [reactor|tokio] [CASES]     (CASES default: 1-7, 9, 12 and 13)
#
# autobahntestsuite is Python 2 only: this uses a Python 2.7 interpreter (PYTHON2, default
# pyenv's 2.7.18 if present, else python2) to make a virtualenv under target/autobahn with
# `pip install autobahntestsuite`. Prints each case group's counts of each result; the reports
# are in target/autobahn/reports (index.html). Groups 12 and 13 (compression) take about eight
# minutes on a 2-core machine. Not part of the README's test command: compat-tests/tests/
# ws_deflate.rs and ws_fuzz.rs test what it checks.
set -euo pipefail
cd "$(dirname "$0")/.."
backend="${1:-reactor}"
cases="${2:-1.*,2.*,3.*,4.*,5.*,6.*,7.*,9.*,12.*,13.*}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
dir="$CARGO_TARGET_DIR/autobahn"
mkdir -p "$dir"

py2="${PYTHON2:-}"
if [ -z "$py2" ]; then
    for p in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/2.7*/bin/python python2 python2.7; do
        if command -v "$p" >/dev/null 2>&1; then py2="$p"; break; fi
    done
fi
[ -n "$py2" ] || { echo "autobahn.sh: no Python 2.7 (set PYTHON2)" >&2; exit 1; }
if [ ! -x "$dir/venv/bin/wstest" ]; then
    "$py2" -m pip install -q --target "$dir/vtools" "virtualenv<20.22"
    PYTHONPATH="$dir/vtools" "$py2" -m virtualenv -q "$dir/venv"
    "$dir/venv/bin/pip" install -q autobahntestsuite
fi

cargo build --release --quiet --example server
port=19555
"$CARGO_TARGET_DIR/release/examples/server" --backend "$backend" --addr "127.0.0.1:$port" \
    >"$dir/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.1
done

set -f
json_cases=$(printf '"%s",' ${cases//,/ })
set +f
cat >"$dir/fuzzingclient.json" <<EOF
{
  "outdir": "$dir/reports",
  "servers": [{"agent": "hop-$backend", "url": "ws://127.0.0.1:$port/ws"}],
  "cases": [${json_cases%,}],
  "exclude-cases": [],
  "exclude-agent-cases": {}
}
EOF
(cd "$dir" && timeout 3000 venv/bin/wstest -m fuzzingclient -s fuzzingclient.json >wstest.log 2>&1)

python3 - "$dir/reports/index.json" "hop-$backend" <<'EOF'
import collections, json, sys
cases = json.load(open(sys.argv[1]))[sys.argv[2]]
groups = collections.defaultdict(collections.Counter)
bad = []
for case, r in cases.items():
    groups[case.split(".")[0]][r["behavior"]] += 1
    if r["behavior"] in ("FAILED", "UNIMPLEMENTED") or r["behaviorClose"] == "FAILED":
        bad.append((case, r["behavior"], r["behaviorClose"]))
print("| group | " + " | ".join(k for k in ("OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED")) + " |")
print("|---|---|---|---|---|---|")
for g in sorted(groups, key=int):
    c = groups[g]
    print(f"| {g} | " + " | ".join(str(c[k]) for k in ("OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED")) + " |")
for b in sorted(bad):
    print("not passed:", *b)
sys.exit(1 if bad else 0)
EOF
