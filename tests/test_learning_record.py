"""benchmarks/learning/record.py: a run's evaluations written as CSV rows with their provenance, and the figure."""

import csv
import glob
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, read_scalars

RECORD = ROOT / "benchmarks" / "learning" / "record.py"


def test_records_a_run_with_its_provenance_and_draws_the_figure(tiny_run, tmp_path):
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
    assert "| task | run | 120 | 240 | 40k |" in drawn.stdout, "frames under 1000 are named as they are"
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


def test_provenance_names_the_cpu_model_and_leaves_out_how_the_process_started():
    """A sweep's runs all start with --resume auto: not a setting of the run. The default device is the CPU's model
    (platform.processor() gave "x86_64" on Linux)."""
    sys.path.insert(0, str(ROOT / "benchmarks" / "learning"))
    import record

    logged = {"env_id": "cartpole_balance", "seed": "2", "exp_name": "drqv2_continuous_action", "resume": "auto"}
    logged["batch_size"] = "64"
    assert record.non_default_flags("drqv2_continuous_action", logged) == "--batch-size 64"
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
