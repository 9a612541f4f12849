#!/usr/bin/env bash
# The test command (README, and .ci/run on a fresh clone): installs what the tests need,
# fetches the real default model with `flint pull`, builds, and runs every test.
# The real model, the Python reference, the Python clients and the browser are required
# here: they fail, never skip.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== installing test dependencies"
# Python: gguf and numpy (the independent references); openai, websockets and selenium (the
# real clients the server tests drive).
python3 -m pip install --quiet --disable-pip-version-check "gguf==0.19.0" "numpy>=1.26" \
  "openai>=1.50" "websockets>=12" "selenium>=4.20"
# Headless Chromium and its driver, for the browser page's test.
if ! [ -x /usr/bin/chromium ] || ! [ -x /usr/bin/chromedriver ]; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends chromium chromium-driver
fi

echo "== building"
cargo build --release --locked --workspace --all-targets

echo "== fetching the default model"
model=$(./target/release/flint pull | tail -n 1)
echo "model: $model"

echo "== tests"
export FLINT_MODEL="$model" FLINT_REQUIRE_MODEL=1 FLINT_REQUIRE_PY=1 FLINT_REQUIRE_BROWSER=1
cargo test --release --locked --workspace -- --nocapture
