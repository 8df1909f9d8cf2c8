# The plotting step of a sweep: reads the TensorBoard logs of every run under a folder and writes
#   tasks.png      one panel per task: mean return over seeds and a 95% bootstrap band, against frames,
#                  with the DrQ-v2 authors' published curves overlaid (--reference);
#   aggregate.png  IQM and mean of the normalised return over tasks, with 95% stratified bootstrap bands;
#   results.md     per task and method, return at chosen budgets as mean ± standard error (seeds), the aggregates,
#                  the probability that TACO improves on DrQ-v2 when the sweep holds both, and notes (runs still
#                  going, settings other than the published ones, episodes cut short).
# Runs are grouped by the method (exp_name) and task (env_id) that each run logged in its hyperparameters; runs of
# one method and task whose settings differ (other than the seed and settings that leave the update unchanged), or
# whose script's code differs (the `algorithm` hash the scripts log: an edited copy), are kept apart, the method named
# with the settings that tell them apart.
import contextlib
import csv
import logging
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Annotated

import numpy as np
import tyro

DEFAULT_REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference", "drqv2_curves")
REFERENCE_METHOD = "DrQ-v2 (published)"
# settings that leave what a run learns unchanged (budget, logging, checkpoints, speed options of the same update)
SAME_LEARNING = {"seed", "total_timesteps", "eval_every", "num_eval_episodes", "resume", "track", "wandb_project_name"}
SAME_LEARNING |= {"wandb_entity", "capture_video", "save_model", "checkpoint_every", "checkpoint_replay", "cuda"}
SAME_LEARNING |= {"torch_deterministic", "compile", "cudagraphs", "replay_device", "tf32"}
# (X, Y): results.md gives P(X > Y) when the sweep has runs of both
IMPROVEMENT = ("taco_continuous_action", "drqv2_continuous_action")
# the notes a figure seen alone must name (the notes themselves end results.md)
CAVEATS = {"settings other than the published": "settings other than the published ones"}
CAVEATS |= {"cut episodes short": "episodes cut short", "still running": "runs still going"}
CAVEATS |= {"algorithm=HASH": "runs of other code"}
OUTPUTS = ["results.md", "tasks.png", "tasks.pdf", "aggregate.png", "aggregate.pdf"]  # what it writes in --out

# a field whose docstring says its default: --help shows that one, not "None"
DOCUMENTED_DEFAULT = tyro.conf.arg(help_behavior_hint="")


@dataclass
class Args:
    """The plotting step of a sweep: reads the TensorBoard logs of every run under --runs-dir and writes tasks.png,
    aggregate.png (each with a PDF) and results.md into --out (docs/running.md, "The plotting step")."""

    runs_dir: str = "runs"
    """folder searched (recursively) for run directories holding TensorBoard event files"""
    out: str = "plots"
    """folder for tasks.png, aggregate.png and results.md"""
    tag: str = "eval/episodic_return"
    """the scalar to plot and tabulate"""
    budgets: Annotated[list[int] | None, DOCUMENTED_DEFAULT] = None
    """the table's columns, in frames (default: the most frames all runs of a task reached; evaluations by 1/2, 1/10)"""
    reference: str | None = DEFAULT_REFERENCE
    """folder of published curves (`dmc_<task>.csv`) to overlay and tabulate; `None` for none"""
    score_scale: float = 1000.0
    """returns are divided by this before aggregating over tasks (DeepMind Control returns lie in [0, 1000])"""
    bootstrap_reps: int = 2000
    """bootstrap resamples for the confidence intervals"""
    seed: int = 0
    """seed of the bootstrap"""


# ----------------------------------------------------------------------------------------------------------------------
# Reading


class Unreadable(ValueError):
    """A file that does not hold what it should (a damaged or crafted log, a foreign CSV): one line naming it."""


def parse_hyperparameters(markdown: str, run_dir: str) -> dict:
    """The `|param|value|` table the agent scripts log as text, back into a dict of strings (in a cell, `\\|` is a `|`
    and `\\\\` a backslash of the value). A key given twice is refused: a row added by a value holding a newline must
    not pass for the run's own."""
    table = {}
    cell = r"((?:[^\\|]|\\.)*)"  # up to a | that no backslash escapes
    for line in markdown.split("\n")[2:]:  # lines as the scripts write them (splitlines() also splits at \x1c...)
        row = re.fullmatch(rf"\|{cell}\|{cell}\|", line.strip())
        if not row:  # not a |key|value| row
            continue
        key, value = (re.sub(r"\\(.)", r"\1", text) for text in row.groups())
        if key in table:
            raise Unreadable(f"{run_dir}: its hyperparameters table names {key} twice (a value holding a newline?)")
        table[key] = value
    return table


