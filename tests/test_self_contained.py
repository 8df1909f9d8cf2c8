"""Each agent script is one self-contained file: it runs copied alone, and the code both hold is the same."""

import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, SCRIPTS, TINY_RUN, load_script

BLOCK = re.compile(
    r"^# --- shared: (?P<name>[^\n]+) ---\n(?P<body>.*?)^# --- end shared ---$", re.MULTILINE | re.DOTALL
)


def shared_blocks(text: str) -> dict:
    blocks = {}
    for match in BLOCK.finditer(text):
        assert match["name"] not in blocks, f"two blocks named {match['name']}"
        blocks[match["name"]] = match["body"]
    return blocks


def test_every_shared_block_is_byte_identical_in_both_scripts():
    texts = [(ROOT / f"{name}.py").read_text() for name in SCRIPTS]
    drqv2 = shared_blocks(texts[0])
    taco = shared_blocks(texts[1])
    assert set(drqv2) == set(taco), "both scripts mark the same blocks"
    assert {"environment", "networks", "run machinery", "checks", "presets"} <= set(drqv2)
    for name in drqv2:
        assert drqv2[name] == taco[name], f"the shared block {name!r} differs between the scripts"
    for text in texts:  # every opened block is closed
        assert len(re.findall(r"^# --- shared: ", text, re.MULTILINE)) == len(
            re.findall(r"^# --- end shared ---$", text, re.MULTILINE)
        )


def test_a_drifted_block_is_caught():
    text = (ROOT / "drqv2_continuous_action.py").read_text()
    drifted = text.replace("def duration(seconds: float) -> str:", "def duration(seconds: float):", 1)
    assert drifted != text
    assert shared_blocks(drifted)["run machinery"] != shared_blocks(text)["run machinery"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_script_copied_alone_into_an_empty_folder_runs(name, tmp_path):
    shutil.copy(ROOT / f"{name}.py", tmp_path)
    script = tmp_path / f"{name}.py"
    env = {**os.environ, "MUJOCO_GL": "egl", "PYTHONPATH": ""}  # nothing of the repository on the path
    helped = subprocess.run(
        [sys.executable, str(script), "--help"], check=False, cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert helped.returncode == 0 and "--env-id" in helped.stdout, helped.stderr[-2000:]
    flat = " ".join(helped.stdout.replace("│", " ").split())
    assert "(default: 256; 512 for walker_*)" in flat or "(default: 1024)" in flat
    for preset in ("walker_*)", "humanoid_*)", "action_dim) + 1)", "1000 frames); for tests and debugging"):
        assert f"{preset} (default: None)" not in flat, "one default per flag"
    ran = subprocess.run(
        [sys.executable, str(script), *TINY_RUN, "--total-timesteps", "120"],
        check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-2000:]
    assert "done: 120 frames" in ran.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"{name}.py", "runs"]), "nothing but the run's logs"


class PublishedActionDType:
    """The published code's ActionDTypeWrapper (drqv2/dmc.py): a float32 action spec over the task's float64 one."""

    def __init__(self, env):
        from dm_env import specs

        self._env = env
        spec = env.action_spec()
        self._spec = specs.BoundedArray(spec.shape, np.float32, spec.minimum, spec.maximum, "action")

    def action_spec(self):
        return self._spec

    def step(self, action):
        return self._env.step(action.astype(self._env.action_spec().dtype))

    def __getattr__(self, name):
        return getattr(self._env, name)


@pytest.mark.parametrize("env_id", ["cartpole_balance", "quadruped_run"])
def test_environment_equals_dm_controls_action_scale_wrapper_chain_byte_for_byte(env_id):
    """The published chain: suite.load -> float32 action spec -> action_scale.Wrapper(-1, 1) (one action per agent
    step, repeated); the same physics state and reward after every one of 300 random actions. The environment block
    is byte-identical in both scripts (tested above), so one script's is tested."""
    script = load_script("drqv2_continuous_action")
    from dm_control import suite
    from dm_control.suite.wrappers import action_scale

    domain, task = env_id.split("_", 1)
    published = action_scale.Wrapper(
        PublishedActionDType(suite.load(domain, task, task_kwargs={"random": 5}, visualize_reward=False)), -1.0, 1.0
    )
    ours = script.DMCPixelEnv(env_id, seed=5, action_repeat=1)
    # Pixels are not compared, and a render only reads the physics: ours skips them (on a CPU, most of the test's time).
    ours._env.physics.render = lambda **_: np.zeros((84, 84, 3), np.uint8)
    ours.reset()
    published.reset()
    rng = np.random.default_rng(0)
    for step in range(300):
        action = rng.uniform(-1, 1, size=ours.action_dim).astype(np.float32)
        _, reward, _, done = ours.step(action)
        time_step = published.step(action)
        assert reward == (time_step.reward or 0.0), f"step {step}"
        assert ours._env.physics.get_state().tobytes() == published.physics.get_state().tobytes(), f"step {step}"
        if done:
            break
    assert step >= 299 or done
