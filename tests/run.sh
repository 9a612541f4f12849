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
  "openai[realtime]==3.57.0" "websockets>=12" "selenium>=4.20"
# Debian packages: g++ (the CUDA simulator's NVRTC compiles kernels with it); headless
# Chromium and its driver (the browser page's test); Verilator,
# Icarus Verilog and yosys (the HDL benches and synthesis); the Vulkan loader and Mesa's
# software Vulkan driver, llvmpipe (the wgpu backend's tests run on it for real).
bash tests/debs.sh g++ chromium chromium-driver verilator iverilog yosys libvulkan1 mesa-vulkan-drivers

# NVRTC of CUDA 13.0 (the GPU machines' version) from PyPI: every CUDA kernel is compiled
# here too, GPU or not. The kernels include no CUDA header, so NVRTC is all they need.
nvrtc_dir="${FLINT_NVRTC_DIR:-$HOME/.cache/flint/nvrtc-13.0.88}"
if [ ! -e "$nvrtc_dir/nvidia/cu13/lib/libnvrtc.so.13" ]; then
  python3 -m pip install --quiet --disable-pip-version-check --target "$nvrtc_dir" "nvidia-cuda-nvrtc==13.0.88"
fi
export LD_LIBRARY_PATH="$nvrtc_dir/nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

# The Codex CLI (its Linux binary ships in the npm package), for the Responses API's
# end-to-end test; cached, as it is large.
codex_dir="$HOME/.cache/flint/codex"
if [ ! -x "$codex_dir/node_modules/.bin/codex" ]; then
  if ! command -v npm >/dev/null; then
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q nodejs npm
  fi
  mkdir -p "$codex_dir"
  (cd "$codex_dir" && npm install --no-audit --no-fund --silent "@openai/codex@0.169.0")
fi
"$codex_dir/node_modules/.bin/codex" --version

echo "== building"
cargo build --release --locked --workspace --all-targets

echo "== fetching the default model"
model=$(./target/release/flint pull | tail -n 1)
echo "model: $model"

echo "== tests"
export FLINT_MODEL="$model" FLINT_REQUIRE_MODEL=1 FLINT_REQUIRE_PY=1 FLINT_REQUIRE_BROWSER=1 FLINT_REQUIRE_WGPU=1 \
  FLINT_REQUIRE_NVRTC=1 FLINT_REQUIRE_CODEX=1
# Mesa's Vulkan wants a runtime directory (it only warns without one).
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"
cargo test --release --locked --workspace -- --nocapture

echo "== the CUDA backend on the CUDA simulator (cudasim/): every CUDA test, required, on a fixed seed"
# Kernels compile with g++ once (cached in ~/.cache/flint/cuda-sim/); the real NVRTC's compile
# test above stays as it is.
FLINT_CUDA_SIM=1 FLINT_REQUIRE_CUDA=1 FLINT_CUDA_SIM_SEED=1 cargo test --release --locked --test cuda --test cudasim -- --nocapture

echo "== the simulator's tests and the kernel op tests on more schedules (seeds)"
for seed in 2 3; do
  FLINT_CUDA_SIM=1 FLINT_REQUIRE_CUDA=1 FLINT_CUDA_SIM_SEED=$seed cargo test --release --locked --test cudasim --test cuda -- --nocapture \
    barriers shuffles atomics dynamic mma graphs matmul_matches attention_matches top_k fused
done

echo "== the CUDA op tests with the simulator's shared-memory race checker"
FLINT_CUDA_SIM=1 FLINT_REQUIRE_CUDA=1 FLINT_CUDA_SIM_SEED=1 FLINT_CUDA_SIM_RACECHECK=1 cargo test --release --locked --test cuda -- --nocapture \
  --skip real_model --skip every_kernel

echo "== HDL benches (Verilator and Icarus, bit-exact against the golden model) and synthesis"
make -C hdl test MODEL="$model" FLINT="$PWD/target/release/flint"
make -C hdl synth

echo "== the VS Code extension (editors/vscode/): type-checked, packaged, its node tests against a real flint serve"
# Node 24 (PyPI) and code-server 4.139.1 for the editor tests, cached in ~/.cache/flint/.
code_server=$(bash editors/vscode/test/setup.sh | tail -n 1)
export PATH="$HOME/.cache/flint/node24-shim:$PATH"
node --version
# npm ci: node_modules stays out of the tree and out of the .vsix.
(cd editors/vscode && npm ci --no-audit --no-fund --loglevel=error && npm run --silent check && npm run --silent package)
FLINT_BIN="$PWD/target/release/flint" FLINT_REQUIRE_VSCODE=1 node --test editors/vscode/test/*.test.mjs

echo "== the extension in a real VS Code (code-server) driven by headless Chromium"
shots=$(mktemp -d)
python3 editors/vscode/test/e2e.py "$code_server" editors/vscode/flint.vsix "$PWD/target/release/flint" "$model" "$shots"
