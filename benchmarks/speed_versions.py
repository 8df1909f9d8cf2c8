"""Seconds per update of an agent script as it is now against the same script at an earlier commit (a change's
"before" and "after"), timed in turn, round after round, in one process, so that both see the same machine:
  python benchmarks/speed_versions.py --before 5f7f1cd --amp bf16

Same weights (seed 0) and the same random batch for both. A setting of the whole process is both versions': the C
allocator's that configure_torch makes from commit ece95c3 on (freed memory kept) applies to a version from before it
too, so that change's own gain is timed by benchmarks/speed.py in separate processes (docs/speed.md). Prints a
Markdown table of medians and the ratio, and appends it, with the commits, the command and the machine, to
benchmarks/RESULTS.md."""

import importlib.util
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch
import tyro
from speed import ROOT, commit, load_script, machine, random_batch, report, timed_in_turn


@dataclass
class Args:
    before: str
    """the commit whose scripts are timed against the working tree's"""
    scripts: list[str] = field(default_factory=lambda: ["drqv2_continuous_action", "taco_continuous_action"])
    """agent scripts to measure (file names without .py)"""
    amp: list[str] = field(default_factory=lambda: ["none", "bf16"])
    """the --amp settings to time, each on its own"""
    batch_size: int = 256
    """batch of the timed updates"""
    rounds: int = 10
    """timed rounds (one update of each version per round), after one warm-up round"""
    results: str = os.path.join(ROOT, "benchmarks", "RESULTS.md")
    """Markdown file the results are appended to; empty to only print them"""


def script_at(commit_id: str, name: str, folder: str):
    """The agent script `name` as it was at `commit_id`, imported under a name of its own."""
    path = os.path.join(folder, f"{name}.py")
    with open(path, "w") as f:
        f.write(
            subprocess.run(
                ["git", "show", f"{commit_id}:{name}.py"], cwd=ROOT, capture_output=True, text=True, check=True
            ).stdout
        )
    spec = importlib.util.spec_from_file_location(f"{name}_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def updater(module, amp: str, batch_size: int, action_dim: int):
    args = module.resolve_args(module.Args(env_id="cheetah_run", batch_size=batch_size, amp=amp))
    module.configure_torch(args)
    torch.manual_seed(0)
    agent = module.Agent((9, 84, 84), action_dim, args, torch.device("cpu"))
    batch = random_batch(module, batch_size, action_dim)
    return lambda: agent.update(batch, step=10_000)


def main(args: Args):
    rev_parse = ["git", "rev-parse", "--short", "--verify", "--quiet", f"{args.before}^{{commit}}"]
    before = subprocess.run(rev_parse, cwd=ROOT, capture_output=True, text=True, check=False)
    if before.returncode != 0:
        sys.exit(f"error: --before {args.before!r} is not a commit of this repository")
    args.before = before.stdout.strip()  # the commit id, which the record keeps meaning
    rows = [
        "| script | --amp | batch | before: s / update | now: s / update | now / before |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    with tempfile.TemporaryDirectory() as folder:
        for name in args.scripts:
            versions = {"before": script_at(args.before, name, folder), "now": load_script(name)}
            for amp in args.amp:
                updates = {label: updater(module, amp, args.batch_size, 6) for label, module in versions.items()}
                print(f"{name}: timing --amp {amp} at batch {args.batch_size} ...", flush=True)
                before, now = timed_in_turn([updates["before"], updates["now"]], args.rounds, torch.device("cpu"))
                rows.append(f"| {name} | {amp} | {args.batch_size} | {before:.3f} | {now:.3f} | {now / before:.2f} |")
                print(rows[-1], flush=True)
    header = (
        f"## {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {commit()} against {args.before}, cpu\n\n"
    )
    header += f"- command: `python {shlex.join(sys.argv)}`\n- machine: {machine(torch.device('cpu'))}\n"
    header += f"- updates: median of {args.rounds} round(s) after one warm-up, each round one update of each version "
    header += "in turn; same weights and random batch\n\n"
    report(header + "\n".join(rows), args.results)


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
