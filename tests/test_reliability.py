"""Long runs: checkpoints, kill and resume, signals, damaged checkpoints, bad input, non-finite losses."""

import contextlib
import errno
import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import ROOT, TINY_RUN, default_signals, load_script, read_scalars, run_in_process, run_script

machinery = load_script("drqv2_continuous_action")  # the checkpoint functions, the same in both scripts

# 8 episodes of 40 frames, a checkpoint at each episode end, evaluations at 0, 160 and 320 frames
RUN = [*TINY_RUN, "--total-timesteps", "320", "--eval-every", "160", "--checkpoint-every", "40", "--save-model"]


def start_script(name, args, cwd, env=None):
    env = {**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl"), **(env or {})}
    command = [sys.executable, str(ROOT / f"{name}.py"), *args]
    output = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
    return subprocess.Popen(command, cwd=cwd, env=env, preexec_fn=default_signals, **output)  # noqa: PLW1509


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
        assert a.dtype == b.dtype and torch.equal(a, b), where
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
            run_in_process(name, RUN, cwd)
            results[name] = glob.glob(str(cwd / "runs" / "*"))[0]
        return results[name]

    return get


def a_run(run_dir, args, agent, env):
    """What write_checkpoint reads of a Run: a run at frame 40, its last evaluation 1.0, no checkpoint before."""
    import types

    return types.SimpleNamespace(
        run_dir=str(run_dir), args=args, agent=agent, envs=[env], last_eval=1.0, checkpoint_frame=0
    )


def wait_for_step(process, run_dir, step, timeout=300):
    """Waits until the run's checkpoint is of agent step `step` or later; returns the step it found."""
    deadline = time.time() + timeout
    seen = None
    while True:
        with contextlib.suppress(FileNotFoundError, RuntimeError):  # between checkpoints: replaced atomically
            status = os.stat(f"{run_dir}/checkpoint.pt")
            if (status.st_ino, status.st_mtime_ns) != seen:  # a new checkpoint: loading at each poll slows the run
                found = load(f"{run_dir}/checkpoint.pt")["global_step"]
                seen = (status.st_ino, status.st_mtime_ns)
                if found >= step:
                    return found
        assert process.poll() is None, process.stdout.read()
        assert time.time() < deadline, f"no checkpoint of step {step}"
        time.sleep(0.05)


def test_sigkill_then_resume_gives_the_uninterrupted_run(script, uninterrupted, tmp_path):
    name = script.__name__
    process = start_script(name, RUN, tmp_path)
    run_dir = wait_for_checkpoint(process, tmp_path)
    # killed right after the checkpoint of frame 120: updates started at frame 80, and the run is mid-episode
    found = wait_for_step(process, run_dir, step=60)
    process.send_signal(signal.SIGKILL)
    process.wait()
    at_kill = load(f"{run_dir}/checkpoint.pt")
    assert found == at_kill["global_step"] == 60, f"the kill came after the checkpoint of step {found}, not 60"

    resumed = run_in_process(name, [*RUN, "--resume", "auto"], tmp_path)
    assert f"resuming {os.path.basename(run_dir)}" in resumed
    assert len(glob.glob(str(tmp_path / "runs" / "*"))) == 1, "the same run directory continues"

    reference = uninterrupted(name)
    ours, theirs = read_scalars(run_dir), read_scalars(reference)
    assert ours.keys() == theirs.keys()
    for tag in ours:
        steps = [step for step, _ in ours[tag]]
        assert len(steps) == len(set(steps)), f"{tag}: a step logged twice"
        assert steps == [step for step, _ in theirs[tag]], f"{tag}: steps missing or extra"
    assert ours["eval/episodic_return"][-1][0] == 320

    # Same parameters and optimizer states as the uninterrupted run (CPU, same threads: exactly), the same episodes
    # and losses; the final checkpoint of both leaves the replay out.
    final, reference_final = load(f"{run_dir}/checkpoint.pt"), load(f"{reference}/checkpoint.pt")
    assert final["global_step"] == reference_final["global_step"] == 160
    assert_same_tensors(final["agent"], reference_final["agent"], "agent")
    assert final["replay"] is None and reference_final["replay"] is None
    for tag in ours.keys() - {"charts/SPS"}:
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


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_stop_signal_writes_a_checkpoint_and_exits_cleanly(tmp_path, signum):
    process = start_script("drqv2_continuous_action", RUN, tmp_path)
    run_dir = wait_for_checkpoint(process, tmp_path)
    process.send_signal(signum)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, output
    assert "Traceback" not in output
    checkpoint = load(f"{run_dir}/checkpoint.pt")
    frame = checkpoint["global_step"] * 2
    resume_hint = f"resume it with --resume runs/{os.path.basename(run_dir)}"
    assert f"stopped by {signal.Signals(signum).name} with a checkpoint at frame {frame}; {resume_hint}" in output
    assert not glob.glob(f"{run_dir}/*.tmp")


def test_a_second_signal_exits_at_once_leaving_the_checkpoint_whole(tmp_path):
    """SIGINT (Ctrl-C) asks for a checkpoint at the episode's end; a second signal before then exits at once."""
    process = start_script("drqv2_continuous_action", RUN, tmp_path, env={"PYTHONUNBUFFERED": "1"})
    run_dir = wait_for_checkpoint(process, tmp_path)
    before = load(f"{run_dir}/checkpoint.pt")["global_step"]
    process.send_signal(signal.SIGINT)
    for line in process.stdout:  # the first signal is taken: the run says what it will do
        if line.startswith("SIGINT: finishing this episode (or evaluation), then checkpointing and exiting"):
            break
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, output
    assert "SIGTERM again: exiting now; the last checkpoint stays as it was" in output, output
    assert "stopped by" not in output and "Traceback" not in output
    assert machinery.load_checkpoint(f"{run_dir}/checkpoint.pt")["global_step"] in (before, before + 20)


def test_a_signal_ignored_at_start_stays_ignored(monkeypatch):
    """Under nohup SIGHUP is ignored: the run keeps ignoring it (closing the terminal does not stop it)."""
    installed = {}
    monkeypatch.setattr(signal, "getsignal", lambda signum: signal.SIG_IGN if signum == signal.SIGHUP else None)
    monkeypatch.setattr(signal, "signal", lambda signum, handler: installed.update({signum: handler}))
    machinery.catch_stop_signals(lambda *_: None)
    assert set(installed) == {signal.SIGTERM, signal.SIGINT, signal.SIGUSR1}


@pytest.mark.parametrize("frames", [120, 100], ids=["budget at an episode end", "budget mid-episode"])
def test_a_signal_near_the_end_lets_the_run_finish_with_its_final_evaluation(tmp_path, frames):
    """SIGTERM in the last episode or the final evaluation (the Slurm time-limit path): the run finishes, evaluation
    and final checkpoint included, rather than leaving a checkpoint that resumes to nothing."""
    args = [*TINY_RUN, "--total-timesteps", str(frames), "--learning-starts", "240", "--num-eval-episodes", "6"]
    process = start_script("drqv2_continuous_action", args, tmp_path, env={"PYTHONUNBUFFERED": "1"})
    for line in process.stdout:
        if line.startswith("frame 80/"):  # the last episode end before the budget's
            break
    time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output
    assert re.search(rf"frame {frames}: eval return \S+\n", output) and "done: " in output, output
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    assert [step for step, _ in read_scalars(run_dir)["eval/episodic_return"]] == [0, frames]
    final = load(f"{run_dir}/checkpoint.pt")
    assert final["global_step"] * 2 == frames and final["replay"] is None, "the final checkpoint, not a stop's"


@pytest.fixture(scope="module")
def finished_run_and_output(tmp_path_factory):
    """A finished 80-frame run (no update: updates would start at frame 80), its folder and what it printed."""
    cwd = tmp_path_factory.mktemp("finished")
    output = run_in_process("drqv2_continuous_action", [*TINY_RUN, "--total-timesteps", "80"], cwd)
    return cwd, glob.glob(str(cwd / "runs" / "*"))[0], output


@pytest.fixture
def finished_run(finished_run_and_output):
    cwd, run_dir, _ = finished_run_and_output
    return cwd, run_dir


def snapshot(folder):
    return {
        path: open(path, "rb").read()
        for path in sorted(glob.glob(f"{folder}/**", recursive=True))
        if os.path.isfile(path)
    }


@pytest.mark.parametrize("damage", ["truncate 10", "truncate 50", "truncate 99", "flip middle", "flip end"])
def test_damaged_checkpoint_is_refused_and_the_run_left_as_it_was(finished_run, tmp_path, damage, monkeypatch):
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
    monkeypatch.chdir(tmp_path)
    args = parse(drqv2, [*TINY_RUN, "--resume", str(run_dir)])
    with pytest.raises(drqv2.RunError, match="checkpoint .* (unreadable or corrupt|is corrupt)"):
        drqv2.main(args)
    assert snapshot(tmp_path) == before, "nothing was written"


def same_payload(a, b) -> bool:
    try:
        assert_same_tensors(a, b)
    except (AssertionError, AttributeError, TypeError, RuntimeError):  # a leaf of another kind, or tensors unlike
        return False
    return True


def test_every_flipped_byte_and_every_truncation_is_refused_or_harmless(tmp_path):
    """The zip's CRCs instead of a digest: at every byte of a checkpoint, a flipped byte (all bits, or the lowest) is
    refused or leaves the loaded payload unchanged (a flip in a header field nothing reads); every truncation is
    refused. torch.load alone would load some flipped tensors silently."""
    path = tmp_path / "checkpoint.pt"
    payload = {"args": {"seed": 1}, "global_step": 40, "agent": {"w": torch.randn(64), "steps": torch.arange(10)}}
    payload["rng"] = [1, torch.randint(0, 255, (16,), dtype=torch.uint8), (2, 3)]
    machinery.save_checkpoint(str(path), payload)
    data = path.read_bytes()
    silent, refused, unchecked_silent = [], 0, 0
    for position in range(len(data)):
        for mask in (0xFF, 0x01):
            damaged = bytearray(data)
            damaged[position] ^= mask
            path.write_bytes(bytes(damaged))
            try:
                loaded = machinery.load_checkpoint(str(path))
            except machinery.RunError:
                refused += 1
                with contextlib.suppress(Exception):
                    unchecked_silent += not same_payload(payload, torch.load(path, weights_only=True))
                continue
            if not same_payload(payload, loaded):
                silent.append((position, mask))
    assert not silent, f"flips loaded as a different payload: {silent[:10]}"
    assert refused > len(data) and unchecked_silent > 0, "the test would catch a loader that checks nothing"
    for length in range(len(data)):
        path.write_bytes(data[:length])
        with pytest.raises(machinery.RunError, match="unreadable or corrupt"):
            machinery.load_checkpoint(str(path))


def bad_input_cases():
    return {
        "batch larger than the replay at learning_starts": (["--batch-size", "64"], "--batch-size 64 is larger than"),
        "non-positive size": (["--hidden-dim", "0"], "--hidden-dim must be positive"),
        "negative count": (["--checkpoint-every", "-1"], "--checkpoint-every must be non-negative"),
        "n-step longer than an episode": (["--nstep", "20"], "--nstep must be shorter than an episode (20 agent"),
        "malformed schedule": (["--stddev-schedule", "linear(1.0,0.1)"], "--stddev-schedule must be"),
        "no run to resume": (
            ["--resume", "runs/nothing"],
            "--resume 'runs/nothing': no checkpoint.pt there (none written yet, or checkpoints off)",
        ),
        "gamma above 1": (["--gamma", "1.5"], "--gamma must be in (0, 1], got 1.5"),
        "no discount": (["--gamma", "0"], "--gamma must be in (0, 1], got 0.0"),
        "no Polyak step": (["--tau", "0"], "--tau must be in (0, 1], got 0.0"),
        "negative Polyak rate": (["--tau", "-0.01"], "--tau must be in (0, 1], got -0.01"),
        "tau above 1": (["--tau", "2"], "--tau must be in (0, 1], got 2.0"),
        "negative clip": (["--stddev-clip", "-0.3"], "--stddev-clip must be finite and >= 0, got -0.3"),
        "schedule that fails later": (["--stddev-schedule", "linear(1.2.3,0.1,100)"], "--stddev-schedule must be"),
        "negative std": (["--stddev-schedule", "linear(1.0,-0.1,100)"], "--stddev-schedule must be a number >= 0"),
        "replay smaller than an episode": (["--buffer-size", "10"], "--buffer-size 10 is smaller than one episode"),
        "an odd episode's last step": (
            ["--max-episode-frames", "101", "--buffer-size", "50", "--learning-starts", "40"],
            "--buffer-size 50 is smaller than one episode (51 transitions)",
        ),
        "seed beyond numpy's": (
            ["--seed", str(2**32)],
            "--seed must be in [0, 2**32), as numpy's seeds, got 4294967296",
        ),
        "negative seed": (["--seed", "-1"], "--seed must be in [0, 2**32)"),
        "exp name with a slash": (["--exp-name", "a/b"], "--exp-name must start with a letter or digit"),
        "exp name leaving runs/": (["--exp-name", "/../../../outside"], "--exp-name must start with a letter or digit"),
        "empty exp name": (["--exp-name", ""], "--exp-name must start with a letter or digit and hold only"),
        "exp name breaking the table": (["--exp-name", "a|b"], "got 'a|b'"),
        "no frame per agent step": (["--action-repeat", "0"], "--action-repeat must be positive, finite, got 0"),
        "a newline adding rows to the settings table": (
            ["--wandb-project-name", "x\n|exp_name|taco_continuous_action|"],
            "--wandb-project-name must hold no newline or other control character, got 'x\\n|exp_name|",
        ),
        "empty resume": (
            ["--resume", ""],
            "--resume '': no checkpoint.pt there (none written yet, or checkpoints off)",
        ),
        "budget under one agent step": (
            ["--total-timesteps", "1"],
            "--total-timesteps must be at least --action-repeat",
        ),
        "networks that cannot be allocated": (["--hidden-dim", "10000000000"], "the networks do not fit in memory"),
        "replay that cannot be allocated": (
            ["--buffer-size", "100000000"],
            "the replay's capacity of 100000000 transitions takes 2147.3 GB to allocate, more than the",
        ),
        "exp name longer than a file name allows": (["--exp-name", "a" * 300], "--exp-name must be at most 128"),
    }


def parse(module, argv):
    """Args exactly as the script's command line would give them; sys.argv that command line, as main() reads it."""
    import tyro

    sys.argv = [f"{module.__name__}.py", *argv]  # put back after the test (conftest.keep_command_line)
    return tyro.cli(module.Args, args=argv)


CUDA_WARNING = "warning: no CUDA device is available; running on the CPU"


@pytest.mark.parametrize("case", list(bad_input_cases()))
def test_bad_input_fails_fast_naming_the_problem(case, tmp_path, monkeypatch, capsys):
    """One line (the script prints `error: ` and it), nothing else said but the CPU warning, nothing written."""
    from conftest import load_script

    drqv2 = load_script("drqv2_continuous_action")
    extra, message = bad_input_cases()[case]
    monkeypatch.chdir(tmp_path)
    with pytest.raises(drqv2.RunError, match=re.escape(message)) as refused:
        drqv2.main(parse(drqv2, [*TINY_RUN, *extra]))
    assert "\n" not in str(refused.value)
    output = capsys.readouterr()
    assert output.err == "" and set(output.out.splitlines()) <= {CUDA_WARNING}, output
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("has_bf16_instructions", [False, True])
def test_amp_bf16_on_a_cpu_without_bf16_instructions_is_warned_of(has_bf16_instructions, tmp_path, monkeypatch, capsys):
    """Without avx512_bf16 (or AMX, which comes with it) bf16 runs in software: 9-10x slower than fp32 (docs/speed.md)."""
    drqv2 = load_script("drqv2_continuous_action")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: has_bf16_instructions)

    def stop_after_the_warnings(*_):
        raise drqv2.RunError("stopped here")

    monkeypatch.setattr(drqv2, "check_memory", stop_after_the_warnings)
    with pytest.raises(drqv2.RunError, match="stopped here"):
        drqv2.main(parse(drqv2, [*TINY_RUN, "--amp", "bf16", "--no-cuda"]))
    warned = (
        "warning: this CPU has no avx512_bf16: --amp bf16 runs ~10x slower than fp32 here" in capsys.readouterr().out
    )
    assert warned == (not has_bf16_instructions)


