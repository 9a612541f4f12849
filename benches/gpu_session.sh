#!/usr/bin/env bash
# The CUDA (and wgpu-on-Vulkan) checks and figures on the lent GPU machine, which has no Rust
# and no network, and takes at most 64 MiB a call (see the device tool's README).
#
#   bash benches/gpu_session.sh stage        here: stripped binaries and the default model in
#                                            three pieces under .gpu/ (ignored by git)
#   then, on the GPU machine, three calls back to back (it stays warm 30 s after each):
#     carry [".gpu/bin", ".gpu/m1"]  command: bash benches/gpu_session.sh receive m1
#     carry [".gpu/m2"]              command: bash benches/gpu_session.sh receive m2
#     carry [".gpu/m3"]              command: bash benches/gpu_session.sh run m3
#   `run` checks the model's sha256, runs the CUDA tests (required: FLINT_REQUIRE_CUDA=1) and
#   the benchmarks of issue #3, and leaves their output in $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
store=/tmp/flint-gpu
sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

case "${1:-}" in
stage)
  cargo build --release --locked
  test_bin=$(cargo test --release --locked --test cuda --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "cuda": print(m["executable"])')
  rm -rf .gpu && mkdir -p .gpu/bin
  cp target/release/flint "$test_bin" .gpu/bin/ && mv .gpu/bin/"$(basename "$test_bin")" .gpu/bin/cuda-tests
  strip .gpu/bin/flint .gpu/bin/cuda-tests
  model=$(./target/release/flint pull | tail -n 1)
  for i in 1 2 3; do mkdir -p .gpu/m$i; done
  split -n 3 -d -a 1 "$model" .gpu/part
  mv .gpu/part0 .gpu/m1/part && mv .gpu/part1 .gpu/m2/part && mv .gpu/part2 .gpu/m3/part
  du -sh .gpu/*
  ;;
receive)
  mkdir -p "$store/bin"
  [ -d .gpu/bin ] && cp .gpu/bin/* "$store/bin/"
  cp ".gpu/$2/part" "$store/$2"
  ls -la "$store"
  ;;
run)
  cp ".gpu/$2/part" "$store/$2"
  cat "$store/m1" "$store/m2" "$store/m3" > "$store/model.gguf"
  echo "$sha  $store/model.gguf" | sha256sum -c -
  out="${OUT:-$store/out}"; mkdir -p "$out"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv 2>&1 | tee "$out/gpu.csv" || true
  # NVRTC: the toolkit's, wherever it is.
  nvrtc=$(ldconfig -p | awk '/libnvrtc\.so\.1[23] /{print $NF; exit}')
  [ -n "$nvrtc" ] || nvrtc=$(ls /usr/local/cuda*/lib64/libnvrtc.so.1[23] 2>/dev/null | head -n 1)
  [ -n "$nvrtc" ] && export LD_LIBRARY_PATH="$(dirname "$nvrtc")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export FLINT_HOME="$store/home" FLINT_MODEL="$store/model.gguf" FLINT_REQUIRE_CUDA=1 FLINT_REQUIRE_MODEL=1
  flint="$store/bin/flint"
  set +e
  "$store/bin/cuda-tests" --test-threads=1 --nocapture 2>&1 | tee "$out/tests.txt"
  b() { local name=$1; shift; "$flint" bench --backend cuda --peak-gb-s 3350 --json "$@" > "$out/$name.json" 2> "$out/$name.err"; echo "$name: rc=$?"; }
  m=(--model "$store/model.gguf")
  b default "${m[@]}" -p 512,4096 -n 128 -d 0,4096,8000 --reps 3 --ttft 16 --profile 32
  FLINT_CUDA_GRAPHS=0 b default-nographs "${m[@]}" -p 0 -n 128 -d 0 --reps 3 --ttft 0
  FLINT_CUDA_MMA=0 b default-nomma "${m[@]}" -p 512,4096 -n 16 -d 0 --reps 3 --ttft 0
  "$flint" synth --preset smollm2-135m --context 131072 --out "$store/s128k.gguf" > /dev/null
  b ctx128k --model "$store/s128k.gguf" -p 0 -n 32 -d 32768,131000 --skip-prefill --reps 3 --ttft 0 --profile 16
  for t in f16 q4_1; do
    "$flint" synth --preset llama-1b --type $t --out "$store/l1b-$t.gguf" > /dev/null
    b llama1b-$t --model "$store/l1b-$t.gguf" -p 4096 -n 128 -d 0 --reps 3 --ttft 0
  done
  ls -la "$out"
  ;;
*)
  sed -n 2,13p "$0"; exit 2 ;;
esac
