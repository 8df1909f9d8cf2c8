"""Shared helpers: load the agent scripts as modules, run them as programs, read their TensorBoard logs, make batches
from a script's own replay."""

import contextlib
import glob
import importlib
import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the agent scripts and plot.py, importable as modules (their main() does not run)

# pytest.ini runs the suite on one pytest-xdist worker per core. Each worker, and every run it starts, takes its share of
# the cores: with all of them each, torch's OpenMP threads spin waiting for one another and the suite takes twice as long.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    cores_per_worker = (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores_per_worker)))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# Tests that share a fixture made once per module or session (a run, a cluster) run on one worker, which makes it once.
# test_reliability's `uninterrupted` (a reference run per script, 5 s in-process) is left out: grouped, its three tests
# of 35-45 s each would all wait for one worker. A test that uses two of these fixtures is grouped by the first.
SHARED_FIXTURES = ["tiny_run", "finished_run_and_output", "synthetic_runs", "slurm_cluster"]


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups
def pytest_collection_modifyitems(items):
    for item in items:
        shared = [name for name in SHARED_FIXTURES if name in item.fixturenames]
        if shared:
            item.add_marker(pytest.mark.xdist_group(shared[0]))


def load_script(name):
    """An agent script (or plot.py) of the repository as a module, imported once."""
    return importlib.import_module(name)


SCRIPTS = ["drqv2_continuous_action", "taco_continuous_action"]
AVAILABLE_SCRIPTS = [name for name in SCRIPTS if (ROOT / f"{name}.py").exists()]

# A run small enough for a CPU test: short episodes, tiny networks and batches, one evaluation episode.
TINY_RUN = [
    "--env-id", "cartpole_balance", "--total-timesteps", "240", "--max-episode-frames", "40",
    "--learning-starts", "80", "--batch-size", "8", "--eval-every", "120", "--num-eval-episodes", "1",
    "--hidden-dim", "32", "--buffer-size", "1000",
]  # fmt: skip


@pytest.fixture(params=AVAILABLE_SCRIPTS)
def script(request):
    """Each agent script in turn, as an imported module."""
    return load_script(request.param)


def default_signals():
    """preexec_fn for a process the test signals: SIGINT and SIGHUP as a terminal gives them, even when pytest itself
    was started with them ignored (`nohup`, or `&` in a script), a disposition its children would inherit. It only
    calls sigaction, which is safe between fork and exec."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def run_script(name, args, cwd, env=None, timeout=600):
    """Runs an agent script as a program in `cwd`; returns the completed process (output captured as text)."""
    full_env = {**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl"), "WANDB_MODE": "offline"}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, str(ROOT / f"{name}.py"), *args],
        check=False,
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(autouse=True)
def keep_command_line():
    """sys.argv back as pytest had it after each test: a test may set the command line a script's main() reads."""
    argv = sys.argv
    yield
    sys.argv = argv


def run_in_process(name, args, cwd):
    """Runs an agent script's main() in this process, on its command line `args` in `cwd`, as run_script runs the
    program but without starting Python, torch and dm_control again (6 of a tiny run's 11 s); returns what it printed.
    The program's one-line error is a RunError here. The handlers of the stop signals are restored after the run; the
    command line is the program's (sys.argv: a resumed run takes the settings it names) while it runs."""
    import tyro

    script = load_script(name)
    stop_signals = [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP]
    handlers = {signum: signal.getsignal(signum) for signum in stop_signals}
    printed = io.StringIO()
    before = os.getcwd()
    argv = sys.argv
    os.chdir(cwd)  # and back below (contextlib.chdir would need Python 3.11)
    try:
        sys.argv = [f"{name}.py", *args]
        with contextlib.redirect_stdout(printed):
            script.main(tyro.cli(script.Args, args=args))
    except BaseException:
        print(printed.getvalue())  # shown with the failing test
        raise
    finally:
        sys.argv = argv
        os.chdir(before)
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    return printed.getvalue()


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """tiny_run(name): the script's TINY_RUN with --track, --capture-video and --save-model, run once for the whole
    session and shared by the tests that only read what it wrote: (the completed process, its run directory)."""
    done = {}

    def get(name):
        if name not in done:
            cwd = tmp_path_factory.mktemp(f"tiny_{name}")
            result = run_script(name, [*TINY_RUN, "--track", "--capture-video", "--save-model"], cwd=cwd)
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
            (run_dir,) = glob.glob(str(cwd / "runs" / "*"))
            done[name] = (result, run_dir)
        return done[name]

    return get


def read_scalars(run_dir):
    """{tag: [(step, value), ...]} from the TensorBoard event files in run_dir."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def tiny_batch(script, batch_size=8, action_dim=1):
    """A batch of the script's keys (TACO's included, K = 3), as CPU tensors, sampled from its own replay holding two
    episodes of 20 random transitions (random frames, actions and rewards)."""
    rng = np.random.default_rng(0)
    taco = {"multistep": 3} if hasattr(script, "TacoHead") else {}
    replay = script.ReplayBuffer(100, (3, 84, 84), action_dim, frame_stack=3, nstep=3, gamma=0.99, **taco)

    def frame():
        return rng.integers(0, 256, (3, 84, 84), dtype=np.uint8)

    for _ in range(2):
        replay.start_episode(frame())
        for _ in range(20):
            replay.add(rng.uniform(-1, 1, action_dim).astype(np.float32), rng.uniform(0, 1), 1.0, frame())
        replay.end_episode()
    return replay.sample(batch_size)