def test_a_taco_horizon_longer_than_an_episode_is_refused(tmp_path, monkeypatch):
    taco = load_script("taco_continuous_action")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(taco.RunError, match=re.escape("--nstep and --multistep must be shorter than an episode (20")):
        taco.main(parse(taco, [*TINY_RUN, "--multistep", "20"]))
    assert not (tmp_path / "runs").exists()


def test_a_write_error_stops_a_run_naming_the_checkpoint_kept(tmp_path, monkeypatch):
    """The disk fills at the second checkpoint (frame 80): one line naming the checkpoint of frame 40, kept whole."""
    drqv2 = load_script("drqv2_continuous_action")
    monkeypatch.chdir(tmp_path)
    save = torch.save
    calls = []

    def fills_the_disk_the_second_time(payload, f):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        save(payload, f)

    monkeypatch.setattr(drqv2.torch, "save", fills_the_disk_the_second_time)
    expected = (
        r"could not write runs/\S+/checkpoint.pt \(.*No space left on device\); the checkpoint of frame 40 is kept"
    )
    with pytest.raises(drqv2.RunError, match=expected):
        drqv2.main(parse(drqv2, [*TINY_RUN, "--checkpoint-every", "40"]))
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    assert drqv2.load_checkpoint(f"{run_dir}/checkpoint.pt")["global_step"] == 20
    assert not glob.glob(f"{run_dir}/*.tmp")


