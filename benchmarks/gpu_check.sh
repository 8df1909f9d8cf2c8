#!/usr/bin/env bash
# The GPU checks in one command, for a machine with a CUDA GPU (run from the repository root):
#   benchmarks/gpu_check.sh OUT_DIR
# 1. the tests that need CUDA (the CUDA-graph update against the eager one, bf16 on CUDA, the GPU replay against the
#    CPU replay, --cudagraphs runs end to end);
# 2. benchmarks/speed.py: update time of each speed option, sampling from a CPU and a GPU replay;
# 3. benchmarks/train_speed.py: frames per second of short training runs, default flags and the fastest ones.
# Logs and the two RESULTS tables go to OUT_DIR (append them to benchmarks/RESULTS.md by hand after review).
set -uo pipefail
out=${1:?usage: benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$out"
export MUJOCO_GL=${MUJOCO_GL:-egl} PYTHONUNBUFFERED=1
{ nvidia-smi; echo "nproc: $(nproc)"; python3 -c 'import torch; print("torch", torch.__version__)'; } | tee "$out/machine.txt"
step() { echo "=== $(date -u +%T) $1"; }
step tests
timeout 150 python3 -m pytest tests/test_gpu.py tests/test_speed.py::test_cudagraphs_needs_cuda -q -n 4 2>&1 | tee "$out/tests.log" | tail -25
step speed.py
timeout 150 python3 benchmarks/speed.py --replay-transitions 50000 --results "$out/RESULTS-speed.md" \
  --options default amp-bf16 no-tf32 cudagraphs cudagraphs+amp-bf16 cudagraphs+no-tf32 >"$out/speed.log" 2>&1
tail -30 "$out/speed.log"
step train_speed.py
timeout 110 python3 benchmarks/train_speed.py --total-timesteps 10000 --eval-every 5000 --num-eval-episodes 3 \
  --scripts drqv2_continuous_action --configs "" " --cudagraphs" --results "$out/RESULTS-train.md" >"$out/train.log" 2>&1
timeout 150 python3 benchmarks/train_speed.py --total-timesteps 10000 --eval-every 5000 --num-eval-episodes 3 \
  --scripts taco_continuous_action --configs " --cudagraphs" "" --results "$out/RESULTS-train.md" >>"$out/train.log" 2>&1
grep '^|' "$out/train.log"
step end
