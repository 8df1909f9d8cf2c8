#!/usr/bin/env bash
# Learning runs for a GPU machine, in one command (from the repository root):
#   benchmarks/learning/gpu_cartpole.sh OUT_DIR [SECONDS]
# DrQ-v2 and TACO at their published settings on cartpole_balance, seeds 1-3, in fp32 and with --amp bf16, to 40k
# frames: all at once, one process per run with one OpenMP thread. A run still going after SECONDS (default 420, so
# that the whole command fits a 10-minute device call) gets SIGTERM, checkpoints at its episode's end and stops; every
# run is then recorded with benchmarks/learning/record.py (its CSV says how far it got) into OUT_DIR/learning, with
# this machine, its CPU count and the commit, and the figure and table drawn there. Copy the CSVs into
# benchmarks/learning/ after review. On the project's lent GPU machine (see the developers' notes):
#   source .whl/on-device.sh && benchmarks/learning/gpu_cartpole.sh "$OUT" 420
# For a smaller set: SCRIPTS, SEEDS, AMPS, FRAMES and EXTRA (more flags for every run) in the environment, e.g. the
# check made on a CPU before committing (4 runs of 2000 tiny frames, stopped after 90 s, then recorded):
#   SEEDS=1 FRAMES=2000 EXTRA="--max-episode-frames 40 --learning-starts 80 --batch-size 8 --hidden-dim 32 \
#     --buffer-size 1000 --eval-every 120 --num-eval-episodes 1" benchmarks/learning/gpu_cartpole.sh /tmp/check 90
set -uo pipefail
out=${1:?usage: benchmarks/learning/gpu_cartpole.sh OUT_DIR [SECONDS]}
seconds=${2:-420}
scripts=${SCRIPTS:-drqv2_continuous_action taco_continuous_action}
seeds=${SEEDS:-1 2 3}
amps=${AMPS:-none bf16}
frames=${FRAMES:-40000}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
mkdir -p "$out/logs" "$out/learning"
out=$(cd "$out" && pwd)
commit=$(git -C "$root" rev-parse --short HEAD)
device=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
device=${device:-CPU $(uname -m)}
echo "gpu_cartpole.sh: commit $commit on $device, $(nproc) CPUs; $frames frames a run, stopped after $seconds s"

pids=()
for script in $scripts; do
  for amp in $amps; do
    for seed in $seeds; do
      name="${script}__amp-${amp}__${seed}"
      # each setting in its own folder, so that --exp-name stays the script's and plot.py groups the runs by --amp
      mkdir -p "$out/$amp"
      # shellcheck disable=SC2086  # EXTRA is a list of flags
      (cd "$out/$amp" && OMP_NUM_THREADS=1 exec python3 "$root/$script.py" --env-id cartpole_balance --seed "$seed" \
        --total-timesteps "$frames" --amp "$amp" --checkpoint-every 10000 ${EXTRA:-} >"$out/logs/$name.log" 2>&1) &
      pids+=($!)
      echo "started $name (pid $!)"
      sleep 1  # run names hold the second they started: one CSV each
    done
  done
done

deadline=$((SECONDS + seconds))
while [ "$SECONDS" -lt "$deadline" ] && [ -n "$(jobs -rp)" ]; do
  sleep 5
done
for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null && echo "time is up: SIGTERM to $pid"; done
wait
for log in "$out"/logs/*.log; do echo "$(basename "$log"): $(grep -E '^(done|stopped|error)' "$log" | tail -n 1)"; done

mapfile -t run_dirs < <(ls -d "$out"/*/runs/* 2>/dev/null)
[ "${#run_dirs[@]}" -gt 0 ] || { echo "gpu_cartpole.sh: no run directory was written"; exit 1; }
python3 "$root/benchmarks/learning/record.py" "${run_dirs[@]}" --commit "$commit" --device "$device" \
  --cpus "$(nproc)" --out "$out/learning"
python3 "$root/benchmarks/learning/record.py" --figure --out "$out/learning" --frames 10000 20000 30000 40000