def test_a_resumed_run_continues_the_same_wandb_run(finished_run, tmp_path, monkeypatch):
    import types

    drqv2 = load_script("drqv2_continuous_action")
    run_dir = tmp_path / "runs" / os.path.basename(finished_run[1])
    shutil.copytree(finished_run[1], run_dir)
    calls = []
    fake = types.SimpleNamespace(run=None, init=lambda **kwargs: calls.append(kwargs), finish=lambda: None)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.chdir(tmp_path)
    drqv2.main(parse(drqv2, [*TINY_RUN, "--total-timesteps", "120", "--track", "--resume", str(run_dir)]))
    (init,) = calls
    assert init["id"] == run_dir.name and init["resume"] == "allow" and init["save_code"], init
    assert init["config"]["algorithm"] == drqv2.ALGORITHM, "wandb's runs of edited code are told apart too"


@pytest.mark.parametrize("blocked", ["runs", "videos"])
def test_a_folder_that_cannot_be_written_is_one_line_before_training(tmp_path, monkeypatch, blocked):
    drqv2 = load_script("drqv2_continuous_action")
    monkeypatch.chdir(tmp_path)
    (tmp_path / blocked).write_text("a file where a folder should be")
    with pytest.raises(drqv2.RunError, match=f"cannot create {blocked}/cartpole_balance__"):
        drqv2.main(parse(drqv2, [*TINY_RUN, "--capture-video"]))
    assert not glob.glob(str(tmp_path / "runs" / "*")), "refused before the run directory and its lock are made"


def test_one_process_per_run_directory(finished_run, tmp_path, monkeypatch):
    """A second process on a run (here: a resume while this process holds it) is refused, naming the holder; a new
    run whose directory exists already (same task, seed and second) is refused too."""
    drqv2 = load_script("drqv2_continuous_action")
    cwd, run_dir = finished_run
    monkeypatch.chdir(cwd)
    holder = drqv2.lock_run_dir(run_dir, new_run=False)
    try:
        with pytest.raises(drqv2.RunError, match=f"is in use by process {os.getpid()} on .*: one process per run"):
            drqv2.main(parse(drqv2, [*TINY_RUN, "--total-timesteps", "120", "--resume", run_dir]))
    finally:
        holder.close()
    taken = cwd / "runs" / "cartpole_balance__drqv2_continuous_action__7__1000"
    taken.mkdir()
    monkeypatch.setattr(drqv2.time, "time", lambda: 1000.0)
    with pytest.raises(drqv2.RunError, match="exists already"):
        drqv2.main(parse(drqv2, [*TINY_RUN, "--seed", "7"]))
    assert list(taken.iterdir()) == []


