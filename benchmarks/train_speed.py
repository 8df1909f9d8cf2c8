# End-to-end training speed: frames per second of short training runs of the agent scripts, updates on and
# evaluations counted, one run at a time. Each (script, flags) runs as a program on a named task; from its TensorBoard
# log this reads
#   - training frames / s: the median of charts/SPS over the episodes after updates start (evaluations excluded),
#   - frames / s with evaluations: frames from the second-to-last evaluation to the last one over the wall time
#     between them (updates on all the way, the last evaluation included),
# and appends a Markdown table, with the commit, the command, the machine and the flags, to benchmarks/RESULTS.md.
#   python benchmarks/train_speed.py --configs "" "--cudagraphs"           # on a GPU machine
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from speed import ROOT, commit, machine, report


@dataclass
class Args:
    scripts: list[str] = field(default_factory=lambda: ["drqv2_continuous_action", "taco_continuous_action"])
    """agent scripts to run (file names without .py)"""
    configs: list[str] = field(default_factory=lambda: [""])
    """flag sets to run each script with, each one string (`""` for the defaults)"""
    env_id: str = "cartpole_balance"
    """the task"""
    total_timesteps: int = 14_000
    """frames per run: `learning_starts` (4000) without updates, then updates every 2 agent steps"""
    eval_every: int = 7_000
    """frames between evaluations; frames / s with evaluations is measured over the last interval"""
    num_eval_episodes: int = 5
    """episodes per evaluation (the scripts' default is 10)"""
    timeout: int = 900
    """seconds a run may take"""
    results: str = os.path.join(ROOT, "benchmarks", "RESULTS.md")
    """Markdown file the results are appended to; empty to only print them"""


def measure(script, flags, args, workdir):
    """Runs one configuration; returns (training frames/s, frames/s with evaluations, wall seconds) or an error."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    command = [sys.executable, os.path.join(ROOT, f"{script}.py"), "--env-id", args.env_id, "--seed", "1"]
    command += ["--total-timesteps", str(args.total_timesteps), "--eval-every", str(args.eval_every)]
    command += ["--num-eval-episodes", str(args.num_eval_episodes), "--checkpoint-every", "0", *shlex.split(flags)]
    start = time.time()
    result = subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=args.timeout, check=False)
    wall = time.time() - start
    if result.returncode != 0:
        return f"failed (exit {result.returncode}): {(result.stderr.strip().splitlines() or ['?'])[-1][:150]}"
    runs = sorted(os.listdir(os.path.join(workdir, "runs")), key=lambda d: os.path.getmtime(f"{workdir}/runs/{d}"))
    events = EventAccumulator(os.path.join(workdir, "runs", runs[-1]), size_guidance={"scalars": 0})
    events.Reload()
    words = shlex.split(flags)
    learning_starts = int(words[words.index("--learning-starts") + 1]) if "--learning-starts" in words else 4000
    lengths = events.Scalars("charts/episodic_length")
    # episodes that began after updates started
    sps = [e.value for e, n in zip(events.Scalars("charts/SPS"), lengths) if e.step - n.value >= learning_starts]
    evaluations = events.Scalars("eval/episodic_return")
    first, last = evaluations[-2], evaluations[-1]
    with_evaluations = (last.step - first.step) / (last.wall_time - first.wall_time)
    return float(np.median(sps)) if sps else float("nan"), with_evaluations, wall, [e.value for e in evaluations]


def main(args: Args):
    os.environ.setdefault("MUJOCO_GL", "egl")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    measured = commit()
    rows = [
        "| script | flags | training frames / s (median over episodes) | frames / s with evaluations | wall s "
        + "| eval returns |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for script in args.scripts:
        for flags in args.configs:
            print(f"{script} {flags or '(defaults)'}: {args.total_timesteps} frames of {args.env_id} ...", flush=True)
            with tempfile.TemporaryDirectory() as workdir:
                outcome = measure(script, flags, args, workdir)
            if isinstance(outcome, str):
                rows.append(f"| {script} | `{flags}` | {outcome} | | | |")
            else:
                training, with_evaluations, wall, returns = outcome
                returns = ", ".join(f"{value:.0f}" for value in returns)
                rows.append(
                    f"| {script} | `{flags}` | {training:.0f} | {with_evaluations:.0f} | {wall:.0f} | {returns} |"
                )
            print(rows[-1], flush=True)
    header = f"## {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {measured}, {device.type}: training\n\n"
    header += f"- command: `python {' '.join(sys.argv)}`\n- machine: {machine(device)}\n"
    header += f"- runs: {args.env_id}, {args.total_timesteps} frames (updates from frame 4000), evaluations of "
    header += f"{args.num_eval_episodes} episodes every {args.eval_every} frames, one run at a time; frames / s with "
    header += "evaluations over the last evaluation interval, the last evaluation included\n\n"
    table = header + "\n".join(rows) + "\n"
    report(table, args.results)


if __name__ == "__main__":
    main(tyro.cli(Args))