def read_run(run_dir: str, tag: str):
    """(hyperparameters, frames, values, damaged) of one run: values of `tag` by frame, the last write of a frame
    winning, and the event files that TensorBoard stopped reading early (cut off, or a record failing its CRC)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    damaged = []

    def note(record):  # TensorBoard says of a file it stops reading only in a debug line
        if record.msg.startswith("Truncated record in"):
            damaged.append(os.path.basename(record.args[0]))
        return (
            False  # nothing is shown: a resumed run's log drops the steps after its checkpoint (purge_step), as meant
        )

    logger = logging.getLogger("tensorboard")
    level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addFilter(note)
    try:
        accumulator = EventAccumulator(run_dir, size_guidance={"scalars": 0, "tensors": 0})
        accumulator.Reload()
    finally:
        logger.removeFilter(note)
        logger.setLevel(level)
    hyperparameters = {}
    if "hyperparameters/text_summary" in accumulator.Tags()["tensors"]:
        text = accumulator.Tensors("hyperparameters/text_summary")[0].tensor_proto.string_val[0]
        hyperparameters = parse_hyperparameters(text.decode(errors="replace"), run_dir)
    points = {}
    if tag in accumulator.Tags()["scalars"]:
        points = {event.step: event.value for event in accumulator.Scalars(tag)}
    frames = np.array(sorted(points), dtype=np.int64)
    return hyperparameters, frames, np.array([points[f] for f in frames], dtype=np.float64), damaged


def checkout_script(exp_name: str):
    """This checkout's agent script of that name (beside plot.py) as a module, if it is one and loads."""
    if exp_name not in IMPROVEMENT:  # the two agent scripts: never code a log names
        return None
    try:  # imports torch: only for runs of the agent scripts
        from evaluate_model import RunError, agent_script
    except ImportError:  # plot.py away from the repository: no script to compare with
        return None
    with contextlib.suppress(RunError):
        return agent_script(os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{exp_name}.py"))
    return None


def script_of(hyperparameters: dict):
    """This checkout's agent script that made a run, as a module: the one its exp_name names, else the one whose
    settings are the run's (an --exp-name of the user's); None if neither."""
    if hyperparameters["exp_name"] in IMPROVEMENT:
        return checkout_script(hyperparameters["exp_name"])
    fields = set(hyperparameters) - {"algorithm"}  # the code's hash: not a setting
    return next((s for s in map(checkout_script, IMPROVEMENT) if s and set(vars(s.Args())) == fields), None)


def unpublished(script, hyperparameters: dict, ignored) -> dict:
    """{setting: (the run's value, the published one)} for each setting of a run, but those `ignored`, that differs
    from its script's defaults for its task: the published settings."""
    published = vars(script.resolve_args(script.Args(env_id=hyperparameters["env_id"])))
    return {
        name: (value, str(published[name]))
        for name, value in hyperparameters.items()
        if name in published and name not in ignored and str(published[name]) != value
    }


def still_running(run_dir: str) -> bool:
    """Whether a process holds the run's run.lock (the scripts hold it while they run), read from /proc/locks: taking
    the lock to test it could make a run starting at that moment refuse its own directory."""
    with contextlib.suppress(OSError), open("/proc/locks") as locks:
        inode = os.stat(os.path.join(run_dir, "run.lock")).st_ino
        return any(line.split()[1:2] == ["FLOCK"] and line.split()[5].endswith(f":{inode}") for line in locks)
    return False


def method_names(configurations: dict) -> dict:
    """{run_dir: method name}: the exp_name, plus `(setting=value, ...)` where runs of one exp_name and task differ.
    A run named as one of the agent scripts whose code (algorithm hash) is not this checkout's script's is named by
    its hash, even alone: an edited copy (or another commit's script) is not the script."""
    names, groups = {}, defaultdict(list)
    for run_dir, hyperparameters in configurations.items():
        groups[(hyperparameters["exp_name"], hyperparameters["env_id"])].append(run_dir)
    for (exp_name, _), run_dirs in groups.items():
        settings = [{k: v for k, v in configurations[d].items() if k not in SAME_LEARNING} for d in run_dirs]
        differing = sorted({key for s in settings for key in s if len({t.get(key) for t in settings}) > 1})
        script = checkout_script(exp_name)
        here = script and script.ALGORITHM
        for run_dir, setting in zip(run_dirs, settings):
            algorithm = setting.get("algorithm")  # logged from 2026-12-07 on
            other_code = algorithm != here if here and algorithm else "algorithm" in differing
            shown = sorted({key for key in differing if key != "algorithm"} | ({"algorithm"} if other_code else set()))
            suffix = ", ".join(f"{key}={setting.get(key)}" for key in shown)
            names[run_dir] = f"{exp_name} ({suffix})" if shown else exp_name
    return names


def find_runs(runs_dir: str, tag: str):
    """{(method, task): {seed: (frames, values)}} and the lines telling the user what was read and skipped."""
    runs, report, read = defaultdict(dict), [], {}
    # a walk, not a glob: the folder's name is a path, whatever characters it holds ([, *, ?)
    run_dirs = sorted(
        d for d, _, files in os.walk(runs_dir) if any(f.startswith("events.out.tfevents.") for f in files)
    )
    for run_dir in run_dirs:
        try:
            hyperparameters, frames, values, damaged = read_run(run_dir, tag)
        except Unreadable as error:
            report.append(f"  skipped {error}")
            continue
        if not {"exp_name", "env_id", "seed"} <= set(hyperparameters):
            report.append(f"  skipped {run_dir}: no hyperparameters table (not a run of the agent scripts)")
        elif not hyperparameters["seed"].isdecimal():
            report.append(f"  skipped {run_dir}: its seed {hyperparameters['seed']!r} is not a whole number")
        elif len(frames) == 0:
            report.append(f"  skipped {run_dir}: no {tag}")
        else:
            read[run_dir] = (hyperparameters, frames, values)
        reached = f"; read up to frame {frames[-1]}" if len(frames) else ""
        report += [f"  warning: {run_dir}/{name} is cut off or damaged{reached}" for name in damaged]
    names = method_names({run_dir: hyperparameters for run_dir, (hyperparameters, _, _) in read.items()})
    if any(name != read[d][0]["exp_name"] and "algorithm=" not in name for d, name in names.items()):
        report.append("  note: runs of one method and task with other settings are kept apart (named by them)")
    if any("algorithm=" in name for name in names.values()):
        report.append(
            "  note: algorithm=HASH names runs whose script's code above its run machinery is not this checkout's "
            "(an edited copy, or another commit's): kept apart from the others"
        )
    running = [run_dir for run_dir in read if still_running(run_dir)]
    if running:
        report.append(f"  note: still running, so not final: {', '.join(running)}")
    cut = sorted({h["env_id"] for h, _, _ in read.values() if h.get("max_episode_frames", "None") != "None"})
    if cut:
        report.append(
            f"  note: runs of {', '.join(cut)} cut episodes short (--max-episode-frames): their returns are not "
            "comparable with the published curves"
        )
    unpublished_settings = defaultdict(list)  # {(method, its settings other than the published ones): tasks}
    for run_dir, (hyperparameters, _, _) in read.items():
        script = script_of(hyperparameters)
        if script and hyperparameters["env_id"] in script.TASK_PRESET:
            # the evaluation's episodes too: a return of 2 episodes is not the published mean of 10
            ignored = SAME_LEARNING - {"num_eval_episodes"} | {"exp_name", "max_episode_frames"}
            settings = unpublished(script, hyperparameters, ignored)
            shown = ", ".join(
                f"{name}={value} (published {published})" for name, (value, published) in settings.items()
            )
            if shown and hyperparameters["env_id"] not in unpublished_settings[(names[run_dir], shown)]:
                unpublished_settings[(names[run_dir], shown)].append(hyperparameters["env_id"])
    if unpublished_settings:
        report.append(
            "  note: settings other than the published ones (the script's defaults for the task): "
            + "; ".join(
                f"{method} on {', '.join(sorted(tasks))}: {shown}"
                for (method, shown), tasks in unpublished_settings.items()
            )
        )
    for run_dir, (hyperparameters, frames, values) in read.items():
        key = (names[run_dir], hyperparameters["env_id"])
        seed = int(hyperparameters["seed"])
        if seed in runs[key]:  # a repeated seed (a re-run): keep the run that got furthest
            report.append(f"  note: {key[0]} {key[1]} seed {seed} appears twice; keeping the longer run")
            if runs[key][seed][0][-1] >= frames[-1]:
                continue
        runs[key][seed] = (frames, values)
        report.append(f"  read {run_dir}: {key[0]} {key[1]} seed {seed}, {len(frames)} points to frame {frames[-1]}")
    return dict(runs), report


def read_csv(path: str, columns: dict) -> list:
    """The rows of a CSV file, with these columns converted ({name: type}); Unreadable, naming the first problem, for
    a file without rows, a missing value, or one that is not of its type."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise Unreadable(f"cannot read {path} ({error})") from error
    if not rows:
        raise Unreadable(f"{path} holds no rows (a header only, or nothing)")
    for number, row in enumerate(rows, 1):
        for name, kind in columns.items():
            if row.get(name) is None:  # no such column, or a short row
                raise Unreadable(f"{path}: row {number} has no {name} (the columns it needs: {', '.join(columns)})")
            try:
                row[name] = kind(row[name])
            except (ValueError, OverflowError):  # "", "x"; a frame of "inf"
                raise Unreadable(f"{path}: row {number} has {name} {row[name]!r}, not a number") from None
    return rows


def read_reference(reference_dir: str | None, task: str):
    """{seed: (frames, returns)} of the published curves of a task, or {} if there are none."""
    path = os.path.join(reference_dir or "", f"dmc_{task}.csv")
    if not reference_dir or not os.path.exists(path):
        return {}
    by_seed = defaultdict(list)
    for row in read_csv(path, {"seed": int, "frame": lambda frame: int(float(frame)), "episode_reward": float}):
        by_seed[row["seed"]].append((row["frame"], row["episode_reward"]))
    return {seed: tuple(np.array(column) for column in zip(*sorted(points))) for seed, points in by_seed.items()}


# ----------------------------------------------------------------------------------------------------------------------
# Statistics


def iqm(x: np.ndarray) -> float:
    """Interquartile mean: the mean of the middle 50% (as scipy's trim_mean(x, 0.25), which rliable uses)."""
    x = np.sort(np.ravel(x))
    cut = int(0.25 * len(x))
    return float(x[cut : len(x) - cut].mean())


def bootstrap_ci(samples_by_group, statistic, reps, rng):
    """95% percentile interval of statistic(pooled samples), resampling within each group (stratified bootstrap;
    with one group, the plain bootstrap)."""
    estimates = [
        statistic(np.concatenate([g[rng.integers(0, len(g), len(g))] for g in samples_by_group])) for _ in range(reps)
    ]
    return np.percentile(estimates, [2.5, 97.5])


def probability_of_improvement(x_by_task, y_by_task) -> float:
    """P(X > Y) as rliable defines it: for each task, the chance that a run of X scores above a run of Y (ties count
    one half: the Mann-Whitney U statistic over n x m), averaged over the tasks."""
    per_task = []
    for x, y in zip(x_by_task, y_by_task):
        x, y = np.asarray(x)[:, None], np.asarray(y)[None, :]
        per_task.append(((x > y).sum() + 0.5 * (x == y).sum()) / (x.size * y.size))
    return float(np.mean(per_task))


def probability_of_improvement_ci(x_by_task, y_by_task, reps, rng):
    """95% percentile interval of P(X > Y), resampling the runs of each method within each task."""

    def resample(groups):
        return [g[rng.integers(0, len(g), len(g))] for g in map(np.asarray, groups)]

    estimates = [probability_of_improvement(resample(x_by_task), resample(y_by_task)) for _ in range(reps)]
    return np.percentile(estimates, [2.5, 97.5])


def value_at(frames, values, budget):
    """The last value at or before `budget`, if the run reached the budget; None otherwise."""
    if len(frames) == 0 or frames[-1] < budget:
        return None
    return float(values[np.searchsorted(frames, budget, side="right") - 1])


def curve(seeds: dict, rng, reps):
    """Frames, mean over the seeds that reached each frame, and a 95% bootstrap band."""
    frames = np.array(sorted({int(f) for fs, _ in seeds.values() for f in fs}))
    means, lows, highs = [], [], []
    for frame in frames:
        at_frame = np.array([v[fs == frame][0] for fs, v in seeds.values() if frame in fs])
        low, high = bootstrap_ci([at_frame], np.mean, reps, rng) if len(at_frame) > 1 else (at_frame[0],) * 2
        means.append(at_frame.mean())
        lows.append(low)
        highs.append(high)
    return frames, np.array(means), np.array(lows), np.array(highs)


# ----------------------------------------------------------------------------------------------------------------------
# Outputs


def format_frames(frames: int) -> str:
    if frames >= 1_000_000 and frames % 100_000 == 0:
        return f"{frames / 1_000_000:g}M"
    return f"{frames / 1000:g}k" if frames >= 1000 and frames % 100 == 0 else str(frames)


def format_cell(values: list) -> str:
    """mean ± standard error (n seeds) of the values that exist; missing runs are named, never counted as zero."""
    present = [v for v in values if v is not None]
    missing = len(values) - len(present)
    if not present:
        return f"– (none of {len(values)} reached it)"
    cell = f"{np.mean(present):.1f} ({len(present)})"  # one seed: no standard error
    if len(present) > 1:
        cell = f"{np.mean(present):.1f} ± {np.std(present, ddof=1) / np.sqrt(len(present)):.1f} ({len(present)})"
    return cell + (f", {missing} short of budget" if missing else "")


def write_table(runs, references, args, rng) -> str:
    methods = sorted({method for method, _ in runs})
    tasks = sorted({task for _, task in runs})
    header = "| task | method | " + " | ".join(f"{format_frames(b)} frames" for b in args.budgets) + " |"
    said = f"Return ({args.tag}) at each budget (each run's last evaluation at or before it): mean ± standard error"
    lines = [f"{said} (seeds).", "", header]
    lines.append("|" + " --- |" * (2 + len(args.budgets)))
    for task in tasks:
        rows = [(m, runs[(m, task)]) for m in methods if (m, task) in runs]
        if references.get(task):
            rows.append((REFERENCE_METHOD, references[task]))
        for method, seeds in rows:
            cells = [format_cell([value_at(f, v, b) for f, v in seeds.values()]) for b in args.budgets]
            for column, budget in enumerate(args.budgets):  # evaluated earlier (the published curves: every 20k)
                latest = max((f[f <= budget][-1] for f, _ in seeds.values() if len(f) and f[-1] >= budget), default=0)
                if latest != budget and not cells[column].startswith("–"):
                    cells[column] += f", at {format_frames(int(latest))} frames"
            lines.append(f"| {task} | {method} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Aggregate over tasks of return / {args.score_scale:g}: point estimate [95% stratified bootstrap CI].",
        "",
    ]
    lines += ["| method | statistic | " + " | ".join(f"{format_frames(b)} frames" for b in args.budgets) + " |"]
    lines.append("|" + " --- |" * (2 + len(args.budgets)))
    for method in methods:
        for name, statistic in [("IQM", iqm), ("mean", np.mean)]:
            cells = []
            for budget in args.budgets:
                groups = aggregate_groups(runs, method, tasks, budget, args.score_scale)
                if groups is None:
                    cells.append("– (a task has no run at this budget)")
                    continue
                low, high = bootstrap_ci(groups, statistic, args.bootstrap_reps, rng)
                cells.append(f"{statistic(np.concatenate(groups)):.3f} {interval(groups, low, high)}")
            lines.append(f"| {method} | {name} | " + " | ".join(cells) + " |")
    if all(any(m == method for m, _ in runs) for method in IMPROVEMENT):
        lines += improvement_table(runs, args, rng)
    return "\n".join(lines) + "\n"


def interval(groups: list, low: float, high: float) -> str:
    """A 95% interval, or why there is none: from one seed a task, a bootstrap resamples nothing."""
    return "(one seed a task: no interval)" if max(map(len, groups)) == 1 else f"[{low:.3f}, {high:.3f}]"


def improvement_table(runs, args, rng) -> list:
    """Lines of results.md: P(X > Y) at each budget over the tasks where both methods have runs that reached it."""
    x, y = IMPROVEMENT
    explanation = (
        f"Probability of improvement P({x} > {y}) (rliable's definition): the chance that a run of the first scores "
        "above a run of the second on a task, averaged over the tasks where both reached the budget; [95% stratified "
        "bootstrap CI]."
    )
    budgets = " | ".join(f"{format_frames(b)} frames" for b in args.budgets)
    lines = ["", explanation, "", f"| comparison | {budgets} |", "|" + " --- |" * (1 + len(args.budgets))]
    cells = []
    for budget in args.budgets:
        x_by_task, y_by_task = [], []
        for task in sorted({t for _, t in runs}):
            xs = [value_at(f, v, budget) for f, v in runs.get((x, task), {}).values()]
            ys = [value_at(f, v, budget) for f, v in runs.get((y, task), {}).values()]
            xs, ys = [v for v in xs if v is not None], [v for v in ys if v is not None]
            if xs and ys:
                x_by_task.append(xs)
                y_by_task.append(ys)
        if not x_by_task:
            cells.append("– (no task where both reached it)")
            continue
        low, high = probability_of_improvement_ci(x_by_task, y_by_task, args.bootstrap_reps, rng)
        estimate = probability_of_improvement(x_by_task, y_by_task)
        cells.append(f"{estimate:.3f} {interval(x_by_task + y_by_task, low, high)} ({plural(len(x_by_task), 'task')})")
    return [*lines, f"| P({x} > {y}) | " + " | ".join(cells) + " |"]


def aggregate_groups(runs, method, tasks, budget, scale):
    """Per task, the normalised values of the runs that reached `budget`; None if some task has none."""
    groups = []
    for task in tasks:
        values = [value_at(f, v, budget) for f, v in runs.get((method, task), {}).values()]
        values = [v / scale for v in values if v is not None]
        if not values:
            return None
        groups.append(np.array(values))
    return groups


DISPLAY_NAMES = {"taco_continuous_action": "TACO", "drqv2_continuous_action": "DrQ-v2"}
Y_LABELS = {"eval/episodic_return": "evaluation return", "charts/episodic_return": "training episode return"}


def display_name(method: str) -> str:
    """The method's name for a figure: TACO or DrQ-v2 for the two scripts, with the settings that tell runs apart."""
    exp_name, _, settings = method.partition(" (")
    return DISPLAY_NAMES.get(exp_name, exp_name) + (f" ({settings}" if settings else "")


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def figure_style(ax):
    """Axis labels in words, frames as 100k / 1M."""
    import matplotlib.ticker

    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: format_frames(int(x)) if x else "0"))
    ax.set_xlabel("environment frames")
    ax.grid(alpha=0.3)