def test_a_checkpoint_of_the_other_script_is_refused(tmp_path, monkeypatch):
    import tyro

    taco = load_script("taco_continuous_action")
    drqv2 = load_script("drqv2_continuous_action")
    args = taco.resolve_args(tyro.cli(taco.Args, args=[*TINY_RUN, "--exp-name", "shared_name"]))
    env = taco.DMCPixelEnv("cartpole_balance", seed=1, max_episode_frames=40)
    agent = taco.Agent(env.observation_shape, env.action_dim, args, torch.device("cpu"))
    run_dir = tmp_path / "runs" / "cartpole_balance__shared_name__1__1000"
    run_dir.mkdir(parents=True)
    taco.write_checkpoint(a_run(run_dir, args, agent, env), 20, None)
    monkeypatch.chdir(tmp_path)
    refused = "checkpoint.pt is of another algorithm, or another version of it (the code of drqv2_continuous_action.py"
    with pytest.raises(drqv2.RunError, match=re.escape(refused)):
        drqv2.main(parse(drqv2, [*TINY_RUN, "--exp-name", "shared_name", "--resume", "auto"]))
    checkpoint = load(run_dir / "checkpoint.pt")  # one written before checkpoints named their algorithm
    del checkpoint["algorithm"]
    torch.save(checkpoint, run_dir / "checkpoint.pt")
    with pytest.raises(taco.RunError, match=re.escape(refused.replace("drqv2", "taco"))):
        taco.main(parse(taco, [*TINY_RUN, "--exp-name", "shared_name", "--resume", "auto"]))


def test_bad_input_from_the_command_line_and_a_renderer_that_cannot_start(tmp_path):
    result = run_script("taco_continuous_action", [*TINY_RUN, "--multistep", "0"], cwd=tmp_path)
    assert result.returncode != 0 and "error: --multistep must be positive" in result.stderr
    result = run_script("drqv2_continuous_action", TINY_RUN, cwd=tmp_path, env={"MUJOCO_GL": "bogus"})
    assert result.returncode != 0 and "MuJoCo rendering could not start with MUJOCO_GL=bogus" in result.stderr
    assert "MUJOCO_GL=egl" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()


def test_resume_with_other_settings_names_the_differences(finished_run, monkeypatch):
    from conftest import load_script

    drqv2 = load_script("drqv2_continuous_action")
    cwd, run_dir = finished_run
    monkeypatch.chdir(cwd)
    argv = [*TINY_RUN, "--total-timesteps", "80"]
    with pytest.raises(drqv2.RunError, match=r"--hidden-dim is 32 in the checkpoint but 64 now; --tau is 0.01"):
        drqv2.main(parse(drqv2, [*argv, "--resume", run_dir, "--hidden-dim", "64", "--tau", "0.02"]))
    # a flag given counts whatever its value: 1024 is the default width, given here, so it differs from the run's
    with pytest.raises(drqv2.RunError, match=r"^cannot resume .*: --hidden-dim is 32 in the checkpoint but 1024 now$"):
        drqv2.main(parse(drqv2, [*argv, "--resume", run_dir, "--hidden-dim=1024"]))
    done = run_in_process("drqv2_continuous_action", [*argv, "--resume", "auto"], cwd)
    assert "already ran 80 frames (for more: --total-timesteps): nothing to do" in done


def test_a_non_finite_policy_stops_the_run_and_keeps_the_last_checkpoint(tmp_path):
    """With a learning rate of 1e30 the first update (frame 80) makes the policy NaN: the next action stops the run
    with one line, before dm_control fails on it with a PhysicsError traceback."""
    args = [*RUN, "--learning-rate", "1e30", "--num-expl-steps", "10"]  # the policy acts from agent step 10 on
    kept = "stopping without checkpointing (the checkpoint of frame 80 is kept)"
    with pytest.raises(machinery.RunError, match=re.escape(f"non-finite action ([nan]) at frame 82; {kept}")):
        run_in_process("drqv2_continuous_action", args, tmp_path)
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    checkpoint = machinery.load_checkpoint(f"{run_dir}/checkpoint.pt")  # whole: every record matches its CRC
    assert checkpoint["global_step"] == 40, "the frame-80 checkpoint, from before the first update, is kept"


def test_a_non_finite_loss_or_weight_stops_the_run(tmp_path, monkeypatch):
    """A loss that turns infinite in the updates from frame 80 stops the run at that episode's end (frame 120),
    before its checkpoint; a non-finite weight is refused by the checkpoint itself."""
    update = machinery.Agent.update

    def infinite_actor_loss(self, batch, step):
        return {**update(self, batch, step), "losses/actor_loss": torch.tensor(float("inf"))}

    monkeypatch.setattr(machinery.Agent, "update", infinite_actor_loss)
    expected = r"non-finite losses/actor_loss \(inf\) at frame 120; stopping .*the checkpoint of frame 80 is kept"
    with pytest.raises(machinery.RunError, match=expected):
        run_in_process("drqv2_continuous_action", [*TINY_RUN, "--checkpoint-every", "40"], tmp_path)
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    assert load(f"{run_dir}/checkpoint.pt")["global_step"] == 40
    monkeypatch.undo()
    (tmp_path / "empty").mkdir()
    import tyro

    args = machinery.resolve_args(tyro.cli(machinery.Args, args=TINY_RUN))
    env = machinery.DMCPixelEnv("cartpole_balance", seed=1, max_episode_frames=40)
    agent = machinery.Agent(env.observation_shape, env.action_dim, args, torch.device("cpu"))
    with torch.no_grad():
        agent.actor.policy[0].weight[0, 0] = float("nan")
    with pytest.raises(machinery.RunError, match="non-finite parameters in the actor at frame 40; stopping"):
        machinery.write_checkpoint(a_run(tmp_path / "empty", args, agent, env), 20, None)
    assert not os.listdir(tmp_path / "empty")


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pt")
    machinery.save_checkpoint(path, {"args": {}, "weights": torch.ones(3), "step": 1})

    def no_space(*_, **__):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(machinery.RunError, match="No space left on device.*the previous checkpoint is kept"):
        machinery.save_checkpoint(path, {"weights": torch.zeros(3), "step": 2})
    assert machinery.load_checkpoint(path)["step"] == 1 and not os.path.exists(path + ".tmp")


def test_full_disk_inside_torch_save_keeps_the_previous_checkpoint_and_removes_the_temporary_file(
    tmp_path, monkeypatch
):
    """torch's zip writer fails with a RuntimeError, not an OSError, when the disk fills during the write."""
    path = str(tmp_path / "checkpoint.pt")
    machinery.save_checkpoint(path, {"args": {}, "weights": torch.ones(3), "step": 1})

    def fills_the_disk(payload, f):
        f.write(b"x" * 1000)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", fills_the_disk)
    kept = "the checkpoint of frame 40 is kept"
    with pytest.raises(machinery.RunError, match=f"could not write .*unexpected pos.*; {kept}"):
        machinery.save_checkpoint(path, {"weights": torch.zeros(3), "step": 2}, kept)
    assert machinery.load_checkpoint(path)["step"] == 1 and not os.path.exists(path + ".tmp")


def test_updates_wait_for_a_complete_episode(tmp_path):
    """Updates due before the first episode ends (--learning-starts 20 < 40-frame episodes), and a replay of 25
    transitions that loses its only complete episode while the next one fills it: the run waits, never crashes."""
    run_in_process("taco_continuous_action", [*TINY_RUN, "--learning-starts", "20", "--buffer-size", "25"], tmp_path)
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    first_logged = next(step for step, _ in read_scalars(run_dir)["losses/taco_loss"])
    assert first_logged == 80, "updates start with the second episode; losses are logged at its end"


