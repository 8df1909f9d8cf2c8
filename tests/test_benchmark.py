"""The sweep (benchmark.sh, here and on a real one-node Slurm cluster) and the plotting step (plot.py)."""

import contextlib
import csv
import fcntl
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, TINY_RUN, default_signals, load_script, read_scalars

plot = load_script("plot")
REFERENCE = ROOT / "reference" / "drqv2_curves"


def write_run(run_dir, hyperparameters, points, tag="eval/episodic_return"):
    """A TensorBoard run as the agent scripts write it: the hyperparameters table and scalars of `tag`."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run_dir))
    table = "\n".join(f"|{key}|{value}|" for key, value in hyperparameters.items())
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + table)
    for frame, value in points:
        writer.add_scalar(tag, value, frame)
    writer.close()


def returns(seed, task_offset, frames):
    return [(f, task_offset + 100 * seed + f / 2000) for f in frames]


@pytest.fixture(scope="module")
def synthetic_runs(tmp_path_factory):
    """Two methods (one with underscores in its name) x two tasks (underscores too) x seeds; the method "a__b" has
    one seed that stopped at 500k frames; plus a run with no evaluation and a folder that is not a run."""
    root = tmp_path_factory.mktemp("synthetic") / "runs"
    full, short = range(0, 1_000_001, 100_000), range(0, 500_001, 100_000)
    layout = {"a__b": {"cheetah_run": [1, 2, 3], "finger_turn_hard": [1, 2, 3]}, "c": {"cheetah_run": [1, 2]}}
    for method, tasks in layout.items():
        for offset, (task, seeds) in enumerate(tasks.items()):
            for seed in seeds:
                frames = short if (method, task, seed) == ("a__b", "finger_turn_hard", 3) else full
                run = root / f"x_{method}_{task}_{seed}"  # names that a split on underscores would misread
                write_run(run, {"exp_name": method, "env_id": task, "seed": seed}, returns(seed, offset * 10, frames))
    hyper = {"exp_name": "c", "env_id": "cheetah_run", "seed": 9}
    write_run(root / "no_eval", hyper, [(0, 1.0)], tag="charts/episodic_return")
    write_run(root / "not_a_run", {}, [(0, 1.0)])
    return root


def expected_cell(values):
    mean, se = np.mean(values), np.std(values, ddof=1) / np.sqrt(len(values))
    return f"{mean:.1f} ± {se:.1f} ({len(values)})"


def reference_mean(task, frame):
    with open(REFERENCE / f"dmc_{task}.csv") as f:
        values = [float(r["episode_reward"]) for r in csv.DictReader(f) if int(float(r["frame"])) == frame]
    return np.mean(values), np.std(values, ddof=1) / np.sqrt(len(values)), len(values)


def test_plot_table_numbers_equal_a_hand_computation(synthetic_runs, tmp_path, capsys):
    out = tmp_path / "plots"
    plot.main(plot.Args(runs_dir=str(synthetic_runs), out=str(out), bootstrap_reps=200))  # the repository's curves
    table = (out / "results.md").read_text()
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): line for line in table.splitlines() if "|" in line}

    # cheetah_run, a__b, seeds 1-3: return = 100 * seed + frame / 2000
    for budget in [100_000, 500_000, 1_000_000]:
        assert expected_cell([100 * s + budget / 2000 for s in (1, 2, 3)]) in rows[("cheetah_run", "a__b")]
        assert expected_cell([100 * s + budget / 2000 for s in (1, 2)]) in rows[("cheetah_run", "c")]
    # finger_turn_hard, a__b: seed 3 stopped at 500k, so 1M has two seeds and says one fell short
    cells = rows[("finger_turn_hard", "a__b")].split("|")[3:6]
    assert expected_cell([10 + 100 * s + 50 for s in (1, 2, 3)]) in cells[0]
    assert expected_cell([10 + 100 * s + 500 for s in (1, 2)]) + ", 1 short of budget" in cells[2]
    assert ("finger_turn_hard", "c") not in rows

    # aggregate of a__b at 100k over both tasks, returns / 1000: mean and IQM of the six runs
    scores = np.array([(100 * s + 50) / 1000 for s in (1, 2, 3)] + [(10 + 100 * s + 50) / 1000 for s in (1, 2, 3)])
    middle = np.sort(scores)[1:5]  # the interquartile mean of 6 values drops int(0.25 * 6) = 1 at each end
    iqm_cell, mean_cell = rows[("a__b", "IQM")].split("|")[3], rows[("a__b", "mean")].split("|")[3]
    assert iqm_cell.strip().startswith(f"{middle.mean():.3f} [") and mean_cell.strip().startswith(
        f"{scores.mean():.3f} ["
    )
    low, high = map(float, re.search(r"\[(.*), (.*)\]", mean_cell).groups())
    assert low <= scores.mean() <= high
    assert "a task has no run" in rows[("c", "IQM")], "method c has no run on finger_turn_hard"

    # the published curves, from the repository, are tabulated next to ours by default
    mean, se, n = reference_mean("cheetah_run", 100_000)
    assert f"{mean:.1f} ± {se:.1f} ({n})" in rows[("cheetah_run", "DrQ-v2 (published)")]
    assert "Probability of improvement" not in table, "only when the sweep has both TACO and DrQ-v2"

    printed = capsys.readouterr().out
    assert "skipped" in printed and "no_eval: no eval/episodic_return" in printed
    assert "not_a_run: no hyperparameters table" in printed and printed.count("  read ") == 8

    import matplotlib.image

    for name in ["tasks.png", "aggregate.png"]:
        image = matplotlib.image.imread(out / name)
        assert image.shape[0] > 200 and image.shape[1] > 200 and image.std() > 0.01, f"{name} is blank"


def test_figures_name_methods_and_draw_the_published_curve_over_the_runs_frames(synthetic_runs, tmp_path):
    assert plot.display_name("taco_continuous_action") == "TACO"
    assert plot.display_name("drqv2_continuous_action (nstep=1)") == "DrQ-v2 (nstep=1)"
    assert plot.display_name("my_ablation") == "my_ablation"
    assert (plot.plural(1, "seed"), plot.plural(2, "task")) == ("1 seed", "2 tasks")
    published = {1: (np.array([0, 20_000, 40_000]), np.array([1.0, 2.0, 3.0]))}
    published[2] = (np.array([0, 20_000, 40_000]), np.array([3.0, 4.0, 5.0]))
    frames, mean, lowest, highest = plot.reference_band(published, max_frame=8_000)  # runs shorter than 20k
    assert frames.tolist() == [0, 20_000], "up to the first published frame past the runs: a line, not a dot at 0"
    assert (mean.tolist(), lowest.tolist(), highest.tolist()) == ([2.0, 3.0], [1.0, 2.0], [3.0, 4.0])
    out = tmp_path / "plots"
    plot.main(plot.Args(runs_dir=str(synthetic_runs), out=str(out), bootstrap_reps=50))
    for name in ["tasks", "aggregate"]:
        assert (out / f"{name}.pdf").read_bytes().startswith(b"%PDF"), "a PDF beside each PNG"
        assert plt_width(out / f"{name}.png") >= 2000, "print resolution"


def plt_width(path):
    import matplotlib.image

    return matplotlib.image.imread(path).shape[1]


def test_plot_of_another_tag_and_of_nothing(synthetic_runs, tmp_path):
    args = plot.Args(runs_dir=str(synthetic_runs), out=str(tmp_path / "p"), tag="charts/episodic_return")
    args.budgets = [100_000]
    plot.main(args)
    assert "| cheetah_run | c | – (none of 1 reached it)" in (tmp_path / "p" / "results.md").read_text()
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no run under"):
        plot.main(plot.Args(runs_dir=str(tmp_path / "empty"), out=str(tmp_path / "q")))


def test_plot_budgets_come_from_the_runs_unless_given(tmp_path, capsys):
    """Runs evaluated every 2k frames: on cartpole_balance, method m's seeds to 30k and method n's to 22k; on
    cheetah_run, m's to 10k. The table's last column is the most frames all runs of a task reached, every method's
    (22k: n is compared, not "none reached" at m's 30k), and the others the evaluations nearest below its half and
    tenth (10k and 2k, not 11k and 2.2k: a column holds the evaluation it names), not a paper's 100k / 500k / 1M that
    none reached; --budgets still sets them."""
    runs = [("m", "cartpole_balance", 30_000)] * 2 + [("n", "cartpole_balance", 22_000), ("m", "cheetah_run", 10_000)]
    for seed, (method, task, last) in enumerate(runs):
        hyper = {"exp_name": method, "env_id": task, "seed": seed}
        write_run(tmp_path / "runs" / f"r{seed}", hyper, [(f, f / 100) for f in range(0, last + 1, 2000)])
    plot.main(plot.Args(runs_dir=str(tmp_path / "runs"), out=str(tmp_path / "p"), bootstrap_reps=20))
    table = (tmp_path / "p" / "results.md").read_text()
    assert "| task | method | 2k frames | 10k frames | 22k frames |" in table
    assert "| cartpole_balance | m | 20.0 ± 0.0 (2) | 100.0 ± 0.0 (2) | 220.0 ± 0.0 (2) |" in table
    assert "| cartpole_balance | n | 20.0 (1) | 100.0 (1) | 220.0 (1) |" in table
    # the published curves are evaluated every 20k frames: a cell says when it holds an earlier evaluation
    published = next(line for line in table.splitlines() if line.startswith("| cartpole_balance | DrQ-v2 (published)"))
    assert [cell.split(", at ")[1] for cell in published.split(" | ")[2:]] == ["0 frames", "0 frames", "20k frames |"]
    assert "plot.py: budgets 2k, 10k, 22k frames, from the runs" in capsys.readouterr().out
    plot.main(plot.Args(runs_dir=str(tmp_path / "runs"), out=str(tmp_path / "q"), budgets=[5000], bootstrap_reps=20))
    assert "| task | method | 5k frames |" in (tmp_path / "q" / "results.md").read_text()


def run_benchmark(args, cwd, env=None, timeout=600):
    return subprocess.run(
        ["bash", str(ROOT / "benchmark.sh"), *args],
        cwd=cwd,
        env={**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl"), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def max_concurrency(output):
    running = peak = 0
    for line in output.splitlines():
        if re.match(r"\[\S+\] start ", line):
            running += 1
            peak = max(peak, running)
        elif re.match(r"\[\S+\] (done|FAILED) ", line):
            running -= 1
    return peak


def test_local_sweep_runs_at_most_workers_at_once_and_plots(tmp_path):
    out = tmp_path / "sweep"
    tasks = "cartpole_balance cartpole_swingup pendulum_swingup"  # 3 runs, 2 at once
    sweep = ["--scripts", "drqv2_continuous_action.py", "--env-ids", tasks]
    result = run_benchmark(
        [
            *sweep,
            "--num-seeds",
            "1",
            "--workers",
            "2",
            "--out",
            str(out),
            "--",
            *TINY_RUN[2:],
            "--total-timesteps",
            "40",  # one episode, evaluated at frames 0 and 40: enough for the plots
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert max_concurrency(result.stdout) == 2
    assert len(re.findall(r"^\[\S+\] start ", result.stdout, re.MULTILINE)) == 3
    # the runs' warnings reach the sweep's output, not only their logs: each once (here every run warns alike)
    assert result.stdout.count("\n  warning: updates start at frame 80, at or after the budget's end") == 1
    assert len(list((out / "runs").iterdir())) == 3
    assert len(list((out / "logs").glob("drqv2_continuous_action__*.log"))) == 3
    assert (out / "plots" / "tasks.png").stat().st_size > 10_000
    assert "cartpole_swingup" in (out / "plots" / "results.md").read_text()
    # episodes cut at 40 frames: their returns are not comparable with the published curves, and the plots say so
    cut = "note: runs of cartpole_balance, cartpole_swingup, pendulum_swingup cut episodes short"
    assert f"\n  {cut}" in result.stdout, "the sweep's output gives the plotting step's notes"
    assert f"- {cut}" in (out / "plots" / "results.md").read_text()
    tiny = (
        "learning_starts=80 (published 4000), num_eval_episodes=1 (published 10), buffer_size=1000 (published 1000000)"
    )
    assert f"drqv2_continuous_action on cartpole_balance, cartpole_swingup, pendulum_swingup: {tiny}" in result.stdout


def test_local_sweep_names_the_failed_run_after_the_others_finish(tmp_path):
    out = tmp_path / "my sweep"  # a space in the path
    scripts = "drqv2_continuous_action.py taco_continuous_action.py"
    sweep = ["--scripts", scripts, "--env-ids", "cartpole_balance", "--num-seeds", "1", "--workers", "2"]
    # the DrQ-v2 run fails as it starts (a fake python), the TACO run finishes
    crash = '[[ "$1" == */drqv2_continuous_action.py ]] && { echo "error: crashed on purpose" >&2; exit 3; }'
    env = {"PYTHON": fake_python(tmp_path / "python", crash)}
    tiny = [*TINY_RUN[2:], "--total-timesteps", "40"]
    (out / "logs").mkdir(parents=True)
    (out / "logs" / "drqv2_continuous_action__cartpole_balance__1.log").write_text("error: an earlier attempt's\n")
    result = run_benchmark([*sweep, "--out", str(out), "--", *tiny], tmp_path, env=env)
    assert result.returncode != 0
    assert "1 of 2 runs failed: drqv2_continuous_action__cartpole_balance__1" in result.stderr
    # the run's own one-line reason, the last this attempt wrote, under its FAILED line
    assert re.search(r"FAILED .*\(exit code 3, log: .*\.log\)\n  error: crashed on purpose\n", result.stdout), (
        result.stdout
    )
    assert "earlier attempt" not in result.stdout
    assert "crashed on purpose" in (out / "logs" / "drqv2_continuous_action__cartpole_balance__1.log").read_text()
    assert len(list((out / "runs").iterdir())) == 1, "the good run still finished"


def test_local_dry_run_prints_the_runs_and_runs_nothing(tmp_path):
    out = tmp_path / "dry sweep"
    sweep = ["--dry-run", "--env-ids", "cartpole_balance cheetah_run", "--num-seeds", "2", "--workers", "2"]
    result = run_benchmark([*sweep, "--out", str(out), "--", "--total-timesteps", "1000"], tmp_path)
    assert result.returncode == 0, result.stderr
    commands = [line for line in result.stdout.splitlines() if "--env-id" in line]
    assert len(commands) == 8 and "taco_continuous_action.py --env-id cheetah_run --seed 2" in result.stdout
    # the budget set after -- replaces the paper's 1M frames; --resume auto continues an interrupted run
    assert all("--resume auto --total-timesteps 1000 >> " in line for line in commands), commands
    default = run_benchmark([*sweep, "--out", str(out), "--", "--learning-starts", "8000"], tmp_path)
    assert "--seed 1 --resume auto --total-timesteps 1000000 --learning-starts 8000 >> " in default.stdout
    assert not out.exists() and not (tmp_path / "runs").exists(), "a dry run writes nothing"
    assert "start" not in result.stdout
    assert re.search(r"disk: up to [\d.]+ GB at the sweep's peak .* GB are free in ", result.stderr), result.stderr
    assert "for each finished run (6))" in result.stderr and "8 runs, 2 at a time" in result.stdout
    single = ["--dry-run", "--scripts", "drqv2_continuous_action.py", "--env-ids", "cartpole_balance"]
    alone = run_benchmark([*single, "--num-seeds", "1", "--out", str(out)], tmp_path)
    assert "(dry run): 1 run, 1 at a time" in alone.stdout and "finished" not in alone.stderr, alone.stderr
    preset = run_benchmark([*sweep, "--frames", "preset", "--no-disk-check", "--out", str(out)], tmp_path)
    assert preset.returncode == 0 and "--total-timesteps" not in preset.stdout, "each task's preset budget"
    assert "9 tasks at 1M frames" in run_benchmark(["--help"], tmp_path).stdout
    # the threads per run follow the cores this process may use, not an OMP_NUM_THREADS in the caller's environment
    one = run_benchmark([*sweep, "--workers", "1", "--out", str(out)], tmp_path, env={"OMP_NUM_THREADS": "1"})
    cores = len(os.sched_getaffinity(0))
    said = f"1 at a time, OMP_NUM_THREADS={cores}" + (" (not the 1 set before)," if cores > 1 else ",")
    assert said in one.stdout, one.stdout


def test_a_sweep_that_does_not_fit_on_the_disk_is_refused_unless_told(tmp_path):
    out = tmp_path / "sweep"
    sweep = ["--env-ids", "cartpole_balance", "--num-seeds", "1", "--out", str(out)]
    huge = ["--", "--buffer-size", "100000000", "--total-timesteps", "400000000"]  # a replay of 2 PB
    for mode in [[], ["--slurm"]]:
        result = run_benchmark([*mode, *sweep, *huge], tmp_path)
        assert result.returncode == 2 and "not enough free disk for the sweep" in result.stderr, result.stderr
        assert "--no-disk-check launches anyway" in result.stderr and result.stdout == "" and not out.exists()
        assert re.search(r"disk: up to \d+\.\d GB at the sweep's peak \(2 checkpoints of up to 21\d\d", result.stderr)
    forced = run_benchmark(["--dry-run", "--no-disk-check", *sweep, *huge], tmp_path)
    assert forced.returncode == 0 and forced.stdout.count("--buffer-size 100000000") == 2, forced.stderr
    light = run_benchmark(["--dry-run", *sweep, *huge, "--no-checkpoint-replay"], tmp_path)
    assert light.returncode == 0 and "2 checkpoints of up to 0.1" in light.stderr, light.stderr


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGHUP], ids=["SIGINT", "SIGHUP"])
def test_a_local_sweep_run_again_continues_interrupted_runs_and_skips_finished_ones(tmp_path, signum):
    """Ctrl-C (SIGINT) or a closed terminal (SIGHUP): every run checkpoints and stops; the same command continues."""
    out = tmp_path / "sweep"
    sweep = ["--scripts", "drqv2_continuous_action.py", "--env-ids", "cartpole_balance", "--num-seeds", "1"]
    command = [*sweep, "--no-plot", "--out", str(out), "--", *TINY_RUN[2:], "--total-timesteps", "160"]
    command += ["--checkpoint-every", "40"]
    process = subprocess.Popen(
        ["bash", str(ROOT / "benchmark.sh"), *command],
        cwd=tmp_path,
        env={**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
        preexec_fn=default_signals,  # noqa: PLW1509 (it only calls sigaction); bash cannot trap a signal ignored at start
    )
    deadline = time.time() + 300
    while not list((out / "runs").glob("*/checkpoint.pt")):
        assert process.poll() is None and time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.2)
    os.killpg(process.pid, signum)  # as a terminal signals its foreground group; the runs are in sessions of their own
    assert process.wait(timeout=300) == 130, process.stdout.read()
    said = process.stdout.read()
    assert "interrupted; stopping the running run (it finishes its episode and checkpoints)" in said, said
    assert said.endswith("benchmark.sh: stopped; the same command continues the sweep from the runs' checkpoints\n"), (
        said
    )
    (run_dir,) = list((out / "runs").iterdir())
    for lock_file in [run_dir / "run.lock", out / "sweep.lock"]:  # no process holds the run or the sweep any more
        with open(lock_file) as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert 160 not in [step for step, _ in read_scalars(run_dir).get("eval/episodic_return", [])], "stopped early"

    again = run_benchmark(command, tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert " done    (1/1) drqv2_continuous_action__cartpole_balance__1" in again.stdout
    assert list((out / "runs").iterdir()) == [run_dir], "the same run continued"
    log = (out / "logs" / "drqv2_continuous_action__cartpole_balance__1.log").read_text()
    assert "stopped by SIGTERM" in log and f"resuming {run_dir.name}" in log, "the log keeps both attempts"
    assert f"--resume auto: resuming runs/{run_dir.name}, the newest run of this task and seed (1 found)" in log
    steps = [step for step, _ in read_scalars(run_dir)["charts/episodic_return"]]
    assert steps == list(range(40, 161, 40)), "every episode logged once across the two attempts"

    third = run_benchmark(command, tmp_path)
    assert third.returncode == 0, third.stdout + third.stderr
    assert "skipped (1/1) drqv2_continuous_action__cartpole_balance__1 (finished before)" in third.stdout


def test_unknown_tasks_are_refused_before_anything_runs(tmp_path):
    for mode in [[], ["--slurm"], ["--slurm", "--dry-run"]]:
        out = tmp_path / "sweep"
        result = run_benchmark([*mode, "--env-ids", "cartpole_balance bogus_task", "--out", str(out)], tmp_path)
        assert result.returncode == 2 and "unknown task(s) in --env-ids: bogus_task" in result.stderr, result.stderr
        assert not out.exists() and result.stdout == ""


def fake_python(path, run_body):
    """A PYTHON for benchmark.sh that runs `run_body` (bash) in place of an agent script and Python otherwise."""
    path.write_text(
        f'#!/bin/bash\nif [[ "$1" == *_continuous_action.py ]]; then\n{run_body}\nfi\nexec {sys.executable} "$@"\n'
    )
    path.chmod(0o755)
    return str(path)


def one_line_refusal(result, expected):
    assert result.returncode == 2 and result.stdout == "", result.stdout + result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("benchmark.sh: "), result.stderr
    assert expected in result.stderr, result.stderr


def test_a_second_sweep_on_the_same_out_is_refused_and_the_lock_ends_with_the_harness(tmp_path):
    """The first sweep's runs (fakes that wait for a file) hold no copy of its lock: killed, the harness leaves its
    runs going but not the lock; a sweep that ends releases it too."""
    record = tmp_path / "record"
    record.mkdir()
    run_body = 'echo $$ >> "$RECORD_DIR/pids"\nwhile [ ! -e "$RECORD_DIR/go" ]; do sleep 0.1; done\nexit 0'
    env = {"PYTHON": fake_python(tmp_path / "python", run_body), "RECORD_DIR": str(record)}
    out = tmp_path / "sweep"
    command = ["--scripts", "drqv2_continuous_action.py", "--env-ids", "cartpole_balance", "--num-seeds", "1"]
    command += ["--no-plot", "--no-disk-check", "--out", str(out)]
    first = subprocess.Popen(
        ["bash", str(ROOT / "benchmark.sh"), *command],
        cwd=tmp_path,
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 120
        while not (record / "pids").exists():
            assert first.poll() is None and time.time() < deadline, "the first sweep started no run"
            time.sleep(0.2)
        (run_pid,) = map(int, (record / "pids").read_text().split())
        second = run_benchmark(command, tmp_path, env=env, timeout=60)
        one_line_refusal(second, f"another sweep is running on --out {out} (benchmark.sh, process {first.pid} on ")
        assert "one sweep per --out folder" in second.stderr
        assert (record / "pids").read_text().split() == [str(run_pid)], "the second sweep started nothing"
        held = [os.readlink(fd) for fd in Path(f"/proc/{run_pid}/fd").iterdir()]
        assert str(out / "sweep.lock") not in held, "a run holds the sweep's lock"

        first.send_signal(signal.SIGKILL)  # the harness dies without a word; its run goes on
        first.wait(timeout=60)
        assert Path(f"/proc/{run_pid}").exists()
        with open(out / "sweep.lock") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free: a new sweep may start
        # but not a second run of the same seed beside the one left going, writing to its log
        again = run_benchmark(command, tmp_path, env=env, timeout=120)
        assert again.returncode == 1 and (record / "pids").read_text().split() == [str(run_pid)], again.stdout
        left = (
            "drqv2_continuous_action__cartpole_balance__1 (still running, left by an earlier sweep: not started again)"
        )
        assert f"FAILED  (1/1) {left}" in again.stdout
    finally:
        (record / "go").touch()  # every fake run ends
        if first.poll() is None:
            first.kill()
            first.wait()
    deadline = time.time() + 60
    while Path(f"/proc/{run_pid}").exists():  # the run left going ends, and with it the lock on its log
        assert time.time() < deadline, "the fake run did not end"
        time.sleep(0.1)
    for _ in range(2):  # a sweep that ends releases the lock: the same command again is not refused
        result = run_benchmark(command, tmp_path, env=env, timeout=300)
        assert result.returncode == 0 and "benchmark.sh: the run finished" in result.stdout, (
            result.stdout + result.stderr
        )


@pytest.mark.parametrize(
    "option,message",
    [
        (["--scripts", "plot.py"], "no agent script 'plot.py': --scripts takes taco_continuous_action.py and "),
        (["--frames", "0"], "--frames must be a positive whole number or 'preset', got '0'"),
        (["--frames", "-5"], "--frames must be a positive whole number or 'preset', got '-5'"),
        (["--frames", "1e6"], "--frames must be a positive whole number or 'preset', got '1e6'"),
        (["--scripts", " "], "--scripts names no script"),
        (["--env-ids", " \t\n"], "--env-ids names no task"),
        (["--first-seed", "0x10"], "--first-seed must be a whole number below 10**18, got '0x10'"),
        (["--num-seeds", "1" * 19], "--num-seeds must be a whole number below 10**18, got '1111111111111111111'"),
        (["--num-seeds", "2", "--", "--seed", "5"], "the arguments after -- set --seed, but the sweep sets each run's"),
        (["--", "--seed=5"], "the arguments after -- set --seed, but the sweep sets each run's seed: use --first-seed"),
        (["--", "--env_id", "cheetah_run"], "the arguments after -- set --env_id, but the sweep sets each run's task"),
        (["--", "--track", "--resume", "runs/x"], "the arguments after -- set --resume, but the sweep gives every run"),
        (["--frames", "5000", "--", "--total-timesteps", "6000"], "--frames and --total-timesteps after -- both set"),
        (["--frames", "preset", "--", "--total_timesteps=6"], "--frames and --total_timesteps after -- both set the"),
        (
            ["--", "--num-seed-frames", "80"],
            "taco_continuous_action.py on cartpole_balance refuses the arguments after --: Unrecognized options: --num",
        ),
        (
            ["--scripts", "drqv2_continuous_action.py taco_continuous_action.py", "--", "--multistep", "2"],
            "drqv2_continuous_action.py on cartpole_balance refuses the arguments after --: Unrecognized options: --mu",
        ),
        (["--", "--batch-size", "abc"], "refuses the arguments after --: Error parsing --batch-size: no type matching"),
        (
            ["--frames", "240", "--", "--learning-starts", "80"],
            "refuses the arguments after --: --batch-size 1024 is larger than the 40 transitions the replay holds",
        ),
    ],
)
def test_a_sweep_refuses_what_it_cannot_run_as_asked_in_one_line(tmp_path, option, message):
    for mode in [[], ["--slurm"]]:
        result = run_benchmark(["--dry-run", *mode, "--env-ids", "cartpole_balance", *option], tmp_path)
        one_line_refusal(result, message)


@pytest.mark.parametrize(
    "option,message",
    [
        (["--partition", "debug\ntouch x"], "--partition holds a newline or a control character: $'debug\\ntouch x'"),
        (["--partition", "gpu; rm"], "--partition must be a partition name (letters, digits, '_', '-', '.'; commas"),
        (["--time", "10:00\n#SBATCH --x"], "--time holds a newline or a control character: $'10:00\\n#SBATCH --x'"),
        (
            ["--time", "2 days"],
            "--time must be minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS (Slurm's formats)",
        ),
        (["--time", "1:00:00:00"], "--time must be minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"),
        (["--mem", "32G\ntouch x"], "--mem holds a newline or a control character: $'32G\\ntouch x'"),
        (["--mem", "32GB"], "--mem must be a whole number with an optional K, M, G or T suffix (Slurm's format"),
        (["--cpus", "0"], "--cpus must be at least 1, got 0"),
        (["--gpus", "1\ntouch x"], "--gpus must be a whole number below 10**18, got $'1\\ntouch x'"),
        (["--max-concurrent", "0"], "--max-concurrent must be at least 1, got 0"),
    ],
)
def test_slurm_options_that_reach_the_job_script_are_checked_before_anything_is_written(tmp_path, option, message):
    """A newline in --partition made the rest of it a command of the job script, and Slurm ignores the #SBATCH lines
    after a command."""
    out = tmp_path / "sweep"
    for dry_run in [["--dry-run"], []]:
        sweep = ["--slurm", *dry_run, "--no-disk-check", "--env-ids", "cartpole_balance", "--num-seeds", "1"]
        result = run_benchmark([*sweep, *option, "--out", str(out)], tmp_path, timeout=120)
        one_line_refusal(result, message)
        assert not out.exists(), "nothing written"


def test_slurm_time_and_memory_in_each_of_slurms_formats_are_taken(tmp_path):
    sweep = ["--slurm", "--dry-run", "--no-disk-check", "--env-ids", "cartpole_balance", "--num-seeds", "1"]
    for time_limit, mem, partition in [("30", "1024", "gpu,debug"), ("2-00:30", "2g", "a.b_c-1"), ("1-12", "500M", "")]:
        options = ["--time", time_limit, "--mem", mem] + (["--partition", partition] if partition else [])
        result = run_benchmark([*sweep, *options], tmp_path)
        assert result.returncode == 0, result.stderr
        assert f"#SBATCH --time={time_limit}\n" in result.stdout and f"#SBATCH --mem={mem}\n" in result.stdout
        assert ("#SBATCH --partition=" in result.stdout) == bool(partition)


def test_slurm_job_script_keeps_arguments_with_quotes_and_substitutions_as_words(tmp_path):
    """The job script, run here as Slurm would run an element, passes each argument after -- as one word: a quote,
    $(...) or backquotes inside one run nothing. (A newline is refused up front: the scripts refuse control characters
    in free-text settings.)"""
    marker = tmp_path / "ran"
    # free-text settings (the scripts check their arguments before the sweep starts; a flag given twice: the last wins)
    project = "--wandb-project-name"
    tricky = [project, f"x; touch {marker}", "--wandb-entity", f"$(touch {marker})", project, f"'; touch {marker}; '"]
    tricky += ["--wandb-entity", f'"; touch {marker} #', project, f"`touch {marker}`"]
    record = tmp_path / "record"
    record.mkdir()
    recorder = fake_python(tmp_path / "python", 'printf "%s\\0" "$@" > "$RECORD_DIR/$SLURM_ARRAY_TASK_ID"; exit 0')
    env = {"PYTHON": recorder, "RECORD_DIR": str(record)}
    out = tmp_path / "sweep"
    sweep = ["--slurm", "--dry-run", "--no-disk-check", "--scripts", "drqv2_continuous_action.py"]
    sweep += ["--env-ids", "cartpole_balance", "--num-seeds", "1", "--out", str(out)]
    newline = run_benchmark([*sweep, "--", project, f"x\ntouch {marker}"], tmp_path, env=env)
    assert newline.returncode == 2 and "--wandb-project-name must hold no newline" in newline.stderr, newline.stderr
    result = run_benchmark([*sweep, "--", *tricky], tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    out.mkdir()  # the job script starts in it
    element = {**os.environ, **env, "SLURM_ARRAY_TASK_ID": "0", "SLURM_CPUS_PER_TASK": "1"}
    job_script = tmp_path / "element.sh"
    job_script.write_text(result.stdout)
    ran = subprocess.run(
        ["bash", str(job_script)], env=element, capture_output=True, text=True, timeout=60, check=False
    )
    assert "finished with exit code 0" in ran.stdout, ran.stdout + ran.stderr
    assert not marker.exists(), "an argument ran a command"
    words = (record / "0").read_text().split("\0")[:-1]
    script = str(ROOT / "drqv2_continuous_action.py")
    expected = [script, "--env-id", "cartpole_balance", "--seed", "1", "--resume", "auto", "--total-timesteps"]
    assert words == [*expected, "1000000", *tricky]


def test_bad_benchmark_options_fail_fast(tmp_path):
    result = run_benchmark(["--workers", "two"], tmp_path)
    assert result.returncode == 2 and "--workers must be a whole number below 10**18, got 'two'" in result.stderr
    result = run_benchmark(["--scripts", "nope.py"], tmp_path)
    assert result.returncode == 2 and "no agent script 'nope.py'" in result.stderr
    result = run_benchmark(["--dry-run", "--env-ids", "cartpole_balance cheetah_run cartpole_balance"], tmp_path)
    assert result.returncode == 2 and "--env-ids names cartpole_balance more than once" in result.stderr
    result = run_benchmark(["--dry-run", "--first-seed", str(2**32 - 2), "--num-seeds", "3"], tmp_path)
    assert result.returncode == 2 and "seeds must be below 2**32" in result.stderr


@pytest.mark.parametrize(
    "option,message",
    [
        (["--reference", "no/such/folder"], "--reference no/such/folder: no such folder"),
        (["--bootstrap-reps", "0"], "--bootstrap-reps must be at least 1, got 0"),
        (["--score-scale", "0"], "--score-scale must be positive, got 0.0"),
        (["--runs-dir", "no/such/runs"], "--runs-dir no/such/runs: no such folder"),
    ],
)
def test_bad_plot_options_are_one_line_before_reading(synthetic_runs, tmp_path, option, message):
    import tyro

    args = tyro.cli(plot.Args, args=["--runs-dir", str(synthetic_runs), "--out", str(tmp_path / "plots"), *option])
    with pytest.raises(SystemExit, match=re.escape(f"plot.py: {message}")):
        plot.main(args)
    assert not (tmp_path / "plots").exists()


@pytest.mark.parametrize("case", ["a file", "under a file", "read-only"])
def test_plot_out_that_cannot_be_written_is_one_line_before_reading(synthetic_runs, tmp_path, monkeypatch, case):
    """Tests run as root, whom permission bits do not stop: a read-only folder is one os.access says so of (as it does
    for root on a read-only file system)."""
    (tmp_path / "file").write_text("")
    out, message = {
        "a file": (tmp_path / "file", f"{tmp_path / 'file'} is a file, not a folder"),
        "under a file": (tmp_path / "file" / "plots", f"{tmp_path / 'file'} is a file, not a folder"),
        "read-only": (tmp_path / "read-only" / "plots", f"{tmp_path / 'read-only'} is not writable"),
    }[case]
    (tmp_path / "read-only").mkdir()
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: "read-only" not in str(path) and access(path, mode))
    monkeypatch.setattr(plot, "find_runs", lambda *_: pytest.fail("the runs were read first"))
    with pytest.raises(SystemExit, match=re.escape(f"plot.py: --out {out} cannot be written: {message}")):
        plot.main(plot.Args(runs_dir=str(synthetic_runs), out=str(out)))


def test_slurm_dry_run_prints_a_readable_array_job(tmp_path):
    args = ["--slurm", "--dry-run", "--no-disk-check", "--env-ids", "cheetah_run walker_walk", "--num-seeds", "3"]
    args += ["--partition", "gpu"]
    result = run_benchmark([*args, "--out", str(tmp_path / "my s"), "--", "--total-timesteps", "1000000"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "my s").exists(), "a dry run writes nothing"
    script = result.stdout
    assert f"cd '{tmp_path}/my s'" in script, "paths are quoted"
    assert "#SBATCH --array=0-11%32" in script and "#SBATCH --partition=gpu" in script
    assert "#SBATCH --requeue" in script and "#SBATCH --signal=B:USR1@120" in script
    assert "#SBATCH --gres=gpu:1" in script and '"taco_continuous_action.py walker_walk 3"' in script
    assert "--total-timesteps 1000000" in script
    assert "--resume auto" in script, "a requeued element resumes from its checkpoint"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """A one-node Slurm cluster on 127.0.0.1 (munged, slurmctld, slurmd), stopped after the module."""
    missing = [tool for tool in ["munged", "slurmctld", "slurmd", "sbatch"] if shutil.which(tool) is None]
    if missing or os.geteuid() != 0 or not Path("/etc/munge/munge.key").exists():
        reason = f"Slurm test needs root and Debian's slurm-wlm and munge (missing: {missing or 'root or munge key'})"
        if os.environ.get("CI"):
            pytest.fail(reason + "; CI must install them (./setup.sh --dev)")
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("slurm")
    for sub in ["state", "spool"]:
        (base / sub).mkdir()
    host = socket.gethostname().split(".")[0]
    conf = base / "slurm.conf"
    # cred_expire=5: a requeued job waits this long (not 120 s) before it may start again. Forcing it to start at once
    # (scontrol update StartTime=now) could launch it in the second its old credential was revoked: refused, it ends.
    conf.write_text(
        f"""ClusterName=taco-test
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={base}/munge.socket,cred_expire=5
StateSaveLocation={base}/state
SlurmdSpoolDir={base}/spool
SlurmctldPidFile={base}/slurmctld.pid
SlurmdPidFile={base}/slurmd.pid
SlurmctldLogFile={base}/slurmctld.log
SlurmdLogFile={base}/slurmd.log
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName=testnode NodeHostname={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=testnode Default=YES MaxTime=INFINITE State=UP
"""
    )
    env = {**os.environ, "SLURM_CONF": str(conf)}
    munge = [f"--socket={base}/munge.socket", f"--pid-file={base}/munged.pid", f"--log-file={base}/munged.log"]
    subprocess.run(["munged", "--force", *munge, f"--seed-file={base}/munged.seed"], check=True, env=env)
    subprocess.run(["slurmctld", "-f", str(conf)], check=True, env=env)
    subprocess.run(["slurmd", "-f", str(conf), "-N", "testnode"], check=True, env=env)
    try:
        deadline = time.time() + 60
        while "idle" not in subprocess.check_output(["sinfo", "-h", "-o", "%T"], env=env, text=True):
            assert time.time() < deadline, "the test cluster did not come up: " + (base / "slurmctld.log").read_text()
            time.sleep(0.3)
        yield env
    finally:
        for daemon in ["slurmd", "slurmctld", "munged"]:
            pid_file = base / f"{daemon}.pid"
            if pid_file.exists():
                try:
                    os.kill(int(pid_file.read_text().split()[0]), signal.SIGTERM)
                except (ProcessLookupError, ValueError):
                    pass


def test_slurm_array_job_runs_the_sweep_and_the_plots(slurm_cluster, tmp_path):
    out = tmp_path / "my sweep"  # a space in the path: the job script and sbatch's options must quote it
    sweep = ["--slurm", "--scripts", "drqv2_continuous_action.py", "--env-ids", "cartpole_balance cartpole_swingup"]
    resources = ["--num-seeds", "1", "--gpus", "0", "--cpus", "1", "--mem", "500M", "--time", "00:10:00"]
    run = [*TINY_RUN[2:], "--total-timesteps", "40"]  # one episode, evaluated at frames 0 and 40
    result = run_benchmark([*sweep, *resources, "--out", str(out), "--", *run], tmp_path, env=slurm_cluster)
    assert result.returncode == 0, result.stdout + result.stderr
    job_id = re.search(r"submitted array job (\d+)", result.stdout).group(1)
    deadline = time.time() + 480
    while subprocess.check_output(["squeue", "-h"], env=slurm_cluster, text=True).strip():
        assert time.time() < deadline, "the array job did not finish in time"
        time.sleep(0.5)
    logs = sorted((out / "logs").glob(f"{job_id}_*.log"))
    assert len(logs) == 2 and all("finished with exit code 0" in log.read_text() for log in logs)
    assert sorted(run.name.split("__")[0] for run in (out / "runs").iterdir()) == [
        "cartpole_balance",
        "cartpole_swingup",
    ]
    assert (out / "plots" / "tasks.png").stat().st_size > 10_000, "the dependent plot job ran"


def test_slurm_elements_get_exactly_the_arguments_given_none_or_quoted(slurm_cluster, tmp_path):
    """Each element's command line, as the agent script would receive it: with nothing after --, only the task, seed,
    --resume auto and the budget; with arguments holding spaces and quotes, those same words."""
    recorder = tmp_path / "python"  # records an agent script's arguments instead of training; runs python otherwise
    recorder.write_text(
        '#!/bin/bash\nif [[ "$1" == *_continuous_action.py ]]; then\n'
        '  printf "%s\\0" "$@" > "$RECORD_DIR/$SLURM_ARRAY_TASK_ID"; exit 0\nfi\n'
        f'exec {sys.executable} "$@"\n'
    )
    recorder.chmod(0o755)
    sweep = ["--slurm", "--no-plot", "--scripts", "drqv2_continuous_action.py", "--env-ids", "cartpole_balance"]
    sweep += [
        "--num-seeds",
        "1",
        "--gpus",
        "0",
        "--cpus",
        "1",
        "--mem",
        "500M",
        "--time",
        "00:05:00",
        "--no-disk-check",
    ]
    tricky = ["--wandb-project-name", 'it\'s a "quoted" name', "--learning-rate", "1e-4"]
    script = str(ROOT / "drqv2_continuous_action.py")
    for extra, frames, expected_tail in [
        ([], ["--frames", "preset"], []),
        (["--", *tricky], [], ["--total-timesteps", "1000000", *tricky]),
    ]:
        record_dir = tmp_path / f"record{len(extra)}"
        record_dir.mkdir()
        env = {**slurm_cluster, "PYTHON": str(recorder), "RECORD_DIR": str(record_dir)}
        out = tmp_path / f"sweep{len(extra)}"
        result = run_benchmark([*sweep, *frames, "--out", str(out), *extra], tmp_path, env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        deadline = time.time() + 120
        while subprocess.check_output(["squeue", "-h"], env=slurm_cluster, text=True).strip():
            assert time.time() < deadline, "the array job did not finish in time"
            time.sleep(0.3)
        assert "finished with exit code 0" in next((out / "logs").glob("*_0.log")).read_text()
        words = (record_dir / "0").read_text().split("\0")[:-1]
        assert words == [script, "--env-id", "cartpole_balance", "--seed", "1", "--resume", "auto", *expected_tail]


def test_slurm_time_limit_signal_checkpoints_requeues_and_resumes(slurm_cluster, tmp_path):
    """The time-limit path: SIGUSR1 to the element's batch script (what `--signal=B:USR1@120` sends) is passed to the
    run, which checkpoints at its episode's end; the script requeues the element, which starts again and resumes the
    run. (A preempted element gets SIGTERM instead and is requeued by Slurm; the run handles both alike.)"""
    out = tmp_path / "sweep"
    sweep = ["--slurm", "--no-plot", "--scripts", "drqv2_continuous_action.py", "--env-ids", "cartpole_balance"]
    resources = ["--num-seeds", "1", "--gpus", "0", "--cpus", "1", "--mem", "500M", "--time", "00:10:00"]
    run = [*TINY_RUN[2:], "--total-timesteps", "400", "--checkpoint-every", "40", "--eval-every", "400"]
    result = run_benchmark([*sweep, *resources, "--out", str(out), "--", *run], tmp_path, env=slurm_cluster)
    assert result.returncode == 0, result.stdout + result.stderr
    job_id = re.search(r"submitted array job (\d+)", result.stdout).group(1)
    deadline = time.time() + 240
    while not list((out / "runs").glob("*/checkpoint.pt")):
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR1", "--batch", f"{job_id}_0"], env=slurm_cluster, check=True)
    log_file = out / "logs" / f"{job_id}_0.log"
    while "(restart 1)" not in log_file.read_text() or "exit code" not in log_file.read_text().split("(restart 1)")[1]:
        assert time.time() < deadline + 300, "the requeued element did not run to its end: " + log_file.read_text()
        time.sleep(0.5)
    log = log_file.read_text()
    assert "time limit near: requeueing" in log and "stopped by SIGUSR1 with a checkpoint at frame" in log, log
    assert "(restart 1)" in log and "resuming cartpole_balance__drqv2_continuous_action__1__" in log, log[-3000:]
    assert "finished with exit code 0" in log
    (run_dir,) = list((out / "runs").iterdir())
    steps = [step for step, _ in read_scalars(run_dir)["charts/episodic_return"]]
    assert steps == list(range(40, 401, 40)), "each episode logged once across the two attempts"


def test_probability_of_improvement_equals_a_hand_count():
    # task A: TACO 3, 5 against DrQ-v2 4: one pair of two won; task B: 10, 11, 12 against 1, 11: 4 won, 1 tied of 6
    taco, drqv2 = [[3.0, 5.0], [10.0, 11.0, 12.0]], [[4.0], [1.0, 11.0]]
    assert plot.probability_of_improvement(taco, drqv2) == (1 / 2 + 4.5 / 6) / 2
    assert plot.probability_of_improvement(drqv2, taco) == 1 - (1 / 2 + 4.5 / 6) / 2
    rng = np.random.default_rng(0)
    assert list(plot.probability_of_improvement_ci([[5.0, 6.0]], [[1.0, 2.0]], 100, rng)) == [1.0, 1.0]


def test_results_give_the_probability_that_taco_improves_on_drqv2(tmp_path):
    """Synthetic sweep with a known answer: at 100k frames TACO beats DrQ-v2 in every pair on both tasks (P = 1); at
    200k TACO wins 3 pairs of 4 on cheetah_run (0.75) and ties every pair on walker_walk (0.5): P = 0.625."""
    runs = tmp_path / "runs"
    values = {  # (method, task): {seed: (return at 100k, return at 200k)}
        ("taco_continuous_action", "cheetah_run"): {1: (500, 300), 2: (600, 500)},
        ("drqv2_continuous_action", "cheetah_run"): {1: (100, 200), 2: (200, 400)},
        ("taco_continuous_action", "walker_walk"): {1: (900, 700), 2: (800, 700)},
        ("drqv2_continuous_action", "walker_walk"): {1: (100, 700), 2: (300, 700), 3: (200, 700)},
    }
    for (method, task), seeds in values.items():
        for seed, (at_100k, at_200k) in seeds.items():
            points = [(0, 0.0), (100_000, at_100k), (200_000, at_200k)]
            write_run(runs / f"{method}_{task}_{seed}", {"exp_name": method, "env_id": task, "seed": seed}, points)
    out = tmp_path / "plots"
    plot.main(plot.Args(runs_dir=str(runs), out=str(out), budgets=[100_000, 200_000, 300_000], bootstrap_reps=300))
    row = next(line for line in (out / "results.md").read_text().splitlines() if line.startswith("| P("))
    cells = [cell.strip() for cell in row.split("|")[2:5]]
    assert row.startswith("| P(taco_continuous_action > drqv2_continuous_action) |")
    assert cells[0] == "1.000 [1.000, 1.000] (2 tasks)"
    low, high = map(float, re.search(r"\[(.*), (.*)\]", cells[1]).groups())
    assert cells[1].startswith("0.625 [") and low < 0.625 < high and cells[1].endswith("(2 tasks)")
    assert cells[2] == "– (no task where both reached it)"
    alone = tmp_path / "alone"  # one seed of each on one task
    for name in ["taco_continuous_action_cheetah_run_1", "drqv2_continuous_action_cheetah_run_1"]:
        shutil.copytree(runs / name, alone / name)
    plot.main(plot.Args(runs_dir=str(alone), out=str(out), budgets=[100_000], bootstrap_reps=30))
    row = next(line for line in (out / "results.md").read_text().splitlines() if line.startswith("| P("))
    assert row.endswith("| 1.000 (one seed a task: no interval) (1 task) |"), "a point interval looked certain"


def test_no_file_of_the_project_refers_outside_the_repository():
    """A clone holds everything: no tracked file names the folder beside the repository that development used."""
    outside = "../" + "shared"  # spelled in two parts so that this file does not match itself
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    assert len(tracked) > 20
    offenders = [
        name
        for name in tracked
        if not name.endswith((".png", ".csv")) and outside in (ROOT / name).read_text(errors="ignore")
    ]
    assert offenders == []
    assert (ROOT / "reference" / "drqv2_curves" / "LICENSE").exists() and len(list(REFERENCE.glob("dmc_*.csv"))) == 24


def test_runs_with_other_settings_are_kept_apart_and_truncated_logs_named(tmp_path, capsys):
    runs = tmp_path / "runs"
    for seed, nstep in [(1, 3), (2, 3), (3, 1)]:  # seed 3 ran with another n-step: not a seed of the same method
        hyperparameters = {"exp_name": "drqv2_continuous_action", "env_id": "cheetah_run", "seed": seed, "nstep": nstep}
        hyperparameters["cudagraphs"] = seed == 2  # a speed option that computes the same update: not a difference
        write_run(runs / f"run{seed}", hyperparameters, [(0, 0.0), (100_000, 100.0 * seed)])
    (events,) = (runs / "run2").glob("events.out.tfevents.*")
    events.write_bytes(events.read_bytes()[:-7])  # the last record cut off, as by a kill mid-write
    plot.main(plot.Args(runs_dir=str(runs), out=str(tmp_path / "plots"), budgets=[100_000], bootstrap_reps=50))
    printed = capsys.readouterr().out
    table = (tmp_path / "plots" / "results.md").read_text()
    # run2 lost its last record (frame 100k): it counts as a run that fell short, and a warning says why
    assert "| cheetah_run | drqv2_continuous_action (nstep=3) | 100.0 (1), 1 short of budget |" in table
    assert "| cheetah_run | drqv2_continuous_action (nstep=1) | 300.0 (1) |" in table
    assert "kept apart" in printed and "plot.py: 3 run directories under" in printed, "notes are not directories"
    assert re.search(r"warning: \S*run2/events\.out\.tfevents\.\S+ is cut off or damaged; read up to frame", printed)
    unpublished = "settings other than the published ones (the script's defaults for the task): "
    assert f"note: {unpublished}drqv2_continuous_action (nstep=1) on cheetah_run: nstep=1 (published 3)\n" in printed


def test_settings_other_than_the_published_ones_are_named_by_method_with_their_tasks(tmp_path, capsys, monkeypatch):
    """A sweep at another batch size than the paper's reads like the published method in the table: a note names
    the settings that are not the script's defaults for the task (the published ones), by method, with its tasks;
    the budget, logging and speed settings that leave the update unchanged are not named, nor are other code's."""
    runs = tmp_path / "runs"
    taco = {"exp_name": "taco_continuous_action", "batch_size": 256, "checkpoint_every": 2000, "cudagraphs": True}
    for task in ["walker_walk", "cheetah_run"]:
        for seed in [1, 2]:
            write_run(runs / f"taco_{task}_{seed}", {**taco, "env_id": task, "seed": seed}, [(0, 0.0), (1000, 5.0)])
    drqv2 = {"exp_name": "drqv2_continuous_action", "env_id": "cheetah_run", "seed": 1, "amp": "bf16"}
    drqv2 |= {"total_timesteps": 1000, "stddev_schedule": "linear(1.0,0.1,500000)", "num_eval_episodes": 2}
    write_run(runs / "drqv2", drqv2, [(0, 1)])
    write_run(runs / "own", {"exp_name": "mine", "env_id": "cheetah_run", "seed": 1, "batch_size": 7}, [(0, 1.0)])
    # a copy of the TACO script run under a name of its own: its settings are TACO's (all of them are logged)
    taco_script = load_script("taco_continuous_action")
    copy = vars(taco_script.resolve_args(taco_script.Args(env_id="cheetah_run", exp_name="my_taco", batch_size=32)))
    write_run(runs / "my_taco", copy, [(0, 1.0)])
    caveats = []  # a figure seen alone says to read it with the notes
    monkeypatch.setattr(plot, "save_figure", lambda fig, path, caveat: caveats.append(caveat))
    plot.main(plot.Args(runs_dir=str(runs), out=str(tmp_path / "plots"), bootstrap_reps=20))
    assert caveats == ["Read with the notes of results.md: settings other than the published ones"] * 2
    note = (
        "note: settings other than the published ones (the script's defaults for the task): drqv2_continuous_action "
        "on cheetah_run: amp=bf16 (published none), num_eval_episodes=2 (published 10); my_taco on cheetah_run: batch_size=32 (published 1024); "
        "taco_continuous_action on cheetah_run, walker_walk: batch_size=256 (published 1024)"
    )
    assert f"\n  {note}\n" in capsys.readouterr().out
    assert f"\n- {note}\n" in (tmp_path / "plots" / "results.md").read_text()


def test_runs_of_an_edited_copy_are_kept_apart_from_the_original(tmp_path, capsys):
    """A copy of a script edited above its run machinery and run under the same --exp-name logs another `algorithm`
    hash: plot.py averaged its runs with the original's, as seeds of one method. Now they are apart, named by their
    hash, while the runs of this checkout's script keep its plain name (and the TACO comparison its method)."""
    runs = tmp_path / "runs"
    checkout = load_script("drqv2_continuous_action").ALGORITHM
    for seed, algorithm in [(1, checkout), (2, checkout), (3, "0123456789abcdef")]:
        hyperparameters = {"exp_name": "drqv2_continuous_action", "env_id": "cheetah_run", "seed": seed}
        write_run(runs / f"run{seed}", {**hyperparameters, "algorithm": algorithm}, [(0, 0.0), (1000, 10.0 * seed)])
    taco = {"exp_name": "taco_continuous_action", "env_id": "cheetah_run", "seed": 1}
    write_run(runs / "taco", taco, [(0, 0.0), (1000, 25.0)])
    plot.main(plot.Args(runs_dir=str(runs), out=str(tmp_path / "plots"), bootstrap_reps=50))
    table = (tmp_path / "plots" / "results.md").read_text()
    assert "| cheetah_run | drqv2_continuous_action | 15.0 ± 5.0 (2) |" in table
    assert "| cheetah_run | drqv2_continuous_action (algorithm=0123456789abcdef) | 30.0 (1) |" in table
    assert (
        "| drqv2_continuous_action (algorithm=0123456789abcdef) | IQM | 0.030 (one seed a task: no interval) |" in table
    )
    assert "Probability of improvement P(taco_continuous_action > drqv2_continuous_action)" in table
    assert "| P(taco_continuous_action > drqv2_continuous_action) | 1.000 [" in table, "2 seeds against 1: an interval"
    note = "algorithm=HASH names runs whose script's code above its run machinery is not this checkout's"
    assert note in capsys.readouterr().out and f"- note: {note}" in table, "the notes are in results.md too"
    # alone, an edited copy under the script's name was that script's: only a difference told it apart
    alone = {"exp_name": "drqv2_continuous_action", "env_id": "walker_walk", "seed": 1, "algorithm": "fedcba9876543210"}
    write_run(tmp_path / "alone" / "run", alone, [(0, 0.0), (1000, 40.0)])
    plot.main(plot.Args(runs_dir=str(tmp_path / "alone"), out=str(tmp_path / "plots"), bootstrap_reps=50))
    table = (tmp_path / "plots" / "results.md").read_text()
    assert "| walker_walk | drqv2_continuous_action (algorithm=fedcba9876543210) | 40.0 (1) |" in table


def test_a_run_still_going_is_named_as_not_final(tmp_path):
    """plot.py on a sweep still running read a run's latest evaluations as its final ones, without a word."""
    import fcntl

    runs = tmp_path / "runs"
    write_run(runs / "going", {"exp_name": "m", "env_id": "cheetah_run", "seed": 1}, [(0, 1.0)])
    with open(runs / "going" / "run.lock", "w") as lock:  # as the scripts hold it while they run
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        _, report = plot.find_runs(str(runs), "eval/episodic_return")
        assert f"  note: still running, so not final: {runs / 'going'}" in report
    _, report = plot.find_runs(str(runs), "eval/episodic_return")  # ended: its lock file stays, unlocked
    assert not any("still running" in line for line in report)


def test_a_settings_table_with_a_key_twice_is_skipped_not_misread(tmp_path):
    """A newline in a free-text setting once added rows to the table (plot.py read a DrQ-v2 run as TACO seed 7)."""
    runs = tmp_path / "runs"
    forged = {"exp_name": "drqv2_continuous_action", "seed": 1, "env_id": "cheetah_run"}
    forged["wandb_project_name"] = "x\n|exp_name|taco_continuous_action|\n|seed|7"  # as the scripts wrote it then
    write_run(runs / "forged", forged, [(0, 1.0)])
    plain = {"exp_name": "drqv2_continuous_action", "seed": 2, "env_id": "cheetah_run", "wandb_entity": "a\\|b"}
    write_run(runs / "plain", plain, [(0, 2.0)])
    found, report = plot.find_runs(str(runs), "eval/episodic_return")
    assert {key: list(seeds) for key, seeds in found.items()} == {("drqv2_continuous_action", "cheetah_run"): [2]}
    assert f"  skipped {runs / 'forged'}: its hyperparameters table names exp_name twice" in "\n".join(report)
    # a `|` written as `\|` is the value's; only the newlines the scripts write end a row
    table = "|param|value|\n|-|-|\n|a|x\\|y|\n|b|1\u2028c\x1c2|"
    assert plot.parse_hyperparameters(table, "run") == {"a": "x|y", "b": "1\u2028c\x1c2"}


def test_a_damaged_event_file_is_named_with_the_frame_read_up_to(tmp_path):
    """One flipped byte: TensorBoard stops reading the file there, without a word (a shorter run)."""
    write_run(tmp_path / "runs" / "r", {"exp_name": "m", "env_id": "cheetah_run", "seed": 1}, [(0, 0.0), (1000, 1.0)])
    (events,) = (tmp_path / "runs" / "r").glob("events.out.tfevents.*")
    data = bytearray(events.read_bytes())
    data[-8] ^= 1  # in the last record's data (its CRC is the last 4 bytes)
    events.write_bytes(data)
    found, report = plot.find_runs(str(tmp_path / "runs"), "eval/episodic_return")
    assert list(found[("m", "cheetah_run")][1][0]) == [0], "frame 1000 was in the damaged record"
    assert f"  warning: {tmp_path / 'runs' / 'r' / events.name} is cut off or damaged; read up to frame 0" in report


@pytest.mark.parametrize("name", ["sw[1]", "sw*", "sw?"])
def test_the_runs_dir_is_a_path_not_a_pattern(tmp_path, name):
    for folder, seed in [(name, 1), ("sw1", 2), ("swx", 3)]:
        write_run(
            tmp_path / folder / "runs" / "r", {"exp_name": "m", "env_id": "cheetah_run", "seed": seed}, [(0, 1.0)]
        )
    found, _ = plot.find_runs(str(tmp_path / name / "runs"), "eval/episodic_return")
    assert list(found[("m", "cheetah_run")]) == [1], "only the runs of the folder named"


@pytest.mark.parametrize(
    "content,problem",
    [
        ("agent,task,frame,episode_reward\nDrQ-v2,cheetah_run,0,1.0\n", "row 1 has no seed (the columns it needs: "),
        ("seed,frame,episode_reward\n1,0,1.0\n,20000,2.0\n", "row 2 has seed '', not a number"),
        ("seed,frame,episode_reward\n1,inf,2.0\n", "row 1 has frame 'inf', not a number"),
        ("seed,frame,episode_reward\n", "holds no rows (a header only, or nothing)"),
    ],
)
def test_a_reference_csv_that_is_not_one_is_one_line(synthetic_runs, tmp_path, content, problem):
    (tmp_path / "reference").mkdir()
    path = tmp_path / "reference" / "dmc_cheetah_run.csv"
    path.write_text(content)
    args = plot.Args(runs_dir=str(synthetic_runs), out=str(tmp_path / "plots"), reference=str(tmp_path / "reference"))
    with pytest.raises(SystemExit, match=f"^plot.py: {re.escape(str(path))}:? {re.escape(problem)}"):
        plot.main(args)
    assert not (tmp_path / "plots").exists()


def test_plot_writes_nothing_through_a_link_in_its_out_folder(synthetic_runs, tmp_path):
    (tmp_path / "plots").mkdir()
    target = tmp_path / "target"
    target.write_text("someone's file")
    (tmp_path / "plots" / "tasks.pdf").symlink_to(target)
    message = f"{tmp_path / 'plots' / 'tasks.pdf'} is a symbolic link, which plot.py does not write through"
    with pytest.raises(SystemExit, match=re.escape(message)):
        plot.main(plot.Args(runs_dir=str(synthetic_runs), out=str(tmp_path / "plots")))
    assert target.read_text() == "someone's file"


@pytest.mark.parametrize(
    "planted",
    ["sweep.lock", "sweep.sbatch", "logs", "runs", "logs/drqv2_continuous_action__cartpole_balance__1.log"]
    + ["logs/plot.log", "plots/results.md"],
)
def test_a_link_planted_where_the_sweep_writes_is_refused_and_its_target_untouched(tmp_path, planted):
    out = tmp_path / "sweep"
    target = tmp_path / "target"
    target.write_text("someone's file\n")
    (out / planted).parent.mkdir(parents=True, exist_ok=True)
    (out / planted).symlink_to(target)
    mode = ["--slurm", "--gpus", "0"] if planted == "sweep.sbatch" else []
    sweep = ["--scripts", "drqv2_continuous_action.py", "--env-ids", "cartpole_balance", "--num-seeds", "1"]
    env = {"PYTHON": fake_python(tmp_path / "python", "exit 0")}
    result = run_benchmark([*mode, *sweep, "--no-disk-check", "--out", str(out)], tmp_path, env=env)
    one_line_refusal(result, f"'{out / planted}' is a symbolic link: a sweep writes nothing through one (remove it)")
    assert target.read_text() == "someone's file\n"


def test_numbers_are_read_in_decimal(tmp_path):
    """bash reads 010 as octal 8, and 08 not at all (a sweep of 0 runs that exited 0)."""
    sweep = ["--dry-run", "--scripts", "drqv2_continuous_action.py", "--env-ids", "cartpole_balance", "--num-seeds"]
    for first, seeds in [("08", ["8", "9"]), ("010", ["10", "11"])]:
        result = run_benchmark([*sweep, "02", "--first-seed", first, "--out", str(tmp_path / "s")], tmp_path)
        assert result.returncode == 0 and re.findall(r"--seed (\d+) ", result.stdout) == seeds, result.stderr


def test_printed_and_submitted_commands_keep_every_word_in_bash_and_in_sh(tmp_path):
    """--dry-run's lines, the plot job's `sbatch --wrap` (run by /bin/sh: dash reads no $'...', which bash's %q gives a
    non-ASCII word under LC_ALL=C) and the job script, with an --out holding $(...), quotes, % and a non-ASCII letter:
    each word arrives as it is and nothing in it runs."""
    marker = tmp_path / "ran"
    out = tmp_path / f"sw é 50% $(touch {marker}) `touch {marker}` it's"
    record = tmp_path / "record"
    record.mkdir()
    python = tmp_path / "python"  # records what it is asked to run, by the program's name; runs the sweep's checks
    python.write_text(
        f'#!/bin/bash\n[ "$1" = - ] && exec {sys.executable} "$@"\nprintf "%s\\0" "$@" > "$RECORD_DIR/${{1##*/}}"\n'
    )
    python.chmod(0o755)
    (tmp_path / "bin").mkdir()
    sbatch = tmp_path / "bin" / "sbatch"  # records its arguments, as many calls as it gets
    sbatch.write_text('#!/bin/bash\nprintf "%s\\0" "$@" >> "$RECORD_DIR/sbatch"\necho 42\n')
    sbatch.chmod(0o755)
    env = {
        "PYTHON": str(python),
        "RECORD_DIR": str(record),
        "LC_ALL": "C",
        "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}",
    }
    sweep = ["--scripts", "drqv2_continuous_action.py", "--env-ids", "cartpole_balance", "--num-seeds", "1"]
    sweep += ["--no-disk-check", "--out", str(out)]

    def words(program):
        return (record / program).read_text().split("\0")[:-1]

    run = [str(ROOT / "drqv2_continuous_action.py"), "--env-id", "cartpole_balance", "--seed", "1", "--resume", "auto"]
    run += ["--total-timesteps", "1000000"]
    plotting = [str(ROOT / "plot.py"), "--runs-dir", f"{out}/runs", "--out", f"{out}/plots"]
    dry = run_benchmark(["--dry-run", *sweep], tmp_path, env=env)
    assert dry.returncode == 0, dry.stderr
    (line,) = [line for line in dry.stdout.splitlines() if "--env-id" in line]
    plot_line = dry.stdout.split("then: ")[1]
    (out / "logs").mkdir(parents=True)
    for shell in ["bash", "sh"]:
        subprocess.run([shell, "-c", line], env={**os.environ, **env}, check=True)
        subprocess.run([shell, "-c", plot_line], env={**os.environ, **env}, check=True)
        assert words("drqv2_continuous_action.py") == run and words("plot.py") == plotting
    assert (out / "logs" / "drqv2_continuous_action__cartpole_balance__1.log").exists(), "the log path as printed"

    submitted = run_benchmark(["--slurm", "--gpus", "0", *sweep], tmp_path, env=env)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    calls = (record / "sbatch").read_text().split("\0")
    assert f"--output={str(out).replace('%', '%%')}/logs/%A_%a.log" in calls, "a % of the path is not Slurm's pattern"
    (wrap,) = [word[len("--wrap=") :] for word in calls if word.startswith("--wrap=")]
    subprocess.run(["sh", "-c", wrap], env={**os.environ, **env}, check=True)
    assert words("plot.py") == plotting
    element = {**os.environ, **env, "SLURM_ARRAY_TASK_ID": "0", "SLURM_CPUS_PER_TASK": "1"}
    subprocess.run(["bash", str(out / "sweep.sbatch")], env=element, check=True, capture_output=True)
    assert words("drqv2_continuous_action.py") == run
    assert not marker.exists(), "a word ran a command"


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGALRM], ids=["SIGUSR1", "SIGALRM"])
def test_a_signal_that_would_end_the_sweep_stops_its_runs_first(tmp_path, signum):
    """SIGUSR1 ended the harness (exit 138) and left its run going, unsupervised."""
    record = tmp_path / "record"
    record.mkdir()
    body = 'trap \'echo stopped >> "$RECORD_DIR/stopped"; exit 0\' TERM\necho $$ >> "$RECORD_DIR/pids"\n'
    body += "while true; do sleep 0.1; done"
    env = {**os.environ, "PYTHON": fake_python(tmp_path / "python", body), "RECORD_DIR": str(record)}
    command = ["--scripts", "drqv2_continuous_action.py", "--env-ids", "cartpole_balance", "--num-seeds", "1"]
    command += ["--no-plot", "--no-disk-check", "--out", str(tmp_path / "sweep")]
    sweep = subprocess.Popen(
        ["bash", str(ROOT / "benchmark.sh"), *command], cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        deadline = time.time() + 120
        while not (record / "pids").exists():
            assert sweep.poll() is None and time.time() < deadline, "the sweep started no run"
            time.sleep(0.1)
        sweep.send_signal(signum)
        assert sweep.wait(timeout=60) == 130
        assert (record / "stopped").read_text() == "stopped\n", "the run was stopped as by Ctrl-C"
    finally:
        if sweep.poll() is None:
            sweep.kill()
        with contextlib.suppress(ProcessLookupError, ValueError, FileNotFoundError):
            os.kill(int((record / "pids").read_text()), signal.SIGKILL)
