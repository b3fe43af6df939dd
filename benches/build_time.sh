#!/usr/bin/env bash
# What a hello-world app costs to build, against axum's: two one-route crates (axum::serve, and
# hop::serve with hop-serve's default features, or FEATURES), each built in debug from a clean
# target, ROUNDS times (default 2), interleaved. Prints seconds and the crates each one builds.
#
#     benches/build_time.sh
#     FEATURES='"tls"' benches/build_time.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
mkdir -p "$dir/axum/src" "$dir/hop/src"
cat > "$dir/axum/Cargo.toml" <<TOML
[package]
name = "hw-axum"
version = "0.1.0"
edition = "2021"
[dependencies]
axum = "0.8"
tokio = { version = "1", features = ["rt-multi-thread", "macros", "net"] }
TOML
cat > "$dir/axum/src/main.rs" <<'RS'
use axum::{routing::get, Router};
#[tokio::main]
async fn main() -> std::io::Result<()> {
    let app = Router::new().route("/", get(|| async { "Hello, World!" }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    axum::serve(listener, app).await
}
RS
cat > "$dir/hop/Cargo.toml" <<TOML
[package]
name = "hw-hop"
version = "0.1.0"
edition = "2021"
[dependencies]
axum = "0.8"
hop = { package = "hop-serve", path = "$root/hop-serve", features = [${FEATURES:-}] }
TOML
cat > "$dir/hop/src/main.rs" <<'RS'
use axum::{routing::get, Router};
fn main() -> std::io::Result<()> {
    let app = Router::new().route("/", get(|| async { "Hello, World!" }));
    let listener = std::net::TcpListener::bind("127.0.0.1:3000")?;
    hop::serve(listener, app).run()
}
RS
for round in $(seq "${ROUNDS:-2}"); do
    for app in axum hop; do
        cd "$dir/$app"
        cargo fetch -q
        rm -rf target
        start=$(date +%s.%N)
        cargo build -q
        end=$(date +%s.%N)
        crates=$(cargo tree -e normal --prefix none | sed 's/ (\*)//' | sort -u | wc -l)
        echo "$app, round $round: $(python3 -c "print(round($end - $start, 1))") s, $crates crates"
    done
done