def test_a_signal_with_checkpoints_off_says_there_is_nothing_to_resume(tmp_path):
    process = start_script("drqv2_continuous_action", [*RUN, "--checkpoint-every", "0"], tmp_path)
    deadline = time.time() + 120
    while not glob.glob(str(tmp_path / "runs" / "*" / "events.*")):
        assert time.time() < deadline and process.poll() is None
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, output
    assert "checkpoints are off, so there is nothing to resume" in output and "--resume" not in output


def test_a_stop_during_an_evaluation_lets_it_finish_then_checkpoints(tmp_path, uninterrupted):
    """SIGUSR1 during the frame-0 evaluation (10 episodes): the evaluation is kept, the run checkpoints right after it
    (not after a training episode more: on a CPU a default evaluation takes minutes), and the resumed run does not
    evaluate frame 0 again and trains as the uninterrupted run does (its evaluations take no random draws)."""
    args = [*RUN, "--num-eval-episodes", "10"]
    process = start_script("drqv2_continuous_action", args, tmp_path)
    deadline = time.time() + 120
    while not glob.glob(str(tmp_path / "runs" / "*" / "events.*")):
        assert time.time() < deadline and process.poll() is None
        time.sleep(0.2)
    time.sleep(1.0)  # inside the evaluation at frame 0
    process.send_signal(signal.SIGUSR1)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGUSR1, output
    assert output.index("SIGUSR1: finishing this episode") < output.index("frame 0: eval return")
    assert "stopped by SIGUSR1 with a checkpoint at frame 0" in output
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    checkpoint = load(f"{run_dir}/checkpoint.pt")
    assert checkpoint["global_step"] == 0 and np.isfinite(checkpoint["last_eval"])
    assert [step for step, _ in read_scalars(run_dir)["eval/episodic_return"]] == [0]

    resumed = run_in_process("drqv2_continuous_action", [*RUN, "--resume", run_dir], tmp_path)  # 1-episode evaluations
    assert "frame 0: eval return" not in resumed
    assert [step for step, _ in read_scalars(run_dir)["eval/episodic_return"]] == [0, 160, 320]
    final = load(f"{run_dir}/checkpoint.pt")["agent"]
    assert_same_tensors(final, load(f"{uninterrupted('drqv2_continuous_action')}/checkpoint.pt")["agent"], "agent")


def test_time_left_is_shown_once_updates_are_timed(tiny_run):
    result, _ = tiny_run("drqv2_continuous_action")  # updates from frame 80, episodes of 40
    progress = [line for line in result.stdout.splitlines() if line.startswith("frame ") and "| left" in line]
    assert len(progress) == 6, "an episode of 40 frames ends every 40 of the 240 frames"
    assert [line.split("| left ")[1] for line in progress[:2]] == ["-", "-"], "before updates: no estimate"
    assert all(re.fullmatch(r"\dh\d\dm", line.split("| left ")[1]) for line in progress[3:])
    assert "warning: updates start" not in result.stdout, "a run that updates gives no warning"


def test_a_slow_pace_is_shown_with_its_decimals():
    """TACO on a CPU runs under one frame per second: its progress line said "SPS 0"."""
    run = object.__new__(load_script("drqv2_continuous_action").Run)  # only what progress() reads
    run.timed_from = None
    run.updates_start = 1000
    run.total_frames = 40000
    run.last_eval = 136.0
    run.start_time = time.time()
    assert "| SPS 0.47 |" in run.progress(13000, 186.1, 0.465)
    assert "| SPS 320 |" in run.progress(14000, 186.1, 320.4)


def test_resume_auto_takes_the_run_started_last_and_names_it(tmp_path):
    short = [*TINY_RUN, "--total-timesteps", "80", "--checkpoint-every", "40"]
    first = run_in_process("drqv2_continuous_action", [*short, "--resume", "auto"], tmp_path)
    # a user who left out --env-id sees which task starts
    message = "--resume auto: no run of cartpole_balance, seed 1 (drqv2_continuous_action) under runs/; starting one"
    assert message in first
    # each periodic checkpoint is said (the final one is in the done line)
    assert re.findall(r"^frame (\d+): checkpoint written to runs/\S+/checkpoint.pt$", first, re.MULTILINE) == ["40"]
    time.sleep(1.1)  # run names hold the second they started
    second = run_in_process("drqv2_continuous_action", short, tmp_path)
    newest = max(glob.glob(str(tmp_path / "runs" / "*")))
    # the first run's checkpoint file made newer (as copying a run makes it): the time in a run's name decides
    os.utime(os.path.join(min(glob.glob(str(tmp_path / "runs" / "*"))), "checkpoint.pt"))
    last_eval = re.search(r"frame 80: eval return (\S+)", second).group(1)
    # no evaluation until frame 160, so the progress line at frame 120 shows the one of frame 80, from the checkpoint
    longer = [*short, "--total-timesteps", "160", "--eval-every", "1000", "--resume", "auto"]
    resumed = run_in_process("drqv2_continuous_action", longer, tmp_path)
    name = f"runs/{os.path.basename(newest)}"
    assert f"--resume auto: resuming {name}, the newest run of this task and seed (2 found)" in resumed
    progress = [line for line in resumed.splitlines() if line.startswith("frame 120/")]
    assert progress and f"| last eval {last_eval} |" in progress[0], (
        "the last evaluation comes back with the checkpoint"
    )

    checkpoint_file = run_in_process("drqv2_continuous_action", [*short, "--resume", f"{name}/checkpoint.pt"], tmp_path)
    assert "already ran 160 frames (for more: --total-timesteps): nothing to do" in checkpoint_file, (
        "the checkpoint named was read"
    )
    # a newer run of another experiment whose name holds "__1" (exp_name drqv2_continuous_action__1, seed 7) is not one
    other = tmp_path / "runs" / "cartpole_balance__drqv2_continuous_action__1__7__2000000000"
    shutil.copytree(newest, other)
    again = run_in_process("drqv2_continuous_action", longer, tmp_path)
    assert f"--resume auto: resuming {name}, the newest run of this task and seed (2 found)" in again


