# Learning evidence, recorded with its provenance.
#   python benchmarks/learning/record.py RUN_DIR [RUN_DIR ...] --device "NVIDIA H200" --cpus 16
# writes, for each run directory of an agent script, benchmarks/learning/<run_name>.csv: one row per evaluation with
# the script, the commit, the task, the seed, the frame, the evaluation return, the wall-clock seconds since the run
# started, the device, the CPU count and every flag that differs from the script's defaults for that task. Then
#   python benchmarks/learning/record.py --figure
# draws learning.png: each task's recorded runs over the published DrQ-v2 curves (mean and seed range), a panel for
# each agent and precision (TACO's with the mean of our DrQ-v2 seeds in its precision too), and prints a table of the
# returns at fixed frames for the README, a row per setting and commit with its seeds' returns in turn.
import contextlib
import csv
import glob
import itertools
import os
import re
import subprocess
import sys
import tempfile
import textwrap
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Annotated

import numpy as np
import tyro

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks")]  # plot.py and evaluate_model.py; speed.py
from speed import load_script, processor
from speed_versions import script_at

plot = load_script("plot")
read_reference, read_run = plot.read_reference, plot.read_run

COLUMNS = ["script", "commit", "env_id", "seed", "frame", "eval_return", "wall_seconds", "device", "cpus", "flags"]
KEY = ("script", "env_id", "device", "flags", "seed", "commit")  # a recorded run: the columns of its first row

DOCUMENTED_DEFAULT = plot.DOCUMENTED_DEFAULT  # a field whose docstring says its default: --help shows only that one


@dataclass
class Args:
    """Records learning runs: each run directory's evaluations, with their provenance, as <out>/<run_name>.csv (by
    default into benchmarks/learning/, the project's record); or, with --figure, draws learning.png from those CSVs."""

    run_dirs: tyro.conf.Positional[list[str]] = field(default_factory=list)
    """run directories (runs/<run_name>) to record"""
    commit: Annotated[str | None, DOCUMENTED_DEFAULT] = None
    """commit the runs ran (default: this checkout's HEAD)"""
    device: Annotated[str | None, DOCUMENTED_DEFAULT] = None
    """the device the runs trained on, e.g. "NVIDIA H200" (default: "CPU <this machine's processor>")"""
    cpus: Annotated[int | None, DOCUMENTED_DEFAULT] = None
    """CPUs the runs had (default: this machine's)"""
    figure: bool = False
    """draw learning.png and print the table from every CSV here instead of recording"""
    frames: list[int] = field(default_factory=lambda: [10_000, 20_000, 40_000, 100_000])
    """frames of the table's columns (with --figure)"""
    out: str = HERE
    """folder of the CSVs and the figure"""


NOT_FLAGS = ("env_id", "seed", "resume")  # columns of their own, or how the process started (a sweep's runs all
# start with --resume auto); an exp_name of the run's own is a flag


def non_default_flags(script, hyperparameters: dict) -> str:
    """`--flag value` for every setting of the run that differs from the script's defaults for its task."""
    settings = plot.unpublished(script, hyperparameters, NOT_FLAGS)
    return " ".join(f"--{name.replace('_', '-')} {value}" for name, (value, _) in settings.items())


def algorithm_at(commit: str, name: str) -> str | None:
    """The algorithm hash of the agent script `name` as it was at `commit`; None if there is none to load."""
    with tempfile.TemporaryDirectory() as folder, contextlib.suppress(Exception):  # no such file, or it fails to load
        return script_at(commit, name, folder).ALGORITHM
    return None


def record(args: Args):
    if not args.run_dirs:
        raise plot.Unreadable("nothing to record: give run directories (runs/<run_name>), or --figure to draw")
    commit = (
        args.commit
        or subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    )
    device = args.device or f"CPU {processor()}"
    os.makedirs(args.out, exist_ok=True)
    refused = []
    for run_dir in args.run_dirs:
        try:
            record_run(run_dir, args, commit, device)
        except plot.Unreadable as error:  # that run is not recorded; the others still are
            refused.append(str(error))
    if refused:
        count = f" ({len(refused)} of {len(args.run_dirs)} runs not recorded)" if len(args.run_dirs) > 1 else ""
        raise plot.Unreadable("; ".join(refused) + count)