def save_figure(fig, path, caveat: str = ""):
    """PNG at print resolution, and a PDF beside it; a caveat above the panels, for a figure seen without its notes."""
    if caveat:
        fig.suptitle(caveat, y=1.02, fontsize=8, color="C3")
    fig.savefig(path, dpi=300, bbox_inches="tight")
    fig.savefig(os.path.splitext(path)[0] + ".pdf", bbox_inches="tight")


def covering(seeds: dict, max_frame: int) -> dict:
    """The published curves {seed: (frames, returns)} up to the first published frame at or past max_frame, so that
    they span the frames the runs cover."""
    frames = np.array(sorted({int(f) for fs, _ in seeds.values() for f in fs}))
    beyond = frames[frames >= max_frame]
    last = beyond[0] if len(beyond) else frames[-1]
    return {seed: (fs[fs <= last], vs[fs <= last]) for seed, (fs, vs) in seeds.items() if fs[0] <= last}


def reference_band(seeds: dict, max_frame: int):
    """(frames, mean, lowest, highest) over the published seeds, over the frames the runs cover."""
    seeds = covering(seeds, max_frame)
    frames = np.array(sorted({int(f) for fs, _ in seeds.values() for f in fs}))
    values = [np.array([v[fs == frame][0] for fs, v in seeds.values() if frame in fs]) for frame in frames]
    means = np.array([v.mean() for v in values])
    lowest = np.array([v.min() for v in values])
    highest = np.array([v.max() for v in values])
    return frames, means, lowest, highest