def test_a_bar_in_a_setting_stays_in_its_cell_of_the_settings_table(tmp_path):
    """The logs' settings table (what plot.py and record.py read a run's settings from) escapes a | and a backslash
    in a value, and plot.py reads every value back as it was."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import plot

    texts = ["--wandb-project-name", "a|b", "--wandb-entity", "c\\"]
    run_in_process("drqv2_continuous_action", [*TINY_RUN, "--total-timesteps", "40", *texts], tmp_path)
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    accumulator = EventAccumulator(run_dir)
    accumulator.Reload()
    table = accumulator.Tensors("hyperparameters/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "\n|wandb_project_name|a\\|b|\n" in table and "\n|wandb_entity|c\\\\|\n" in table, table
    settings = plot.parse_hyperparameters(table, run_dir)
    assert (settings["wandb_project_name"], settings["wandb_entity"]) == ("a|b", "c\\")
    assert len(settings) == len(vars(machinery.Args())) + 1 and settings["env_id"] == "cartpole_balance"
    assert settings["algorithm"] == machinery.ALGORITHM, "the code's hash: plot.py keeps runs of other code apart"


def test_a_checkpoint_holds_the_stored_transitions_not_the_replay_capacity(script):
    """torch.save writes a tensor's whole storage: the replay's state must not be a slice of the full ring."""
    import io

    from test_replay import make_episode, store

    replay = script.ReplayBuffer(100_000, (3, 6, 6), 2, frame_stack=3, nstep=2, gamma=0.9)  # 10.9 MB of frames
    store(replay, make_episode(np.random.default_rng(0), 0, 10))
    saved = io.BytesIO()
    torch.save(replay.state_dict(), saved)
    assert len(saved.getvalue()) < 100_000, "11 frames of 108 bytes, not 101 001 slots"


def test_no_checkpoint_replay_leaves_the_replay_out_of_every_checkpoint(tmp_path):
    """--no-checkpoint-replay: periodic checkpoints hold no replay either (a resumed run refills it first: the test of
    a finished run's checkpoint shows that)."""
    import tyro

    args = machinery.resolve_args(tyro.cli(machinery.Args, args=[*TINY_RUN, "--checkpoint-every", "40"]))
    env = machinery.DMCPixelEnv("cartpole_balance", seed=1, max_episode_frames=40)
    agent = machinery.Agent(env.observation_shape, env.action_dim, args, torch.device("cpu"))
    replay = machinery.ReplayBuffer(1000, env.frame_shape, env.action_dim, 3, 3, 0.99)
    for keep in [True, False]:
        args.checkpoint_replay = keep
        machinery.write_checkpoint(a_run(tmp_path, args, agent, env), 20, replay)
        assert (load(tmp_path / "checkpoint.pt")["replay"] is not None) == keep


def test_a_finished_run_keeps_its_checkpoint_without_the_replay_and_can_continue(tmp_path):
    """Once the run has finished, its checkpoint drops the replay (the bulk of it: 11 GB at 1M frames) and the done
    line names what is kept; a longer --total-timesteps still continues, refilling the replay first."""
    short = [*TINY_RUN, "--total-timesteps", "120", "--checkpoint-every", "40"]
    first = run_in_process("drqv2_continuous_action", short, tmp_path)
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    checkpoint = load(f"{run_dir}/checkpoint.pt")
    assert checkpoint["replay"] is None and checkpoint["global_step"] == 60
    size = os.path.getsize(f"{run_dir}/checkpoint.pt")
    (done,) = [line for line in first.splitlines() if line.startswith("done: ")]
    name = f"runs/{os.path.basename(run_dir)}/checkpoint.pt"
    assert done.endswith(f"kept {name} ({size / 1e6:.0f} MB: networks, optimizers and progress, no replay)"), done
    for events in glob.glob(f"{run_dir}/events.*"):  # the logs lost: the resumed run writes its settings again
        os.remove(events)
    with open(f"{run_dir}/checkpoint.pt.tmp", "wb") as stale:  # left by a kill during a write
        stale.write(b"half a checkpoint")
    run_in_process("drqv2_continuous_action", [*short, "--total-timesteps", "240", "--resume", run_dir], tmp_path)
    losses = read_scalars(run_dir)["losses/critic_loss"]
    steps = [step for step, _ in losses]
    assert steps == [240], "after frame 120, updates start at 120 + 80 once the replay is refilled"
    assert not os.path.exists(f"{run_dir}/checkpoint.pt.tmp"), "the next checkpoint's write replaced it"
    plot = load_script("plot")
    assert plot.read_run(run_dir, "eval/episodic_return")[0]["exp_name"] == "drqv2_continuous_action"


def test_a_run_that_will_make_no_update_says_so_at_start(finished_run_and_output):
    _, _, output = finished_run_and_output
    warning = "warning: updates start at frame 80, at or after the budget's end: no learning"
    lines = output.splitlines()
    assert warning in lines and lines.index(warning) < 3, output[:1000]


def test_a_budget_cut_mid_episode_logs_the_last_losses_and_counts_whole_agent_steps(tmp_path):
    """--total-timesteps 101 with action repeat 2 trains 100 frames; the last episode (80-120) is cut at 100, and the
    losses of its updates are logged there."""
    output = run_in_process("drqv2_continuous_action", [*TINY_RUN, "--total-timesteps", "101"], tmp_path)
    assert re.search(r"^done: 100 frames in ", output, re.MULTILINE), output[-1000:]
    assert (CUDA_WARNING in output.splitlines()) == (not torch.cuda.is_available()), "--cuda, the default"
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    assert [step for step, _ in read_scalars(run_dir)["losses/critic_loss"]] == [100]


def test_every_tensor_parameter_network_and_optimizer_of_the_agent_is_checkpointed(script, tmp_path):
    """An ablation's new state needs no checkpoint code: a plain tensor, an nn.Parameter with its own optimizer, and
    a network added to an Agent are written and come back on resume; networks held in a plain list are refused (a
    checkpoint would miss them). (A checkpoint of an agent without the new parts is of another algorithm: refused.)"""
    import tyro

    args = script.resolve_args(tyro.cli(script.Args, args=TINY_RUN))
    env = script.DMCPixelEnv("cartpole_balance", seed=1, max_episode_frames=40)

    def edited_agent(seed):
        torch.manual_seed(seed)
        agent = script.Agent(env.observation_shape, env.action_dim, args, torch.device("cpu"))
        agent.running_mean = torch.randn(3)
        agent.log_alpha = torch.nn.Parameter(torch.randn(()))
        agent.alpha_opt = torch.optim.Adam([agent.log_alpha], lr=0.1)
        agent.head = torch.nn.Linear(2, 2)
        return agent

    saved = edited_agent(seed=0)
    saved.log_alpha.grad = torch.ones(())
    saved.alpha_opt.step()  # an optimizer state to carry
    script.write_checkpoint(a_run(tmp_path, args, saved, env), 20, None)
    resumed = edited_agent(seed=1)
    script.restore(load(tmp_path / "checkpoint.pt"), resumed, None, [env])
    assert torch.equal(resumed.running_mean, saved.running_mean)
    assert resumed.log_alpha.item() == saved.log_alpha.item() and isinstance(resumed.log_alpha, torch.nn.Parameter)
    assert torch.equal(resumed.head.weight, saved.head.weight)
    assert torch.equal(
        resumed.alpha_opt.state_dict()["state"][0]["exp_avg"], saved.alpha_opt.state[saved.log_alpha]["exp_avg"]
    )
    assert resumed.alpha_opt.param_groups[0]["params"][0] is resumed.log_alpha, "restored in place"

    plain = script.Agent(env.observation_shape, env.action_dim, args, torch.device("cpu"))
    plain.heads = [torch.nn.Linear(2, 2)]
    with pytest.raises(TypeError, match="Agent.heads: hold networks and tensors in nn.ModuleList"):
        script.agent_state(plain)


def test_resume_takes_the_runs_settings_from_its_checkpoint(tmp_path):
    """`--resume DIR` alone continues a run started with other flags: its settings come from the checkpoint, and
    the flags given may change the budget (a setting that changes what is computed is refused: see above)."""
    run_in_process("drqv2_continuous_action", [*TINY_RUN, "--total-timesteps", "80", "--seed", "3"], tmp_path)
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    resume = ["--resume", run_dir, "--total-timesteps", "160", "--eval-every", "10000"]  # 10000: the default
    output = run_in_process("drqv2_continuous_action", resume, tmp_path)
    assert f"resuming {os.path.basename(run_dir)} on " in output and "frame 80 of 160" in output, output
    assert re.search(r"^done: 80 frames in ", output, re.MULTILINE), output
    saved = load(f"{run_dir}/checkpoint.pt")["args"]
    assert (saved["seed"], saved["hidden_dim"], saved["batch_size"], saved["total_timesteps"]) == (3, 32, 8, 160)
    assert saved["eval_every"] == 10000, "a flag given at its default value is given: the run had 120"


def test_memory_is_checked_before_the_replay_is_allocated(tmp_path, monkeypatch):
    """With 2 GB available and 4 GB that may be reserved (figures patched in): a replay whose capacity cannot be
    allocated, one that allocates but will not fit once the run has filled it, and updates whose batch will not fit
    (256 stacked frames) are one line each, before anything is made."""
    monkeypatch.setattr(machinery, "host_memory", lambda: (2e9, 4e9))
    monkeypatch.chdir(tmp_path)
    too_large = "the replay's capacity of 300000 transitions takes 6.4 GB to allocate, more than the 4.0 GB the "
    with pytest.raises(machinery.RunError, match=re.escape(too_large + "process may reserve: lower --buffer-size")):
        machinery.main(parse(machinery, [*TINY_RUN, "--buffer-size", "300000"]))
    filled = r"the replay's 100000 transitions take 2.1 GB and the updates about 0.9 GB, but 2.0 GB of memory are"
    with pytest.raises(machinery.RunError, match=filled):
        machinery.main(parse(machinery, [*TINY_RUN, "--buffer-size", "100000", "--total-timesteps", "200000"]))
    stacked = r"the replay's 120 transitions take 0.0 GB and the updates about 6.0 GB, but 2.0 GB of memory are"
    with pytest.raises(machinery.RunError, match=stacked):
        machinery.main(
            parse(machinery, [*TINY_RUN, "--frame-stack", "256", "--batch-size", "64", "--learning-starts", "200"])
        )
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("version", ["v2", "v1"])
def test_the_memory_a_cgroup_leaves_is_what_is_available(tmp_path, version):
    """A container's or Slurm job's memory limit (cgroup v2's memory.max, v1's memory.limit_in_bytes) set on the
    process's group or a parent of it caps what the run may fill; /proc/meminfo alone told 23 GB where 0.9 GB was
    allowed, and the run was killed at its first update. Files of a fake /proc and /sys/fs/cgroup."""
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text("MemTotal: 24000000 kB\nSwapTotal: 0 kB\nMemAvailable: 23000000 kB\n")
    (proc / "self" / "status").write_text("VmSize: 1000000 kB\n")
    controller, limit, usage = ("", "memory.max", "memory.current")
    if version == "v1":
        controller, limit, usage = ("memory", "memory.limit_in_bytes", "memory.usage_in_bytes")
    (proc / "self" / "cgroup").write_text(f"1:cpu:/\n0:{controller}:/slurm/job_7/step_0\n")
    cgroups = tmp_path / "cgroup" / controller
    for folder, max_bytes, used in [("slurm", "max", 0), ("slurm/job_7", "900000000", 200_000_000)]:
        (cgroups / folder).mkdir(parents=True)
        (cgroups / folder / limit).write_text(f"{max_bytes}\n")
        (cgroups / folder / usage).write_text(f"{used}\n")
    (cgroups / "slurm/job_7/step_0").mkdir()  # no limit of its own
    available, ceiling = machinery.host_memory(str(proc), str(tmp_path / "cgroup"))
    assert (available, ceiling) == (700_000_000, 24_000_000 * 1024)
    (proc / "self" / "cgroup").write_text("0::/\n")  # no limit anywhere: the machine's figure
    assert machinery.host_memory(str(proc), str(tmp_path / "cgroup"))[0] == 23_000_000 * 1024


def test_an_address_space_limit_is_one_line_before_the_replay_is_allocated(tmp_path):
    """ulimit -v below what the replay reserves gave an allocator traceback; now one line, before anything is made."""
    import resource

    def limit_address_space():
        default_signals()
        resource.setrlimit(resource.RLIMIT_AS, (6 * 2**30, resource.RLIM_INFINITY))

    run = subprocess.run(
        [sys.executable, str(ROOT / "drqv2_continuous_action.py"), *TINY_RUN, "--buffer-size", "300000"],
        cwd=tmp_path, capture_output=True, text=True, preexec_fn=limit_address_space, check=False, timeout=300,
        env={**os.environ, "MUJOCO_GL": "egl"},
    )  # fmt: skip
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
    refused = "error: the replay's capacity of 300000 transitions takes 6.4 GB to allocate, more than the"
    assert refused in run.stderr and "the process may reserve" in run.stderr, run.stderr[-3000:]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("planted", ["checkpoint.pt.tmp", "run.lock"])
def test_a_symbolic_link_in_the_run_directory_is_not_written_through(finished_run, tmp_path, monkeypatch, planted):
    """A link planted in a run directory (at the temporary checkpoint or the lock) would make the run overwrite the
    file it points to: the run refuses it in one line and leaves that file as it was."""
    run_dir = tmp_path / "runs" / os.path.basename(finished_run[1])
    shutil.copytree(finished_run[1], run_dir)
    victim = tmp_path / "precious.txt"
    victim.write_text("not a checkpoint")
    (run_dir / planted).unlink(missing_ok=True)
    (run_dir / planted).symlink_to(victim)
    monkeypatch.chdir(tmp_path)
    message = "is a symbolic link" if planted == "checkpoint.pt.tmp" else "run.lock is a symbolic link"
    with pytest.raises(machinery.RunError, match=message):
        machinery.main(parse(machinery, ["--resume", str(run_dir), "--total-timesteps", "120"]))
    assert victim.read_text() == "not a checkpoint"


def test_a_checkpoint_holding_python_objects_or_a_file_not_named_checkpoint_is_one_clear_line(tmp_path, monkeypatch):
    import argparse

    run_dir = tmp_path / "runs" / "cartpole_balance__drqv2_continuous_action__1__1000"
    run_dir.mkdir(parents=True)
    torch.save({"args": argparse.Namespace(seed=1), "global_step": 1}, run_dir / "checkpoint.pt")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(machinery.RunError, match="holds Python objects, which no checkpoint of this script does") as e:
        machinery.main(parse(machinery, ["--resume", str(run_dir)]))
    assert "weights_only" not in str(e.value) and "\n" not in str(e.value)
    shutil.copy(run_dir / "checkpoint.pt", tmp_path / "backup.pt")
    with pytest.raises(machinery.RunError, match="--resume 'backup.pt': no checkpoint.pt there"):
        machinery.main(parse(machinery, ["--resume", "backup.pt"]))


def test_a_renderer_whose_library_is_missing_is_named(tmp_path):
    """MUJOCO_GL=osmesa without libosmesa6 (this project installs EGL only) said only "'NoneType' object has no
    attribute 'glGetError'"; the line now names what the backend needs. Where OSMesa is installed, the run starts."""
    import ctypes.util

    result = run_script(
        "drqv2_continuous_action", [*TINY_RUN, "--total-timesteps", "40"], tmp_path, {"MUJOCO_GL": "osmesa"}
    )
    if ctypes.util.find_library("OSMesa"):
        assert result.returncode == 0, result.stderr[-2000:]
    else:
        assert result.returncode != 0 and "MUJOCO_GL=osmesa (it needs libosmesa6;" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


@pytest.mark.parametrize("edit", ["comments", "machinery", "algorithm", "algorithm, same file name"])
def test_an_edited_algorithm_does_not_continue_the_run_and_other_edits_do(finished_run, tmp_path, edit):
    """A run continues under the algorithm that started it: the script's code above the run machinery, parsed. A copy
    elsewhere whose comments, docstrings and formatting differ continues it, as does one whose run machinery
    differs; one whose algorithm differs (a mean for the min of the critic's target) is refused in one line saying
    what to do, and the run is left as it was, also when the edited copy has the original's file name."""
    run_dir = tmp_path / "runs" / os.path.basename(finished_run[1])
    shutil.copytree(finished_run[1], run_dir)
    source = (ROOT / "drqv2_continuous_action.py").read_text()
    top, machinery_code = source.split("\n# Run machinery.")
    edited = {
        "comments": top.replace("# Replay (details 3-5)", "# The replay:\n\n# (details 3-5)").replace(
            '"""the discount factor gamma"""', '"""gamma, the discount"""'
        ),
        "machinery": top,
        "algorithm": top.replace("torch.min(target_q1, target_q2)", "(target_q1 + target_q2) / 2"),
    }[edit.split(",")[0]]
    if edit == "machinery":
        assert "SPS {sps" in machinery_code
        machinery_code = machinery_code.replace("SPS {sps", "frames/s {sps")
    assert edited != top or edit == "machinery"
    script = "drqv2_continuous_action.py" if "same file name" in edit else "ablation.py"
    (tmp_path / script).write_text(edited + "\n# Run machinery." + machinery_code)
    resume = [sys.executable, script, "--resume", str(run_dir), "--total-timesteps", "120"]
    result = subprocess.run(
        resume, check=False, cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "MUJOCO_GL": "egl"}
    )
    if edit.startswith("algorithm"):
        assert result.returncode == 1, result.stdout[-2000:]
        message = f"checkpoint.pt is of another algorithm, or another version of it (the code of {script} above its"
        assert message in result.stderr and "--exp-name" in result.stderr and "Traceback" not in result.stderr
        assert load(run_dir / "checkpoint.pt")["global_step"] == 40, "the run was left as it was"
    else:
        assert result.returncode == 0, result.stderr[-2000:]
        assert load(run_dir / "checkpoint.pt")["global_step"] == 60, "the run continued"


