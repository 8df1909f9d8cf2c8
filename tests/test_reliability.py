"""Long runs: checkpoints, kill and resume, signals, damaged checkpoints, bad input, non-finite losses."""

import errno
import glob
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import ROOT, TINY_RUN, read_scalars, run_script

# 8 episodes of 40 frames, a checkpoint at each episode end, evaluations at 0, 160 and 320 frames
RUN = [*TINY_RUN, "--total-timesteps", "320", "--eval-every", "160", "--checkpoint-every", "40", "--save-model"]


def start_script(name, args, cwd):
    env = {**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}
    command = [sys.executable, str(ROOT / f"{name}.py"), *args]
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_checkpoint(process, cwd, timeout=300):
    deadline = time.time() + timeout
    while not glob.glob(str(cwd / "runs" / "*" / "checkpoint.pt")):
        assert process.poll() is None, process.stdout.read()
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.2)
    return glob.glob(str(cwd / "runs" / "*"))[0]


def load(path):
    return torch.load(path, weights_only=True)


def assert_same_tensors(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_tensors(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.fixture(scope="module")
def uninterrupted(request, tmp_path_factory):
    """The reference: each script's tiny run, start to end without interruption."""
    results = {}

    def get(name):
        if name not in results:
            cwd = tmp_path_factory.mktemp(f"uninterrupted_{name}")
            result = run_script(name, RUN, cwd=cwd)
            assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
            results[name] = glob.glob(str(cwd / "runs" / "*"))[0]
        return results[name]

    return get


def test_sigkill_then_resume_gives_the_uninterrupted_run(script, uninterrupted, tmp_path):
    name = script.__name__
    process = start_script(name, RUN, tmp_path)
    run_dir = wait_for_checkpoint(process, tmp_path)
    delay = random.uniform(0.0, 4.0)
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.wait()
    at_kill = load(f"{run_dir}/checkpoint.pt")
    assert 0 < at_kill["global_step"] < 160, f"killed {delay:.1f} s after the first checkpoint, not mid-run"

    resumed = run_script(name, [*RUN, "--resume", "auto"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert f"resuming {os.path.basename(run_dir)}" in resumed.stdout
    assert len(glob.glob(str(tmp_path / "runs" / "*"))) == 1, "the same run directory continues"

    reference = uninterrupted(name)
    ours, theirs = read_scalars(run_dir), read_scalars(reference)
    assert ours.keys() == theirs.keys()
    for tag in ours:
        steps = [step for step, _ in ours[tag]]
        assert len(steps) == len(set(steps)), f"{tag}: a step logged twice"
        assert steps == [step for step, _ in theirs[tag]], f"{tag}: steps missing or extra"
    assert ours["eval/episodic_return"][-1][0] == 320

    # Same parameters and optimizer states as the uninterrupted run (CPU, same threads: exactly), same replay.
    final, reference_final = load(f"{run_dir}/checkpoint.pt"), load(f"{reference}/checkpoint.pt")
    assert final["global_step"] == reference_final["global_step"] == 160
    assert_same_tensors(final["agent"], reference_final["agent"], "agent")
    assert_same_tensors(final["replay"], reference_final["replay"], "replay")
    for tag in ["eval/episodic_return", "losses/critic_loss"]:
        assert ours[tag] == theirs[tag], tag


def test_checkpoint_replay_round_trip(script):
    from test_replay import make_episode, store

    rng = np.random.default_rng(0)
    replay = script.ReplayBuffer(60, (3, 6, 6), 2, frame_stack=3, nstep=2, gamma=0.9, seed=3)
    for i in range(9):  # wraps the ring and evicts
        store(replay, make_episode(rng, i, 10))
    store(replay, make_episode(rng, 9, 10), finish=False)  # unfinished: not part of the checkpoint
    state = replay.state_dict()
    copy = script.ReplayBuffer(60, (3, 6, 6), 2, frame_stack=3, nstep=2, gamma=0.9, seed=99)
    copy.load_state_dict(state)
    assert copy.num_transitions == replay.num_transitions and list(copy.episodes) == list(replay.episodes)
    a, b = replay.sample(500), copy.sample(500)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert 9 not in {int(x) for x in a["obs"][:, -3, 0, 0]}


def test_sigterm_writes_a_checkpoint_and_exits_cleanly(tmp_path):
    process = start_script("drqv2_continuous_action", RUN, tmp_path)
    run_dir = wait_for_checkpoint(process, tmp_path)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, output
    assert "Traceback" not in output
    checkpoint = load(f"{run_dir}/checkpoint.pt")
    frame = checkpoint["global_step"] * 2
    resume_hint = f"resume with --resume runs/{os.path.basename(run_dir)}"
    assert f"stopped by SIGTERM with a checkpoint at frame {frame}; {resume_hint}" in output
    assert not glob.glob(f"{run_dir}/*.tmp")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("finished")
    result = run_script("drqv2_continuous_action", [*TINY_RUN, "--total-timesteps", "80"], cwd=cwd)
    assert result.returncode == 0, result.stderr[-2000:]
    return cwd, glob.glob(str(cwd / "runs" / "*"))[0]


def snapshot(folder):
    return {
        path: open(path, "rb").read()
        for path in sorted(glob.glob(f"{folder}/**", recursive=True))
        if os.path.isfile(path)
    }


@pytest.mark.parametrize("damage", ["truncate 10", "truncate 50", "truncate 99", "flip middle", "flip end"])
def test_damaged_checkpoint_is_refused_and_the_run_left_as_it_was(finished_run, tmp_path, damage):
    from conftest import load_script

    drqv2 = load_script("drqv2_continuous_action")
    run_dir = tmp_path / "runs" / os.path.basename(finished_run[1])
    shutil.copytree(finished_run[1], run_dir)
    path = run_dir / "checkpoint.pt"
    data = bytearray(path.read_bytes())
    kind, where = damage.split()
    if kind == "truncate":
        data = data[: len(data) * int(where) // 100]
    else:  # a byte inside the tensors' data, or near the end of the file (the zip's directory)
        position = len(data) // 2 if where == "middle" else len(data) - 200
        data[position] ^= 0xFF
    path.write_bytes(bytes(data))
    before = snapshot(tmp_path)
    os.chdir(tmp_path)
    args = parse(drqv2, [*TINY_RUN, "--resume", str(run_dir)])
    with pytest.raises(drqv2.RunError, match="checkpoint .* (unreadable or corrupt|is corrupt)"):
        drqv2.main(args)
    assert snapshot(tmp_path) == before, "nothing was written"


def bad_input_cases():
    return {
        "batch larger than the replay at learning_starts": (["--batch-size", "64"], "--batch-size 64 is larger than"),
        "non-positive size": (["--hidden-dim", "0"], "--hidden-dim must be positive"),
        "negative count": (["--checkpoint-every", "-1"], "--checkpoint-every must be non-negative"),
        "n-step longer than an episode": (["--nstep", "20"], "--nstep must be shorter than an episode (20 agent"),
        "malformed schedule": (["--stddev-schedule", "linear(1.0,0.1)"], "--stddev-schedule must be"),
        "no checkpoint to resume": (["--resume", "runs/nothing"], "no checkpoint.pt in that directory"),
    }


def parse(module, argv):
    """Args exactly as the script's command line would give them."""
    import tyro

    return tyro.cli(module.Args, args=argv)


@pytest.mark.parametrize("case", list(bad_input_cases()))
def test_bad_input_fails_fast_naming_the_problem(case, tmp_path):
    from conftest import load_script

    drqv2 = load_script("drqv2_continuous_action")
    extra, message = bad_input_cases()[case]
    os.chdir(tmp_path)
    with pytest.raises(drqv2.RunError, match=re.escape(message)):
        drqv2.main(parse(drqv2, [*TINY_RUN, *extra]))
    assert not (tmp_path / "runs").exists()


def test_bad_input_from_the_command_line_and_a_renderer_that_cannot_start(tmp_path):
    result = run_script("taco_continuous_action", [*TINY_RUN, "--multistep", "0"], cwd=tmp_path)
    assert result.returncode != 0 and "error: --multistep must be positive" in result.stderr
    result = run_script("drqv2_continuous_action", TINY_RUN, cwd=tmp_path, env={"MUJOCO_GL": "bogus"})
    assert result.returncode != 0 and "MuJoCo rendering could not start with MUJOCO_GL=bogus" in result.stderr
    assert "MUJOCO_GL=egl" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()


def test_resume_with_other_settings_names_the_differences(finished_run):
    from conftest import load_script

    drqv2 = load_script("drqv2_continuous_action")
    cwd, run_dir = finished_run
    os.chdir(cwd)
    argv = [*TINY_RUN, "--total-timesteps", "80"]
    args = parse(drqv2, argv)
    with pytest.raises(drqv2.RunError, match=r"--hidden-dim is 32 in the checkpoint but 64 now; --tau is 0.01"):
        drqv2.main(drqv2.dataclasses.replace(args, resume=run_dir, hidden_dim=64, tau=0.02))
    done = run_script("drqv2_continuous_action", [*argv, "--resume", "auto"], cwd=cwd)
    assert done.returncode == 0 and "already ran 80 frames: nothing to do" in done.stdout


def test_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path):
    result = run_script("drqv2_continuous_action", [*RUN, "--learning-rate", "1e30"], cwd=tmp_path)
    assert result.returncode != 0
    assert re.search(
        r"error: non-finite losses/\w+ \(\S+\) at frame 120; stopping without checkpointing", result.stderr
    )
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    from conftest import load_script

    drqv2 = load_script("drqv2_continuous_action")
    kept = drqv2.load_checkpoint(f"{run_dir}/checkpoint.pt")  # whole: its digest matches
    assert kept["global_step"] == 40, "the frame-80 checkpoint, from before the first update, is kept"


def test_full_disk_keeps_the_previous_checkpoint(script, tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pt")
    script.save_checkpoint(path, {"weights": torch.ones(3), "step": 1})

    def no_space(*_, **__):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(script.torch, "save", no_space)
    with pytest.raises(script.RunError, match="No space left on device.*the previous checkpoint is kept"):
        script.save_checkpoint(path, {"weights": torch.zeros(3), "step": 2})
    assert script.load_checkpoint(path)["step"] == 1 and not os.path.exists(path + ".tmp")
