#!/usr/bin/env bash
# Runs a sweep of agent scripts x tasks x seeds, on this machine or as a Slurm array job, then the plotting step.
# ./benchmark.sh --help tells how.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PYTHON=${PYTHON:-$(python3 -c "import sys; print(sys.executable)")}

SCRIPTS="taco_continuous_action.py drqv2_continuous_action.py"
ENV_IDS="quadruped_run hopper_hop walker_run quadruped_walk cheetah_run finger_turn_hard acrobot_swingup reacher_hard reach_duplo"
NUM_SEEDS=6
FIRST_SEED=1
FRAMES=1000000
FRAMES_GIVEN=0
BUDGET_AFTER_DASHES=0
DISK_CHECK=1
OUT=benchmark
WORKERS=1
PLOT=1
SLURM=0
DRY_RUN=0
PARTITION=""
TIME_LIMIT="48:00:00"
CPUS_PER_RUN=4
GPUS_PER_RUN=1
MEM_PER_RUN="32G"
MAX_CONCURRENT=32
EXTRA_ARGS=()

usage() {
  cat <<EOF
Usage: ./benchmark.sh [options] [-- extra arguments for every run]

Runs every (script, task, seed) of a sweep, then plot.py on the results. By default: the TACO paper's benchmark,
both scripts on its 9 tasks at 1M frames (its table's budget), 6 seeds each.
Ctrl-C, kill (SIGTERM, or another signal that would end it, but SIGKILL) or a closed terminal stops it: each run
finishes its episode and checkpoints (a sweep put in the background by a script ignores Ctrl-C, as bash makes such
jobs do: stop it with kill). Run again, the same command continues each interrupted run from its checkpoint and skips
the finished ones; a run still going (left by a sweep killed with SIGKILL) is not started a second time. The
arguments after -- are checked with the scripts' own checks before anything runs.

Sweep:
  --scripts "A B"        agent scripts (default: $SCRIPTS)
  --env-ids "A B"        tasks (default: the TACO paper's 9 tasks: $ENV_IDS)
  --num-seeds N          seeds per (script, task) (default: $NUM_SEEDS)
  --first-seed N         first seed; seeds are N .. N+num-seeds-1 (default: $FIRST_SEED)
  --frames N             frames per run, passed as --total-timesteps N (default: $FRAMES, the paper's table);
                         "preset" for each task's preset budget (1.1M / 3.1M / 30.1M frames)
  --out DIR              where everything goes: DIR/runs (TensorBoard), DIR/logs (one log per run),
                         DIR/plots (figures and table) (default: $OUT)
  --no-plot              skip the plotting step
  --no-disk-check        launch even if the disk the sweep needs at its peak (printed before launching) is not free
  -- ARGS                passed to every run, e.g. -- --track; not --seed, --env-id or --resume, which the sweep
                         sets for each run, and --total-timesteps only if --frames is left at its default

Local mode (default):
  --workers N            runs at once (default: $WORKERS); each gets OMP_NUM_THREADS = cores / N (a value set
                         before is replaced), of the cores this may use (to leave core 0 free: taskset -c 1-99 ...)

Slurm mode:
  --slurm                submit one array job, one element per run, instead of running here
  --partition P          partition (default: the cluster's default)
  --time T               time limit per run (default: $TIME_LIMIT); two minutes before it a run gets SIGUSR1,
                         finishes its episode, checkpoints and is requeued, and then resumes (--resume auto)
  --cpus N               CPUs per run (default: $CPUS_PER_RUN)
  --gpus N               GPUs per run (default: $GPUS_PER_RUN; 0 for none)
  --mem M                memory per run (default: $MEM_PER_RUN)
  --max-concurrent N     array elements running at once (default: $MAX_CONCURRENT)

  --dry-run              print what would run (local mode: each run's command; Slurm mode: the job script) and
                         start, submit and write nothing

One sweep at a time per --out folder: DIR/sweep.lock names the one running.

Examples:
  ./benchmark.sh --env-ids "cartpole_swingup cheetah_run" --num-seeds 3 --workers 2 -- --total-timesteps 100000
  ./benchmark.sh --slurm --partition gpu --time 24:00:00 -- --total-timesteps 1000000 --track
EOF
}

die() { echo "benchmark.sh: $*" >&2; exit 2; }
shown() {  # a value in a message, on one line: 'value', or quoted for bash if it holds a newline or control character
  if [[ $1 == *[[:cntrl:]]* ]]; then printf '%q' "$1"; else printf "'%s'" "$1"; fi
}
refuse_if_locked() {  # $1: a descriptor open on DIR/sweep.lock; a sweep running on DIR holds a lock on that file
  flock -n "$1" || die "another sweep is running on --out $OUT ($(cat "$OUT/sweep.lock")): one sweep per --out folder"
}
quoted() {  # the words quoted for any POSIX shell (dash reads no $'...'), joined by spaces; plain words as they are
  local word out=()
  for word; do
    if [[ $word =~ ^[A-Za-z0-9_./:=+,@%-]+$ ]]; then out+=("$word"); else out+=("'${word//\'/\'\\\'\'}'"); fi
  done
  printf '%s' "${out[*]}"
}

while [ $# -gt 0 ]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --scripts) SCRIPTS=${2:?}; shift 2 ;;
    --env-ids) ENV_IDS=${2:?}; shift 2 ;;
    --num-seeds) NUM_SEEDS=${2:?}; shift 2 ;;
    --first-seed) FIRST_SEED=${2:?}; shift 2 ;;
    --frames) FRAMES=${2:?}; FRAMES_GIVEN=1; shift 2 ;;
    --no-disk-check) DISK_CHECK=0; shift ;;
    --out) OUT=${2:?}; shift 2 ;;
    --workers) WORKERS=${2:?}; shift 2 ;;
    --no-plot) PLOT=0; shift ;;
    --slurm) SLURM=1; shift ;;
    --partition) PARTITION=${2:?}; shift 2 ;;
    --time) TIME_LIMIT=${2:?}; shift 2 ;;
    --cpus) CPUS_PER_RUN=${2:?}; shift 2 ;;
    --gpus) GPUS_PER_RUN=${2:?}; shift 2 ;;
    --mem) MEM_PER_RUN=${2:?}; shift 2 ;;
    --max-concurrent) MAX_CONCURRENT=${2:?}; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; EXTRA_ARGS=("$@"); break ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done