def test_a_script_edited_while_its_run_goes_on_does_not_continue_it(tmp_path):
    """The algorithm is read when the script starts: a run whose file is edited mid-run keeps checkpointing what it
    runs, so the edited file is refused on resume, and the file put back continues the run."""
    script = tmp_path / "drqv2_continuous_action.py"
    original = (ROOT / "drqv2_continuous_action.py").read_text()
    script.write_text(original)
    process = subprocess.Popen(
        [sys.executable, str(script), *RUN], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    run_dir = wait_for_checkpoint(process, tmp_path)
    script.write_text(original.replace("torch.min(target_q1, target_q2)", "(target_q1 + target_q2) / 2"))
    assert process.wait(timeout=300) == 0, process.stdout.read()
    assert load(f"{run_dir}/checkpoint.pt")["global_step"] == 160, "it finished after the edit"
    resume = [sys.executable, str(script), "--resume", run_dir, "--total-timesteps", "360"]
    refused = subprocess.run(resume, cwd=tmp_path, capture_output=True, text=True, check=False)
    assert refused.returncode == 1 and "is of another algorithm, or another version of it" in refused.stderr
    script.write_text(original)
    continued = subprocess.run(resume, cwd=tmp_path, capture_output=True, text=True, check=False)
    assert continued.returncode == 0, continued.stderr[-2000:]
    assert load(f"{run_dir}/checkpoint.pt")["global_step"] == 180


def test_a_compressed_checkpoint_is_refused_before_it_is_unpacked(finished_run, tmp_path, monkeypatch):
    """torch.save stores its records uncompressed; a checkpoint whose records are compressed (a 1 MB file can unpack
    to gigabytes) is refused in one line before any record is read."""
    import zipfile

    run_dir = tmp_path / "runs" / os.path.basename(finished_run[1])
    run_dir.mkdir(parents=True)
    original = zipfile.ZipFile(f"{finished_run[1]}/checkpoint.pt")
    with original, zipfile.ZipFile(run_dir / "checkpoint.pt", "w", zipfile.ZIP_DEFLATED) as packed:
        for info in original.infolist():
            packed.writestr(info.filename, original.read(info))
    monkeypatch.setattr(zipfile.ZipFile, "testzip", lambda self: pytest.fail("a record was unpacked"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(machinery.RunError, match=r"checkpoint.pt is corrupt: its record \S+ is compressed or fails"):
        machinery.main(parse(machinery, ["--resume", str(run_dir)]))


def test_a_full_disk_while_the_logs_are_written_is_one_line(tmp_path, monkeypatch, capsys):
    """TensorBoard writes the logs from a thread of its own: a full disk there gave the thread's traceback, then the
    main one's at the next log, then a third at close. Now one line, naming the checkpoint kept."""
    from tensorboard.compat.tensorflow_stub.io import gfile

    append = gfile.LocalFileSystem.append
    appended = []

    def fills_the_disk_after_a_while(self, filename, file_content, binary_mode=False):
        appended.append(filename)
        if len(appended) > 40:
            raise OSError(errno.ENOSPC, "No space left on device")
        append(self, filename, file_content, binary_mode)

    monkeypatch.setattr(gfile.LocalFileSystem, "append", fills_the_disk_after_a_while)
    kept = r"could not write the logs or a video \(\[Errno 28\] No space left on device\); the checkpoint of frame \d+"
    with pytest.raises(machinery.RunError, match=kept):
        run_in_process("drqv2_continuous_action", [*RUN, "--total-timesteps", "2000"], tmp_path)
    assert "Traceback" not in capsys.readouterr().err


def test_a_run_directory_deleted_mid_run_is_one_line(tmp_path):
    process = start_script("drqv2_continuous_action", [*RUN, "--total-timesteps", "2000"], tmp_path)
    run_dir = wait_for_checkpoint(process, tmp_path)
    shutil.rmtree(run_dir)
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 1 and "Traceback" not in output, output[-3000:]
    assert re.search(r"^error: could not write .*No such file or directory", output, re.MULTILINE), output[-3000:]