def plot_tasks(runs, references, args, rng, path, caveat):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = sorted({method for method, _ in runs})
    tasks = sorted({task for _, task in runs})
    columns = min(3, len(tasks))
    rows = -(-len(tasks) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.3 * rows), squeeze=False)
    colours = {m: f"C{i}" for i, m in enumerate(methods)}
    handles = {}
    for ax, task in zip(axes.flat, tasks):
        max_frame = max(int(f[-1]) for m in methods if (m, task) in runs for f, _ in runs[(m, task)].values())
        for method in methods:
            if (method, task) not in runs:
                continue
            seeds = runs[(method, task)]
            frames, mean, low, high = curve(seeds, rng, args.bootstrap_reps)
            (line,) = ax.plot(frames, mean, color=colours[method])
            ax.fill_between(frames, low, high, color=colours[method], alpha=0.2)
            handles.setdefault(display_name(method), line)
        if references.get(task):
            frames, mean, low, high = reference_band(references[task], max_frame)
            (line,) = ax.plot(frames, mean, "--", color="0.3")
            ax.fill_between(frames, low, high, color="0.5", alpha=0.15)
            handles.setdefault(f"{REFERENCE_METHOD}: mean and range of its seeds", line)
            published = sorted({int(f) for fs, _ in references[task].values() for f in fs if f > 0})
            if published and published[0] > max_frame:
                note = f"published evaluations: 0, then {format_frames(published[0])}"
                ax.text(0.02, 0.95, note, transform=ax.transAxes, fontsize=8, va="top", color="0.3")
        ax.set_xlim(0, max_frame)
        counts = ", ".join(
            f"{display_name(m)}: {plural(len(runs[(m, task)]), 'seed')}" for m in methods if (m, task) in runs
        )
        ax.set_title(f"{task}\n({counts})", fontsize=10)
        figure_style(ax)
        ax.set_ylabel(Y_LABELS.get(args.tag, args.tag))
    for ax in list(axes.flat)[len(tasks) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.legend(
        handles.values(), handles.keys(), loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(len(handles), 3)
    )
    save_figure(fig, path, caveat)
    plt.close(fig)


def aggregate_curve(runs_of_task, tasks, statistic, args, rng):
    """(frames, estimate, low, high) of `statistic` over tasks of normalised returns, at every frame all tasks
    reached, from {task: {seed: (frames, values)}}."""
    runs = {("m", task): seeds for task, seeds in runs_of_task.items()}
    frames = sorted({int(f) for seeds in runs_of_task.values() for fs, _ in seeds.values() for f in fs})
    points = []
    for frame in frames:
        groups = aggregate_groups(runs, "m", tasks, frame, args.score_scale)
        if groups is not None:
            low, high = bootstrap_ci(groups, statistic, max(args.bootstrap_reps // 4, 100), rng)
            points.append((frame, statistic(np.concatenate(groups)), low, high))
    return tuple(map(np.array, zip(*points))) if points else None


def plot_aggregate(runs, references, args, rng, path, caveat):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = sorted({method for method, _ in runs})
    tasks = sorted({task for _, task in runs})
    max_frame = max(int(f[-1]) for seeds in runs.values() for f, _ in seeds.values())
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.3))
    handles = {}
    for ax, (name, statistic) in zip(axes, [("IQM", iqm), ("mean", np.mean)]):
        for i, method in enumerate(methods):
            points = aggregate_curve(
                {t: runs[(method, t)] for t in tasks if (method, t) in runs}, tasks, statistic, args, rng
            )
            if points is not None:
                frames, estimate, low, high = points
                (line,) = ax.plot(frames, estimate, color=f"C{i}")
                ax.fill_between(frames, low, high, color=f"C{i}", alpha=0.2)
                handles.setdefault(display_name(method), line)
        if references and all(references.get(task) for task in tasks):
            covered = {task: covering(references[task], max_frame) for task in tasks}
            points = aggregate_curve(covered, tasks, statistic, args, rng)
            if points is not None:
                frames, estimate, low, high = points
                (line,) = ax.plot(frames, estimate, "--", color="0.3")
                ax.fill_between(frames, low, high, color="0.5", alpha=0.15)
                handles.setdefault(REFERENCE_METHOD, line)
        ax.set_xlim(0, max_frame)
        ax.set_title(f"{name} over {plural(len(tasks), 'task')}", fontsize=10)
        figure_style(ax)
        ax.set_ylabel(f"{Y_LABELS.get(args.tag, args.tag)} / {args.score_scale:g}")
    fig.tight_layout()
    fig.legend(
        handles.values(), handles.keys(), loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(len(handles), 3)
    )
    save_figure(fig, path, caveat)
    plt.close(fig)


def budgets_of(runs) -> list[int]:
    """The largest frame all runs of one task reached, every method's (the best covered task), and the evaluations of
    all those runs nearest below a half and a tenth of it (frame 0 left out)."""
    by_task = defaultdict(list)
    for (_, task), seeds in runs.items():
        by_task[task] += [{int(frame) for frame in frames} for frames, _ in seeds.values()]
    best = max(by_task.values(), key=lambda runs_frames: min(max(f) for f in runs_frames))
    reached = min(max(f) for f in best)
    common = set.intersection(*best)
    return sorted({max((f for f in common if f <= reached // part), default=0) for part in (10, 2, 1)} - {0}) or [0]


def unwritable(folder: str) -> str | None:
    """Why `folder` cannot be written or made, or None. os.access lets root write whatever the permission bits say,
    but not on a read-only file system."""
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def check_args(args: Args):
    """One line and a non-zero exit for settings that cannot work, before anything is read."""
    problems = []
    if not os.path.isdir(args.runs_dir):
        problems.append(f"--runs-dir {args.runs_dir}: no such folder")
    out_problem = unwritable(args.out)
    if out_problem:
        problems.append(f"--out {args.out} cannot be written: {out_problem}")
    links = [name for name in OUTPUTS if os.path.islink(os.path.join(args.out, name))]
    if links:
        problems.append(f"{os.path.join(args.out, links[0])} is a symbolic link, which plot.py does not write through")
    if args.reference is not None and not os.path.isdir(args.reference):
        problems.append(f"--reference {args.reference}: no such folder (--reference None: no published curves)")
    if args.bootstrap_reps < 1:
        problems.append(f"--bootstrap-reps must be at least 1, got {args.bootstrap_reps}")
    if not (np.isfinite(args.score_scale) and args.score_scale > 0):
        problems.append(f"--score-scale must be positive, got {args.score_scale}")
    if args.budgets is not None and min(args.budgets, default=0) < 1:
        problems.append(f"--budgets must be positive frames, got {args.budgets}")
    if problems:
        raise SystemExit(f"plot.py: {'; '.join(problems)}")


def main(args: Args):
    check_args(args)
    runs, report = find_runs(args.runs_dir, args.tag)
    directories = sum(line.startswith(("  read ", "  skipped ")) for line in report)  # the other lines are notes
    print(f"plot.py: {directories} run director{'y' if directories == 1 else 'ies'} under {args.runs_dir}")
    print("\n".join(report))
    if not runs:
        raise SystemExit(f"plot.py: no run under {args.runs_dir} has {args.tag}; nothing to plot")
    if args.budgets is None:
        args.budgets = budgets_of(runs)
        print(f"plot.py: budgets {', '.join(format_frames(b) for b in args.budgets)} frames, from the runs (--budgets)")
    rng = np.random.default_rng(args.seed)
    references = {}
    if args.tag == "eval/episodic_return":  # the published curves are evaluation returns
        try:
            references = {task: read_reference(args.reference, task) for _, task in runs}
        except Unreadable as error:
            raise SystemExit(f"plot.py: {error}") from None
    os.makedirs(args.out, exist_ok=True)
    table = write_table(runs, references, args, rng)
    notes = [line.strip() for line in report if line.startswith(("  note: ", "  warning: "))]  # read with the table
    table += "".join(f"\n- {note}" for note in notes) + ("\n" if notes else "")
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table)
    caveats = [short for key, short in CAVEATS.items() if any(key in note for note in notes)]
    caveat = f"Read with the notes of results.md: {', '.join(caveats)}" if caveats else ""
    plot_tasks(runs, references, args, rng, os.path.join(args.out, "tasks.png"), caveat)
    plot_aggregate(runs, references, args, rng, os.path.join(args.out, "aggregate.png"), caveat)
    print(table)
    print(f"plot.py: wrote {args.out}/tasks.png, {args.out}/aggregate.png and {args.out}/results.md")


if __name__ == "__main__":
    main(tyro.cli(Args))