declare -A FLAG_OF=([NUM_SEEDS]=--num-seeds [FIRST_SEED]=--first-seed [WORKERS]=--workers [CPUS_PER_RUN]=--cpus
  [GPUS_PER_RUN]=--gpus [MAX_CONCURRENT]=--max-concurrent)
for n in "${!FLAG_OF[@]}"; do  # read in decimal (bash reads 010 as octal 8, and 08 not at all)
  [[ ${!n} =~ ^0*([0-9]{1,18})$ ]] || die "${FLAG_OF[$n]} must be a whole number below 10**18, got $(shown "${!n}")"
  printf -v "$n" %d "$((10#${BASH_REMATCH[1]}))"
done
[ "$WORKERS" -ge 1 ] && [ "$NUM_SEEDS" -ge 1 ] || die "--workers and --num-seeds must be at least 1"
[[ $FRAMES =~ ^0*[1-9][0-9]*$|^preset$ ]] || die "--frames must be a positive whole number or 'preset', got $(shown "$FRAMES")"
# The words of --scripts and --env-ids, split as bash splits them, never expanded as file patterns.
read -r -d '' -a SCRIPT_LIST <<< "$SCRIPTS"
read -r -d '' -a TASK_LIST <<< "$ENV_IDS"
[ "${#SCRIPT_LIST[@]}" -gt 0 ] || die "--scripts names no script"
[ "${#TASK_LIST[@]}" -gt 0 ] || die "--env-ids names no task"
for script in "${SCRIPT_LIST[@]}"; do
  case "$script" in
    taco_continuous_action.py | drqv2_continuous_action.py) ;;
    *) die "no agent script $(shown "$script"): --scripts takes taco_continuous_action.py and drqv2_continuous_action.py" ;;
  esac
  [ -f "$ROOT/$script" ] || die "no agent script '$script' in $ROOT"