def record_run(run_dir: str, args: Args, commit: str, device: str):
    """Writes the CSV of one run directory, or raises plot.Unreadable saying why it cannot."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not os.path.isdir(run_dir):
        raise plot.Unreadable(f"{run_dir} is not a folder")
    hyperparameters, frames, values, damaged = read_run(run_dir, "eval/episodic_return")
    if not {"exp_name", "env_id", "seed"} <= set(hyperparameters) or len(frames) == 0:
        hint = (
            " (a folder of runs? give its runs: runs/*)"
            if glob.glob(os.path.join(glob.escape(run_dir), "*", "events.*"))
            else ""
        )
        raise plot.Unreadable(f"{run_dir} is not a run of the agent scripts with evaluations{hint}")
    for name in damaged:
        print(f"record.py: warning: {run_dir}/{name} is cut off or damaged; read up to frame {frames[-1]}")
    events = EventAccumulator(run_dir, size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    start = min(e.wall_time for tag in events.Tags()["tensors"] for e in events.Tensors(tag))
    seconds = {e.step: e.wall_time - start for e in events.Scalars("eval/episodic_return")}
    script = plot.script_of(hyperparameters)
    if script is None:
        raise plot.Unreadable(
            f"{run_dir}: its settings are not those of {' or '.join(sorted(plot.IMPROVEMENT))}: no script to record it"
        )
    if hyperparameters["env_id"] not in script.TASK_PRESET:  # a log's own word: no preset to compare its flags with
        raise plot.Unreadable(f"{run_dir}: its task {hyperparameters['env_id']!r} is not one of {script.__name__}'s")
    algorithm = hyperparameters.get("algorithm")  # logged from 2026-12-07 on
    if algorithm and algorithm != script.ALGORITHM:  # an edited copy is not the script
        other = f"{run_dir} ran other code than this checkout's {script.__name__}.py (algorithm {algorithm})"
        if args.commit is None:
            raise plot.Unreadable(f"{other}: not recorded (a run of another commit: give --commit)")
        if algorithm_at(args.commit, script.__name__) != algorithm:
            raise plot.Unreadable(f"{other}, nor the one at commit {args.commit}: not recorded")
        print(f"record.py: {run_dir} ran {script.__name__}.py of commit {args.commit}, as --commit says")
    flags = non_default_flags(script, hyperparameters)
    path = os.path.join(args.out, f"{os.path.basename(os.path.normpath(run_dir))}.csv")
    machine = [device, args.cpus or os.cpu_count(), flags]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for frame, value in zip(frames, values):
            row = [script.__name__, commit, hyperparameters["env_id"], hyperparameters["seed"], int(frame)]
            writer.writerow([*row, f"{value:.2f}", f"{seconds[frame]:.0f}", *machine])
    print(f"record.py: {run_dir} -> {path} ({len(frames)} evaluations, to frame {frames[-1]})")


def read_records(folder):
    """{(script, env_id, device, flags, seed, commit): (frames, returns)} from every CSV in the folder: two runs of
    the same settings at different commits are two runs."""
    runs = {}
    for path in sorted(glob.glob(os.path.join(glob.escape(folder), "*.csv"))):  # the folder's name is a path
        rows = plot.read_csv(path, {**dict.fromkeys(KEY, str), "seed": int, "frame": int, "eval_return": float})
        key = tuple(rows[0][name] for name in KEY)
        runs[key] = (np.array([r["frame"] for r in rows]), np.array([r["eval_return"] for r in rows]))
    return runs


def figure(args: Args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = read_records(args.out)
    if not runs:
        raise SystemExit(f"record.py: no CSV in {args.out}")
    # a grid of panels, one per task and precision (rows) and agent (columns), each over the published DrQ-v2 curves
    rows = sorted({(key[1], precision(key[3])) for key in runs}, key=lambda row: (row[0], row[1] != "fp32"))
    agents = sorted({key[0] for key in runs}, key=lambda agent: agent != "drqv2_continuous_action")
    fig, axes = plt.subplots(
        len(rows), len(agents), figsize=(6 * len(agents), 5.6 * len(rows)), squeeze=False, sharey=True
    )
    fig.subplots_adjust(hspace=0.9, wspace=0.25)  # room for the legends below the panels
    labels = legend_labels(runs)
    for ax, ((task, amp), agent) in zip(axes.flat, itertools.product(rows, agents)):
        if not any((key[0], key[1], precision(key[3])) == (agent, task, amp) for key in runs):
            ax.set_visible(False)
            continue
        colours = defaultdict(lambda: f"C{len(colours)}")  # noqa: B023 (each panel's own)
        reference = read_reference(os.path.join(ROOT, "reference", "drqv2_curves"), task)
        last = max(int(frames[-1]) for key, (frames, _) in runs.items() if key[1] == task)
        if reference:
            grid, mean, lowest, highest = plot.reference_band(reference, last)
            ax.fill_between(grid, lowest, highest, color="0.85")
            ax.plot(grid, mean, "--", color="0.4", label=f"DrQ-v2 published (mean and range of {len(reference)} seeds)")
        if agent != "drqv2_continuous_action":  # beside another agent: our DrQ-v2 of the same precision, most seeds
            groups = defaultdict(dict)
            for (script, env_id, device, flags, seed, commit), curve in runs.items():
                if (script, env_id, precision(flags)) == ("drqv2_continuous_action", task, amp):
                    groups[(device, flags, commit)][seed] = curve
            if groups:
                (device, flags, commit), seeds = max(groups.items(), key=lambda group: len(group[1]))
                frames = sorted(set.intersection(*(set(f.tolist()) for f, _ in seeds.values())))
                mean = [np.mean([v[list(f).index(frame)] for f, v in seeds.values()]) for frame in frames]
                name = f"DrQ-v2 {amp} (mean)" if len(seeds) > 1 else f"DrQ-v2 {amp}"
                ax.plot(
                    frames, mean, ":", color="k", lw=1.5, label=run_label(name, sorted(seeds), commit, device, flags)
                )
        for (script, env_id, device, flags, seed, commit), (frames, values) in runs.items():
            if (env_id, script, precision(flags)) == (task, agent, amp):
                colour = colours[(script, device, flags, commit)]  # the seeds of one setting share a colour
                marker = "os^Dvp*X"[int(colour[1:]) % 8]  # and a marker: runs that coincide stay visible
                label = labels[(script, env_id, device, flags, seed, commit)]
                ax.plot(frames, values, "-" + marker, ms=9 - int(colour[1:]) % 8, color=colour, label=label, alpha=0.85)
        ax.set_xlim(0, last)
        ax.set_title(f"{task}: {plot.display_name(agent)}, {amp}", fontsize=10)
        plot.figure_style(ax)
        ax.set_ylabel("evaluation return")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=1)
    path = os.path.join(args.out, "learning.png")
    plot.save_figure(fig, path)
    print(f"record.py: wrote {path}")
    print(table(runs, args.frames))


def precision(flags: str) -> str:
    return "--amp bf16" if re.search(r"--amp[= ]bf16", flags) else "fp32"


def legend_labels(runs) -> dict:
    """One legend entry, on the first of them, for the runs of one task that differ only in their seed (one colour
    in the figure); None for the others."""
    seeds = defaultdict(list)
    for script, env_id, device, flags, seed, commit in runs:
        seeds[(script, env_id, device, flags, commit)].append(int(seed))
    labels = {}
    for script, env_id, device, flags, seed, commit in runs:
        group = sorted(seeds.pop((script, env_id, device, flags, commit), []))
        text = run_label(plot.display_name(script), group, commit, device, flags) if group else None
        labels[(script, env_id, device, flags, seed, commit)] = text
    return labels


def run_label(name: str, seeds: list, commit: str, device: str, flags: str) -> str:
    """A legend entry: the runs, their seeds, commit and device, then their flags; wrapped, so legends do not overlap."""
    named = f"seed {seeds[0]}" if len(seeds) == 1 else "seeds " + ", ".join(str(s) for s in seeds)
    text = f"{name}, {named}, {commit}, {device}" + (f"\n({flags})" if flags else "")
    return "\n".join(textwrap.fill(line, 80, break_on_hyphens=False) for line in text.splitlines())


def table(runs, frames) -> str:
    """Markdown: the returns at fixed frames of each setting's recorded runs (one commit's seeds of one setting share
    a row, as "seed 1 / seed 2 / ..."), and the published seeds' minimum, median and maximum at the same frames."""
    lines = [
        "| task | runs | " + " | ".join(plot.format_frames(f) for f in frames) + " |",
        "|" + " --- |" * (2 + len(frames)),
    ]
    for task in sorted({key[1] for key in runs}):
        settings = defaultdict(dict)
        for (script, env_id, device, flags, seed, commit), curve in sorted(runs.items()):
            if env_id == task:
                settings[(script, commit, device, flags)][seed] = curve
        for (script, commit, device, flags), seeds in settings.items():
            cells = []
            for frame in frames:  # "-" for a seed that has no evaluation there; nothing where none has
                at = [f"{v[list(f).index(frame)]:.0f}" if frame in f else "-" for f, v in map(seeds.get, sorted(seeds))]
                cells.append(" / ".join(at) if set(at) != {"-"} else "")
            named = "seed " if len(seeds) == 1 else "seeds "
            named = f"{script}, {named}{' / '.join(map(str, sorted(seeds)))}, commit {commit}, {device}"
            lines.append(f"| {task} | {named}" + (f", `{flags}`" if flags else "") + " | " + " | ".join(cells) + " |")
        reference = read_reference(os.path.join(ROOT, "reference", "drqv2_curves"), task)
        cells = []
        for frame in frames:
            at = [v[list(f).index(frame)] for f, v in reference.values() if frame in f]
            cells.append(f"{np.min(at):.0f} / {np.median(at):.0f} / {np.max(at):.0f}" if at else "")
        seeds = len(reference)
        lines.append(f"| {task} | DrQ-v2 published, {seeds} seeds: min / median / max | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    arguments = tyro.cli(Args)
    try:
        (figure if arguments.figure else record)(arguments)
    except plot.Unreadable as error:  # a log or CSV that does not hold what it should: one line
        raise SystemExit(f"record.py: {error}") from None
