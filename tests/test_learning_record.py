"""benchmarks/learning/record.py: a run's evaluations written as CSV rows with their provenance, and the figure."""

import csv
import glob
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_benchmark import write_run

from conftest import ROOT, load_script, read_scalars

RECORD = ROOT / "benchmarks" / "learning" / "record.py"


def test_records_a_run_with_its_provenance_and_draws_the_figure(tiny_run, tmp_path, monkeypatch):
    _, run_dir = tiny_run("drqv2_continuous_action")
    out = tmp_path / "new" / "learning"  # made by record.py
    command = [sys.executable, str(RECORD), run_dir, "--commit", "abc1234", "--device", "NVIDIA H200", "--cpus", "16"]
    recorded = subprocess.run([*command, "--out", str(out)], capture_output=True, text=True, check=False)
    assert recorded.returncode == 0, recorded.stderr[-3000:]

    (path,) = glob.glob(str(out / "*.csv"))
    with open(path) as f:
        rows = list(csv.DictReader(f))
    evaluations = read_scalars(run_dir)["eval/episodic_return"]
    assert [int(r["frame"]) for r in rows] == [step for step, _ in evaluations] == [0, 120, 240]
    assert [float(r["eval_return"]) for r in rows] == [round(value, 2) for _, value in evaluations]
    first = rows[0]
    assert (first["script"], first["commit"], first["env_id"], first["seed"]) == (
        "drqv2_continuous_action",
        "abc1234",
        "cartpole_balance",
        "1",
    )
    assert (first["device"], first["cpus"]) == ("NVIDIA H200", "16")
    seconds = [int(r["wall_seconds"]) for r in rows]
    assert seconds == sorted(seconds) and seconds[-1] > 0
    flags = first["flags"].split(" --")
    assert "--batch-size 8" in first["flags"] and "--max-episode-frames 40" in first["flags"]
    assert not any(flag.startswith(("seed", "env-id", "learning-rate")) for flag in flags), "only non-defaults"

    # the same settings at another commit: a second run, not one that replaces the first
    (out / "again.csv").write_text(Path(path).read_text().replace("abc1234", "def5678"))
    drawn = subprocess.run(
        [sys.executable, str(RECORD), "--figure", "--out", str(out), "--frames", "120", "240", "40000"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert drawn.returncode == 0, drawn.stderr[-3000:]
    assert (out / "learning.png").stat().st_size > 10_000
    assert "| task | runs | 120 | 240 | 40k |" in drawn.stdout, "frames under 1000 are named as they are"
    for commit in ["abc1234", "def5678"]:
        assert (
            f"| cartpole_balance | drqv2_continuous_action, seed 1, commit {commit}, NVIDIA H200, `--" in drawn.stdout
        )
    # the published seeds at 40k frames, read here from the reference CSV: minimum, median and maximum
    with open(ROOT / "reference" / "drqv2_curves" / "dmc_cartpole_balance.csv") as f:
        at = sorted(float(r["episode_reward"]) for r in csv.DictReader(f) if int(float(r["frame"])) == 40000)
    assert len(at) == 10
    middle = (at[4] + at[5]) / 2
    published = f"{at[0]:.0f} / {middle:.0f} / {at[-1]:.0f}"
    row = f"| cartpole_balance | DrQ-v2 published, 10 seeds: min / median / max |  |  | {published} |"
    assert row in drawn.stdout

    # actor_saturation.py on the same run: the frame of its checkpoint, and shares and spreads that are well formed
    sys.path.insert(0, str(ROOT / "benchmarks" / "learning"))
    from actor_saturation import saturation

    result = saturation(run_dir, states=64)
    assert result["frame"] == 240 and 0.0 <= result["saturated_share"] <= 1.0 and result["pre_tanh_std"] > 0
    assert result["states"] == "states the policy visits", "a finished run's checkpoint holds no replay"
    for name in ["drqv2_continuous_action", "taco_continuous_action"]:  # TACO's critic scores the latent g(a)
        result = saturation(tiny_run(name)[1], states=64)
        assert np.isfinite(result["q_gap_mean"])
        assert result["step_moves"] != 0, "the actor's Adam moments, from its updates, move its output"
    # critics whose best action is known: inside the range at 0.5 (either way along the line), at the edge +1, and
    # nowhere (a flat critic, which no state prefers and whose ties count as the edge)
    critic = load_script("drqv2_continuous_action").Critic
    for value, inside, prefers in [
        (lambda a: -((a - 0.5) ** 2), 1.0, None),
        (lambda a: a, 0.0, None),
        (lambda a: 0 * a, 0.0, 0.0),
    ]:
        monkeypatch.setattr(
            critic, "forward", lambda self, features, action, value=value: (value(action), value(action))
        )
        result = saturation(run_dir, states=16)
        assert result["inside_best_share"] == inside
        assert prefers is None or result["critic_prefers_share"] == prefers
    assert result["latent_straightness"] is None, "DrQ-v2's critic scores the action itself"
    # TACO's latent action g(a) along the line: straight when linear in the action, not at all when even in it; and
    # the action weighs twice as much in the critics' first layers when g is twice as steep
    encoder = load_script("taco_continuous_action").ActionEncoder
    weights = []
    for latent, straightness in [
        (lambda a: (3 * a + 1).repeat(1, 2), 1.0),
        (lambda a: (6 * a + 1).repeat(1, 2), 1.0),
        (lambda a: a.repeat(1, 2) ** 2, 0.0),
    ]:
        monkeypatch.setattr(encoder, "forward", lambda self, action, latent=latent: latent(action))
        result = saturation(tiny_run("taco_continuous_action")[1], states=16)
        assert result["latent_straightness"] == pytest.approx(straightness, abs=1e-4)
        weights.append(result["action_weight"])
    assert weights[1] == pytest.approx([2 * weight for weight in weights[0]], rel=1e-4) and min(weights[0]) > 0


def test_the_figure_has_a_panel_for_each_task_agent_and_precision(tmp_path, monkeypatch, capsys):
    """A grid: a row per task and precision, a column per agent, each panel with its own few legend entries (no panel
    where no run is); TACO's panels also have the mean of our DrQ-v2 setting of their precision with the most seeds,
    to compare the two agents."""
    record = load_record()
    learning = ROOT / "benchmarks" / "learning"
    names = ["drqv2_continuous_action__1__1795711990", "drqv2_continuous_action__1__1795705547"]
    names += ["drqv2_continuous_action__1__1796468670", "drqv2_continuous_action__2__1796468670"]  # 1223c7d, fp32
    names += ["taco_continuous_action__1__1796283300"]
    for name in names:
        (tmp_path / f"{name}.csv").write_text((learning / f"cartpole_balance__{name}.csv").read_text())
    drawn = []
    monkeypatch.setattr(record.plot, "save_figure", lambda fig, path: drawn.append(fig))
    record.figure(record.Args(figure=True, out=str(tmp_path), frames=[10_000, 20_000]))
    (fig,) = drawn
    panels = [ax for ax in fig.axes if ax.get_visible()]
    titles = [ax.get_title() for ax in panels]
    assert titles == [f"cartpole_balance: {name}" for name in ["DrQ-v2, fp32", "TACO, fp32", "DrQ-v2, --amp bf16"]]
    assert len(fig.axes) == 4  # TACO in bf16: no run, no panel
    # the published curve and the panel's runs (the two 1223c7d seeds share an entry); TACO's: our DrQ-v2 too
    assert [len(ax.get_legend().get_texts()) for ax in panels] == [3, 3, 2]
    (ours,) = [line for line in panels[1].get_lines() if line.get_label().startswith("DrQ-v2 fp32 (mean)")]
    assert ours.get_label().startswith("DrQ-v2 fp32 (mean), seeds 1, 2, 1223c7d")
    seeds = [np.loadtxt(tmp_path / f"{name}.csv", delimiter=",", skiprows=1, usecols=(4, 5)) for name in names[2:4]]
    assert list(ours.get_xdata()) == list(seeds[0][:, 0])
    np.testing.assert_allclose(ours.get_ydata(), (seeds[0][:, 1] + seeds[1][:, 1]) / 2)
    # the table: one commit's seeds of one setting share a row, each seed's return in turn
    at = [" / ".join(f"{seed[list(seed[:, 0]).index(frame), 1]:.0f}" for seed in seeds) for frame in (10_000, 20_000)]
    (row,) = [line for line in capsys.readouterr().out.splitlines() if "seeds 1 / 2, commit 1223c7d" in line]
    assert row.startswith("| cartpole_balance | drqv2_continuous_action, seeds 1 / 2, commit 1223c7d, CPU Intel")
    assert row.endswith(" | " + " | ".join(at) + " |")
    # a TACO run in bf16 gets its panel, beside DrQ-v2 in bf16 (its setting with the most seeds), not fp32
    taco = (tmp_path / f"{names[-1]}.csv").read_text()
    (tmp_path / "taco_bf16.csv").write_text(taco.replace("--batch-size 256", "--batch-size 256 --amp bf16"))
    for name in ["drqv2_continuous_action__2__1796679929", "drqv2_continuous_action__3__1796686475"]:  # 189b5af
        (tmp_path / f"{name}.csv").write_text((learning / f"cartpole_balance__{name}.csv").read_text())
    record.figure(record.Args(figure=True, out=str(tmp_path), frames=[10_000, 20_000]))
    panels = [ax for ax in drawn[1].axes if ax.get_visible()]
    assert panels[3].get_title() == "cartpole_balance: TACO, --amp bf16"
    (ours,) = [line for line in panels[3].get_lines() if line.get_linestyle() == ":"]
    assert ours.get_label().startswith("DrQ-v2 --amp bf16 (mean), seeds 2, 3, 189b5af")


def test_a_run_folder_that_is_not_there_or_holds_runs_is_one_line(tmp_path):
    missing = tmp_path / "runs" / "gone"
    recorded = subprocess.run(
        [sys.executable, str(RECORD), str(missing), "--out", str(tmp_path)], capture_output=True, text=True, check=False
    )
    assert recorded.returncode != 0 and recorded.stderr == f"record.py: {missing} is not a folder\n", recorded.stderr
    write_run(
        tmp_path / "runs" / "one",
        {"exp_name": "drqv2_continuous_action", "env_id": "cartpole_balance", "seed": 1},
        [(0, 1.0)],
    )
    record = load_record()
    with pytest.raises(record.plot.Unreadable, match=r"\(a folder of runs\? give its runs: runs/\*\)"):
        record.record(record.Args(run_dirs=[str(tmp_path / "runs")], out=str(tmp_path / "out")))


def test_provenance_names_the_cpu_model_and_leaves_out_how_the_process_started():
    """A sweep's runs all start with --resume auto: not a setting of the run. The default device is the CPU's model
    (platform.processor() gave "x86_64" on Linux)."""
    sys.path.insert(0, str(ROOT / "benchmarks" / "learning"))
    import record

    logged = {"env_id": "cartpole_balance", "seed": "2", "exp_name": "drqv2_continuous_action", "resume": "auto"}
    logged["batch_size"] = "64"
    assert record.non_default_flags(record.plot.script_of(logged), logged) == "--batch-size 64"
    with open("/proc/cpuinfo") as cpuinfo:
        models = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    assert models, "this test needs a /proc/cpuinfo that names the CPU model"
    assert record.processor() == models[0] and models[0] not in ("x86_64", "")


def test_the_seeds_of_one_setting_share_one_legend_entry():
    sys.path.insert(0, str(ROOT / "benchmarks" / "learning"))
    import record

    sweep = [("drqv2_continuous_action", "cartpole_balance", "CPU", "--amp bf16", seed, "abc1234") for seed in "312"]
    other_commit = ("drqv2_continuous_action", "cartpole_balance", "CPU", "--amp bf16", "1", "def5678")
    other_task = ("drqv2_continuous_action", "walker_walk", "CPU", "--amp bf16", "2", "abc1234")
    labels = record.legend_labels({key: None for key in [*sweep, other_commit, other_task]})
    assert labels[sweep[0]] == "DrQ-v2, seeds 1, 2, 3, abc1234, CPU\n(--amp bf16)"
    assert labels[sweep[1]] is None and labels[sweep[2]] is None, "one entry for the sweep"
    assert labels[other_commit] == "DrQ-v2, seed 1, def5678, CPU\n(--amp bf16)"
    assert labels[other_task] == "DrQ-v2, seed 2, abc1234, CPU\n(--amp bf16)"


def load_record():
    sys.path.insert(0, str(ROOT / "benchmarks" / "learning"))
    import record

    return record


@pytest.mark.parametrize("log", ["names a file", "has a row twice"])
def test_a_run_is_recorded_with_one_of_the_two_scripts_never_code_its_log_names(tmp_path, log):
    """record.py imported `<repo>/<exp_name>.py`, exp_name read from the run's log: a crafted log, or a setting holding a
    newline (a second exp_name row), made it import any .py file."""
    record = load_record()
    (tmp_path / "evil.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').close()\n")
    hyperparameters = {"exp_name": os.path.relpath(tmp_path / "evil", ROOT), "env_id": "cartpole_balance", "seed": 1}
    message = "its settings are not those of drqv2_continuous_action or taco_continuous_action: no script to record"
    if log == "has a row twice":
        hyperparameters = {"exp_name": "drqv2_continuous_action", "env_id": "cartpole_balance", "seed": 1}
        hyperparameters["wandb_entity"] = f"x\n|exp_name|{os.path.relpath(tmp_path / 'evil', ROOT)}"
        message = "its hyperparameters table names exp_name twice"
    write_run(tmp_path / "run", hyperparameters, [(0, 1.0)])
    args = record.Args(run_dirs=[str(tmp_path / "run")], commit="abc1234", out=str(tmp_path / "out"))
    with pytest.raises(record.plot.Unreadable, match=f"^{tmp_path / 'run'}: {message}"):
        record.record(args)
    assert not (tmp_path / "ran").exists(), "the file the log named was imported"


def test_record_without_runs_says_what_to_give():
    """It exited 0 having done nothing."""
    record = load_record()
    with pytest.raises(record.plot.Unreadable, match="^nothing to record: give run directories"):
        record.record(record.Args())


def test_a_run_of_a_task_the_scripts_do_not_know_is_one_line(tmp_path):
    """A log's task with no preset: record.py failed with a traceback from the script's own check."""
    record = load_record()
    write_run(tmp_path / "run", {"exp_name": "drqv2_continuous_action", "env_id": "no_such_task", "seed": 1}, [(0, 1)])
    args = record.Args(run_dirs=[str(tmp_path / "run")], commit="abc1234", out=str(tmp_path / "out"))
    with pytest.raises(record.plot.Unreadable, match="run: its task 'no_such_task' is not one of drqv2_continuous_act"):
        record.record(args)


@pytest.mark.parametrize("name", ["drqv2_continuous_action", "taco_continuous_action"])
def test_a_run_with_an_exp_name_of_its_own_is_recorded_with_the_script_its_settings_are_of(tmp_path, name):
    record = load_record()
    script = load_script(name)
    logged = vars(script.resolve_args(script.Args(env_id="cartpole_balance", exp_name="my_ablation", batch_size=64)))
    write_run(tmp_path / "run", {**logged, "algorithm": script.ALGORITHM}, [(0, 1.0), (100, 2.0)])  # as logged
    record.record(record.Args(run_dirs=[str(tmp_path / "run")], commit="abc1234", out=str(tmp_path / "out")))
    with open(tmp_path / "out" / "run.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["script"], r["frame"], r["eval_return"]) for r in rows] == [(name, "0", "1.00"), (name, "100", "2.00")]
    assert rows[0]["flags"] == "--exp-name my_ablation --batch-size 64"


def test_a_run_of_edited_code_is_not_recorded_as_the_script(tmp_path, capsys, monkeypatch):
    """A run of an edited copy that kept the script's name was recorded as the script at this checkout's commit, and
    the figure averaged it with the script's seeds. Its algorithm hash says so: refused, unless --commit names a
    commit whose script has that hash (any commit was taken: an edited copy passed for a commit's script). The other
    runs of the same command are still recorded."""
    record = load_record()
    script = load_script("drqv2_continuous_action")
    logged = vars(script.resolve_args(script.Args(env_id="cartpole_balance")))
    write_run(tmp_path / "run", {**logged, "algorithm": "0123456789abcdef"}, [(0, 1.0), (100, 2.0)])
    write_run(tmp_path / "good", {**logged, "algorithm": script.ALGORITHM}, [(0, 1.0), (100, 2.0)])
    both = [str(tmp_path / "run"), str(tmp_path / "good")]  # the refused run first: the other is still recorded
    with pytest.raises(record.plot.Unreadable, match="ran other code than this checkout's drqv2_continuous_action.py"):
        record.record(record.Args(run_dirs=both, out=str(tmp_path / "out")))
    assert not (tmp_path / "out" / "run.csv").exists() and (tmp_path / "out" / "good.csv").exists()
    with pytest.raises(record.plot.Unreadable, match=r"\(1 of 2 runs not recorded\)"):
        record.record(record.Args(run_dirs=both, out=str(tmp_path / "out")))
    with pytest.raises(record.plot.Unreadable, match="algorithm 0123456789abcdef.*, nor the one at commit abc1234:"):
        record.record(record.Args(run_dirs=[str(tmp_path / "run")], commit="abc1234", out=str(tmp_path / "out")))
    assert not (tmp_path / "out" / "run.csv").exists()
    assert record.algorithm_at("abc1234", "drqv2_continuous_action") is None  # no such commit
    assert re.fullmatch("[0-9a-f]{16}", record.algorithm_at("HEAD", "drqv2_continuous_action"))
    hashes = {("abc1234", "drqv2_continuous_action"): "0123456789abcdef"}  # a commit whose script is that code
    monkeypatch.setattr(record, "algorithm_at", lambda commit, name: hashes.get((commit, name)))
    record.record(record.Args(run_dirs=[str(tmp_path / "run")], commit="abc1234", out=str(tmp_path / "out")))
    assert "ran drqv2_continuous_action.py of commit abc1234, as --commit says" in capsys.readouterr().out
    assert (tmp_path / "out" / "run.csv").exists()


@pytest.mark.parametrize(
    "rows,problem",
    [
        ([], "holds no rows (a header only, or nothing)"),
        ([["drqv2", "abc", "cartpole_balance", "", "0", "1.0", "CPU", ""]], "row 1 has seed '', not a number"),
    ],
)
def test_a_recorded_csv_that_is_not_one_is_one_line(tmp_path, rows, problem):
    folder = tmp_path / "learning[1]"  # a folder's name is a path, not a pattern
    folder.mkdir()
    with open(folder / "run.csv", "w", newline="") as f:
        csv.writer(f).writerows(
            [["script", "commit", "env_id", "seed", "frame", "eval_return", "device", "flags"], *rows]
        )
    command = [sys.executable, str(RECORD), "--figure", "--out", str(folder)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert (
        result.returncode == 1 and result.stderr == f"record.py: {folder / 'run.csv'}{':' if rows else ''} {problem}\n"
    )