done
# Slurm mode: every value that goes into the job script, in Slurm's formats. A newline in one would end its #SBATCH
# line and make the rest a command of the job script (and Slurm ignores the #SBATCH lines after a command).
if [ "$SLURM" = 1 ]; then
  for option in "--partition:$PARTITION" "--time:$TIME_LIMIT" "--mem:$MEM_PER_RUN"; do
    [[ ${option#*:} != *[[:cntrl:]]* ]] || die "${option%%:*} holds a newline or a control character: $(shown "${option#*:}")"
  done
  [[ $PARTITION =~ ^([A-Za-z0-9_.-]+(,[A-Za-z0-9_.-]+)*)?$ ]] ||
    die "--partition must be a partition name (letters, digits, '_', '-', '.'; commas between several), got $(shown "$PARTITION")"
  [[ $TIME_LIMIT =~ ^[0-9]+(:[0-9]+){0,2}$|^[0-9]+-[0-9]+(:[0-9]+){0,2}$ ]] ||
    die "--time must be minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS (Slurm's formats), got $(shown "$TIME_LIMIT")"
  [[ $MEM_PER_RUN =~ ^[0-9]+[KMGTkmgt]?$ ]] ||
    die "--mem must be a whole number with an optional K, M, G or T suffix (Slurm's format; M without one), got $(shown "$MEM_PER_RUN")"
  for n in CPUS_PER_RUN MAX_CONCURRENT; do
    [ "${!n}" -ge 1 ] || die "${FLAG_OF[$n]} must be at least 1, got ${!n}"
  done
fi
# The sweep gives each run its task, seed and --resume auto, and its budget unless --frames is left at its default:
# arguments after -- that set them would override them (the agent scripts take --env_id for --env-id too).
for word in "${EXTRA_ARGS[@]}"; do
  flag=${word%%=*}
  case "${flag//_/-}" in
    --seed) die "the arguments after -- set $flag, but the sweep sets each run's seed: use --first-seed and --num-seeds" ;;
    --env-id) die "the arguments after -- set $flag, but the sweep sets each run's task: use --env-ids" ;;
    --resume) die "the arguments after -- set $flag, but the sweep gives every run --resume auto (run it again to continue)" ;;
    --total-timesteps)
      [ "$FRAMES_GIVEN" = 0 ] || die "--frames and $flag after -- both set the budget: give one of them"
      BUDGET_AFTER_DASHES=1 ;;
  esac
done
# One run directory and one log per (script, task, seed): a name listed twice would give two runs the same ones.
for list in "--scripts:${SCRIPT_LIST[*]}" "--env-ids:${TASK_LIST[*]}"; do
  repeated=$(tr ' ' '\n' <<< "${list#*:}" | sort | uniq -d | paste -sd ' ')
  [ -z "$repeated" ] || die "${list%%:*} names $repeated more than once"
done
# Nothing the sweep writes in --out goes through a symbolic link planted there, which would write the link's target.
for path in "$OUT"/{sweep.lock,sweep.sbatch,logs,runs,plots} "$OUT"/logs/* "$OUT"/plots/*; do
  [ ! -L "$path" ] || die "$(shown "$path") is a symbolic link: a sweep writes nothing through one (remove it)"
done
# A sweep running on --out already (its lock is taken below, once the folder may be written).
if [ "$DRY_RUN" = 0 ] && [ -f "$OUT/sweep.lock" ] && exec {probe}< "$OUT/sweep.lock"; then
  refuse_if_locked "$probe"
  exec {probe}<&-
fi
last_seed=$((10#$FIRST_SEED + NUM_SEEDS - 1))
[ ${#FIRST_SEED} -le 10 ] && [ "$last_seed" -lt 4294967296 ] || die "seeds must be below 2**32 (numpy's seeds): --first-seed $FIRST_SEED with --num-seeds $NUM_SEEDS"
# What every run gets after its task and seed: the budget (unless its preset's or set after --), then the arguments
# after --.
RUN_ARGS=("${EXTRA_ARGS[@]}")
[ "$FRAMES" = preset ] || [ "$BUDGET_AFTER_DASHES" = 1 ] || RUN_ARGS=(--total-timesteps "$FRAMES" "${EXTRA_ARGS[@]}")
num_runs=$((${#SCRIPT_LIST[@]} * ${#TASK_LIST[@]} * NUM_SEEDS))
at_once=$WORKERS
[ "$SLURM" = 1 ] && at_once=$MAX_CONCURRENT
[ "$at_once" -lt "$num_runs" ] || at_once=$num_runs
# Before anything runs, is submitted or is written: the task names, checked against the scripts' task list, and the
# disk the sweep needs at its peak (each running run's checkpoint with its full replay, twice while one is written,
# plus the final checkpoints of the others, which leave the replay out), against the space free where --out is.
"$PYTHON" - "$ROOT" "${SCRIPT_LIST[*]}" "${TASK_LIST[*]}" "$num_runs" "$at_once" "$OUT" "$DISK_CHECK" "${RUN_ARGS[@]}" <<'PY'
import contextlib, importlib.util, io, os, shutil, sys

import torch
import tyro

root, scripts, tasks, num_runs, at_once, out, disk_check, *run_args = sys.argv[1:]
modules = {}
for script in scripts.split(" "):  # the words bash split
    spec = importlib.util.spec_from_file_location(script[: -len(".py")], os.path.join(root, script))
    modules[script] = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # tyro looks it up there
    spec.loader.exec_module(modules[script])
unknown = [task for task in tasks.split(" ") if any(task not in module.TASK_PRESET for module in modules.values())]
if unknown:
    sys.exit(f"benchmark.sh: unknown task(s) in --env-ids: {' '.join(unknown)} (python {script} --help lists them)")

ACTION_DIM = 24  # at least any task's (humanoid: 21): an upper bound on the actions' share of the replay


def run_settings(script, task):
    """The settings the script takes from these arguments for this task, as its own command line would; a sweep whose
    runs would all stop on them at once is refused here, in one line, before anything runs."""
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):
            return modules[script].resolve_args(tyro.cli(modules[script].Args, args=["--env-id", task, *run_args]))
    except SystemExit:  # tyro's message, in a box: its first lines, up to the box's first rule
        box = [line.strip("│╭╮╰╯ ") for line in said.getvalue().splitlines()]
        words = " ".join(line for line in box[1:] if line).split("──")[0].split(" Got errors:")[0]
        error = " ".join(words.split()) or "it does not parse them"
    except (modules[script].RunError, ValueError) as refused:
        error = str(refused)
    sys.exit(f"benchmark.sh: {script} on {task} refuses the arguments after --: {error}")


def checkpoint_bytes(script, task):
    """(networks and optimizers, replay) bytes of a full checkpoint of this task's run with these arguments."""
    module = modules[script]
    args = run_settings(script, task)
    if not args.checkpoint_every:
        return 0, 0
    args.compile = False
    args.cudagraphs = False
    with torch.device("meta"):  # sizes only: nothing is allocated
        agent = module.Agent((3 * args.frame_stack, 84, 84), ACTION_DIM, args, torch.device("meta"))
    parts = vars(agent).values()
    modules_ = [part for part in parts if isinstance(part, torch.nn.Module)]
    optimized = [p for part in parts if isinstance(part, torch.optim.Optimizer) for g in part.param_groups for p in g["params"]]
    size = sum(p.numel() * p.element_size() for m in modules_ for p in m.parameters())
    size += 2 * sum(p.numel() * p.element_size() for p in optimized)  # Adam's two moments
    transitions = min(args.buffer_size, args.total_timesteps // args.action_repeat)
    replay = module.ReplayBuffer.memory(transitions, (3, 84, 84), ACTION_DIM) if args.checkpoint_replay else 0
    return size, replay


sizes = [checkpoint_bytes(script, task) for script in modules for task in tasks.split(" ")]
networks = max(size for size, _ in sizes)
full = max(size + replay for size, replay in sizes)
at_once = int(at_once)
need = at_once * 2 * full + (int(num_runs) - at_once) * networks
folder = os.path.abspath(out)
while not os.path.isdir(folder):
    folder = os.path.dirname(folder)
free = shutil.disk_usage(folder).free
finished = int(num_runs) - at_once
others = f"; {networks / 1e9:.2f} GB for each finished run ({finished})" if finished else ""
line = (
    f"disk: up to {need / 1e9:.1f} GB at the sweep's peak (2 checkpoints of up to {full / 1e9:.2f} GB, with the "
    f"replay, while one is written, for each run going at once ({at_once}){others}); {free / 1e9:.1f} GB are "
    f"free in {folder}"
)
print(line, file=sys.stderr)
if need > free and disk_check == "1":
    sys.exit(
        "benchmark.sh: not enough free disk for the sweep: free some, lower --workers (--max-concurrent on Slurm) or "
        "pass -- --no-checkpoint-replay; --no-disk-check launches anyway"
    )
PY
[ $? = 0 ] || exit 2

# The sweep: one line "script task seed" per run.
RUNS=()
for script in "${SCRIPT_LIST[@]}"; do
  for task in "${TASK_LIST[@]}"; do
    for ((seed = FIRST_SEED; seed < FIRST_SEED + NUM_SEEDS; seed++)); do
      RUNS+=("$script $task $seed")
    done
  done
done
N_RUNS="${#RUNS[@]} runs"
[ "${#RUNS[@]}" = 1 ] && N_RUNS="1 run"
[ "$DRY_RUN" = 1 ] || mkdir -p "$OUT/logs" || die "cannot create --out $OUT"
OUT=$(realpath -m "$OUT")
# One sweep at a time on an --out folder: an flock on DIR/sweep.lock, which names its holder. This script alone holds
# it (its runs and the plotting step get it closed), so it is released when this script ends, however it ends, even
# if runs it started go on.
if [ "$DRY_RUN" = 0 ]; then
  exec {LOCK_FD}>> "$OUT/sweep.lock" || die "cannot write $OUT/sweep.lock"
  refuse_if_locked "$LOCK_FD"
  echo "benchmark.sh, process $$ on $HOSTNAME since $(date '+%Y-%m-%d %H:%M:%S')" > "$OUT/sweep.lock"
fi
PLOT_COMMAND=$(quoted "$PYTHON" "$ROOT/plot.py" --runs-dir "$OUT/runs" --out "$OUT/plots")  # for sbatch's /bin/sh too

# ----------------------------------------------------------------------------------------------------------------------
# Slurm mode: one array job, one element per run.
if [ "$SLURM" = 1 ]; then
  job_script="$OUT/sweep.sbatch"
  write_job_script() {
    echo "#!/bin/bash"
    echo "# $N_RUNS of a sweep, one array element each. Written by benchmark.sh."
    echo "#SBATCH --job-name=taco-sweep"
    echo "#SBATCH --array=0-$((${#RUNS[@]} - 1))%$MAX_CONCURRENT"
    [ -n "$PARTITION" ] && echo "#SBATCH --partition=$PARTITION"
    echo "#SBATCH --time=$TIME_LIMIT"
    echo "#SBATCH --cpus-per-task=$CPUS_PER_RUN"
    [ "$GPUS_PER_RUN" -gt 0 ] && echo "#SBATCH --gres=gpu:$GPUS_PER_RUN"
    echo "#SBATCH --mem=$MEM_PER_RUN"
    echo "# its log, DIR/logs/<job>_<element>.log, is set by sbatch's --output on the command line (paths may hold spaces)"
    echo "#SBATCH --open-mode=append         # a requeued element adds to its log"
    echo "#SBATCH --requeue                # a preempted or timed-out element goes back in the queue"
    echo "#SBATCH --signal=B:USR1@120      # two minutes before the time limit, tell this script"
    echo
    echo "# Element i of the array runs line i: script task seed."
    echo "RUNS=("
    printf '  "%s"\n' "${RUNS[@]}"
    echo ")"
    echo 'read -r script task seed <<< "${RUNS[$SLURM_ARRAY_TASK_ID]}"'
    printf 'RUN_ARGS=(%s)\n' "$(quoted "${RUN_ARGS[@]}")"
    echo
    echo "cd $(quoted "$OUT")"
    echo 'export OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK'
    echo 'echo "$(date) element $SLURM_ARRAY_TASK_ID (restart ${SLURM_RESTART_COUNT:-0}): $script $task seed $seed"'
    echo
    echo "# Near the time limit: pass the signal on (the run checkpoints at its episode end), then requeue."
    echo 'requeue() {'
    echo '  echo "$(date) time limit near: requeueing"'
    echo '  kill -USR1 "$run_pid" 2>/dev/null'
    echo '  wait "$run_pid"'
    echo '  scontrol requeue "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"'
    echo '  exit 0'
    echo '}'
    echo 'trap requeue USR1'
    echo "# --resume auto: a requeued element continues from its run's last checkpoint (a new run the first time)"
    echo "$(quoted "$PYTHON") $(quoted "$ROOT")/\$script --env-id \"\$task\" --seed \"\$seed\" --resume auto \"\${RUN_ARGS[@]}\" &"
    echo 'run_pid=$!'
    echo 'wait "$run_pid"  # returns early when USR1 arrives; the trap then takes over'
    echo 'status=$?'
    echo 'echo "$(date) finished with exit code $status"'
    echo 'exit $status'
  }
  if [ "$DRY_RUN" = 1 ]; then
    write_job_script
    echo "# (dry run: would be written to $job_script and submitted with sbatch --output=$OUT/logs/%A_%a.log)" >&2
    exit 0
  fi
  write_job_script > "$job_script"
  command -v sbatch > /dev/null || die "sbatch not found: is this a Slurm login node?"
  job_id=$(sbatch --parsable --output="${OUT//%/%%}/logs/%A_%a.log" "$job_script") || die "sbatch refused $job_script"
  job_id=${job_id%%;*}
  echo "submitted array job $job_id: $N_RUNS, at most $MAX_CONCURRENT at once (job script: $job_script)"
  echo "watch it:   squeue -j $job_id      logs: $OUT/logs/${job_id}_<element>.log"
  if [ "$PLOT" = 1 ]; then
    plot_id=$(sbatch --parsable --dependency=afterany:"$job_id" --job-name=taco-plot --time=01:00:00 \
      --cpus-per-task=1 --output="$OUT/logs/plot_%j.log" --wrap="$PLOT_COMMAND") || die "could not submit the plot job"
    echo "plots:      job ${plot_id%%;*} runs when the sweep ends; or by hand once it is done: $PLOT_COMMAND"
  else
    echo "plots, once the jobs are done: $PLOT_COMMAND"
  fi
  exit 0
fi

# ----------------------------------------------------------------------------------------------------------------------
# Local mode: at most WORKERS runs at once.
cores=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # GNU nproc would report OMP_NUM_THREADS, not the cores
threads=$((cores / WORKERS > 0 ? cores / WORKERS : 1))
replaced=""  # an OMP_NUM_THREADS set before is said to be replaced, not silently
[ -n "${OMP_NUM_THREADS:-}" ] && [ "$OMP_NUM_THREADS" != "$threads" ] && replaced=" (not the $OMP_NUM_THREADS set before)"
declare -A WARNED=()  # the runs' warnings said so far: each once a sweep
declare -A NAME_OF_PID=()
declare -A LOG_START=()  # where this attempt's part of each run's log begins (a log holds every attempt)
FAILED=()
finished=0

stop_children() {
  trap '' PIPE  # a reader of the output gone with the terminal must not end this script before its runs are stopped
  local what="the running runs (each finishes its episode and checkpoints)"
  [ "${#NAME_OF_PID[@]}" = 1 ] && what="the running run (it finishes its episode and checkpoints)"
  echo "benchmark.sh: interrupted; stopping $what" >&2
  for pid in "${!NAME_OF_PID[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null; done
  wait
  echo "benchmark.sh: stopped; the same command continues the sweep from the runs' checkpoints" >&2
  exit 130
}
# Every signal that would end this script unsupervising its runs stops them first (HUP: the terminal closed; the runs,
# in sessions of their own, do not get it; USR1 and the rest: whoever sent them).
trap stop_children HUP INT QUIT ILL TRAP ABRT BUS FPE USR1 SEGV USR2 PIPE ALRM TERM STKFLT XCPU XFSZ VTALRM PROF IO \
  PWR SYS

reap_one() {  # waits for the next run to end and reports it
  local pid status
  wait -n -p pid "${!NAME_OF_PID[@]}"
  status=$?
  finished=$((finished + 1))
  log="$OUT/logs/${NAME_OF_PID[$pid]}.log"
  if [ "$status" = 0 ] && tail -c "+${LOG_START[$pid]}" "$log" | grep -q "nothing to do$"; then
    echo "[$(date +%T)] skipped ($finished/${#RUNS[@]}) ${NAME_OF_PID[$pid]} (finished before)"
  elif [ "$status" = 0 ]; then
    echo "[$(date +%T)] done    ($finished/${#RUNS[@]}) ${NAME_OF_PID[$pid]}"
  else
    echo "[$(date +%T)] FAILED  ($finished/${#RUNS[@]}) ${NAME_OF_PID[$pid]} (exit code $status, log: $log)"
    tail -c "+${LOG_START[$pid]}" "$log" | grep -a '^error: ' | tail -n 1 | sed 's/^/  /'  # the run's own reason
    FAILED+=("${NAME_OF_PID[$pid]}")
  fi
  while IFS= read -r line; do  # a run's warnings (no learning, no GPU, ...), not only in its log
    [ -n "${WARNED[$line]:-}" ] || echo "  $line"
    WARNED[$line]=1
  done < <(tail -c "+${LOG_START[$pid]}" "$log" | grep -a '^warning: ')
  unset "NAME_OF_PID[$pid]" "LOG_START[$pid]"
}

not_started() {  # $1: a run, $2: why it is not started
  finished=$((finished + 1))
  echo "[$(date +%T)] FAILED  ($finished/${#RUNS[@]}) $1 ($2)"
  FAILED+=("$1")
}

if [ "$DRY_RUN" = 1 ]; then
  echo "benchmark.sh (dry run): $N_RUNS, $WORKERS at a time, OMP_NUM_THREADS=$threads$replaced, in $OUT:"
  for run in "${RUNS[@]}"; do
    read -r script task seed <<< "$run"
    words=("$PYTHON" "$ROOT/$script" --env-id "$task" --seed "$seed" --resume auto "${RUN_ARGS[@]}")
    echo "$(quoted "${words[@]}") >> $(quoted "$OUT/logs/${script%.py}__${task}__${seed}.log")"
  done
  [ "$PLOT" = 1 ] && echo "then: $PLOT_COMMAND"
  exit 0
fi
echo "benchmark.sh: $N_RUNS, $WORKERS at a time, OMP_NUM_THREADS=$threads$replaced; output in $OUT"
for run in "${RUNS[@]}"; do
  read -r script task seed <<< "$run"
  while [ "${#NAME_OF_PID[@]}" -ge "$WORKERS" ]; do reap_one; done
  name="${script%.py}__${task}__${seed}"
  # A run holds a lock on its log, the open file it writes to, while it or any process it started lives: a run that a
  # killed sweep left going is found here, and not started a second time beside it.
  if ! exec {RUN_FD}>> "$OUT/logs/$name.log"; then
    not_started "$name" "its log cannot be written"
    continue
  fi
  if ! flock -n "$RUN_FD"; then
    exec {RUN_FD}>&-
    not_started "$name" "still running, left by an earlier sweep: not started again"
    continue
  fi
  log_size=$(stat -c %s "$OUT/logs/$name.log")
  # --resume auto: a run interrupted before continues from its checkpoint, a finished one says "nothing to do".
  # setsid: each run leads its own process group, so Ctrl-C here stops it with all its children.
  (cd "$OUT" && OMP_NUM_THREADS=$threads exec setsid --wait "$PYTHON" "$ROOT/$script" --env-id "$task" --seed "$seed" \
    --resume auto "${RUN_ARGS[@]}" >&"$RUN_FD" 2>&1 {LOCK_FD}>&- {RUN_FD}>&-) &
  exec {RUN_FD}>&-  # the run's copy keeps the lock
  NAME_OF_PID[$!]=$name
  LOG_START[$!]=$((log_size + 1))
  echo "[$(date +%T)] start   $name"
done
while [ "${#NAME_OF_PID[@]}" -gt 0 ]; do reap_one; done

plot_status=0
if [ "$PLOT" = 1 ]; then
  "$PYTHON" "$ROOT/plot.py" --runs-dir "$OUT/runs" --out "$OUT/plots" > "$OUT/logs/plot.log" 2>&1 {LOCK_FD}>&-
  plot_status=$?
  if [ "$plot_status" = 0 ]; then
    echo "plots: $OUT/plots/tasks.png, aggregate.png, results.md"
    grep -a -E '^  (note|warning): ' "$OUT/logs/plot.log"  # what to know before reading them
  else
    echo "the plotting step failed (log: $OUT/logs/plot.log)" >&2
  fi
fi
if [ "${#FAILED[@]}" -gt 0 ]; then
  echo "benchmark.sh: ${#FAILED[@]} of $N_RUNS failed: ${FAILED[*]}" >&2
  exit 1
fi
if [ "${#RUNS[@]}" = 1 ]; then
  echo "benchmark.sh: the run finished"
else
  echo "benchmark.sh: all $N_RUNS finished"
fi
exit "$plot_status"
