"""Per-task presets and bad input (docs/drqv2.md, detail 2), and the pixel environment (detail 1)."""

import os

import numpy as np
import pytest

from conftest import run_script


def test_presets_fill_unset_fields(script):
    walker = script.resolve_args(script.Args(env_id="walker_walk"))
    assert walker.nstep == 1 and walker.total_timesteps == 1_100_000
    assert walker.stddev_schedule == "linear(1.0,0.1,100000)"
    assert walker.batch_size == (1024 if hasattr(script, "TacoHead") else 512)  # TACO keeps 1024 on walker
    quadruped = script.resolve_args(script.Args(env_id="quadruped_run"))
    assert quadruped.buffer_size == 100_000 and quadruped.total_timesteps == 3_100_000 and quadruped.nstep == 3
    assert quadruped.stddev_schedule == "linear(1.0,0.1,500000)" and quadruped.learning_rate == 1e-4
    humanoid = script.resolve_args(script.Args(env_id="humanoid_run"))
    assert humanoid.learning_rate == 8e-5 and humanoid.feature_dim == 100 and humanoid.buffer_size == 1_000_000
    assert humanoid.stddev_schedule == "linear(1.0,0.1,2000000)" and humanoid.total_timesteps == 30_100_000
    assert len(script.TASK_PRESET) == 26


def test_user_values_win_over_presets(script):
    args = script.Args(env_id="walker_walk", nstep=5, batch_size=64, total_timesteps=1000, stddev_schedule="0.2")
    resolved = script.resolve_args(args)
    assert (resolved.nstep, resolved.batch_size, resolved.total_timesteps) == (5, 64, 1000)
    assert resolved.stddev_schedule == "0.2"
    assert script.resolve_args(resolved) == resolved, "resolving twice changes nothing"


def test_unknown_task_lists_the_valid_ones(script):
    with pytest.raises(ValueError, match="cartpole_swingup.*walker_walk"):
        script.resolve_args(script.Args(env_id="cartpole_swing"))


def test_bad_command_line_fails_fast_with_one_clear_line(script, tmp_path):
    result = run_script(script.__name__, ["--env-id", "cartpole_swing"], cwd=tmp_path, timeout=120)
    assert result.returncode != 0
    assert "unknown env_id 'cartpole_swing'" in result.stderr and "cartpole_swingup" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists(), "nothing is written for a run that cannot start"


@pytest.mark.parametrize(
    "field,value,message",
    [("batch_size", 0, "batch-size"), ("nstep", -1, "nstep"), ("stddev_schedule", "linear(1,0.1)", "stddev")],
)
def test_bad_values_are_rejected(script, field, value, message):
    with pytest.raises(ValueError, match=message):
        script.resolve_args(script.Args(env_id="cartpole_balance", **{field: value}))


def test_schedule_parsing(script):
    schedule = script.parse_schedule("linear(1.0,0.1,100)")
    assert schedule(0) == 1.0 and schedule(50) == pytest.approx(0.55) and schedule(1000) == pytest.approx(0.1)
    assert script.parse_schedule("0.3")(12345) == 0.3


def test_pixel_env_matches_dm_control_with_action_repeat(script):
    os.environ.setdefault("MUJOCO_GL", "egl")
    from dm_control import suite

    env = script.DMCPixelEnv("cartpole_swingup", seed=3, action_repeat=2, frame_stack=3, max_episode_frames=20)
    raw = suite.load("cartpole", "swingup", task_kwargs={"random": 3}, visualize_reward=False)
    obs = env.reset()
    raw.reset()
    assert obs.shape == (9, 84, 84) and obs.dtype == np.uint8 and env.action_dim == 1
    assert np.array_equal(obs[0:3], obs[3:6]) and np.array_equal(obs[3:6], obs[6:9]), "first frame fills the stack"
    np.testing.assert_array_equal(obs[6:9], raw.physics.render(84, 84, camera_id=0).transpose(2, 0, 1))
    previous = obs
    for step in range(10):
        action = np.array([0.5 if step % 2 else -0.7], dtype=np.float32)
        obs, reward, discount, done = env.step(action)
        expected_reward = sum(raw.step(action).reward for _ in range(2))
        assert reward == pytest.approx(expected_reward) and discount == 1.0
        np.testing.assert_array_equal(obs[6:9], raw.physics.render(84, 84, camera_id=0).transpose(2, 0, 1))
        np.testing.assert_array_equal(obs[0:6], previous[3:9])  # the stack slides by one render
        assert done == (step == 9), "20 frames = 10 agent steps"
        previous = obs


def test_reach_duplo_and_quadruped_load_with_their_cameras(script):
    duplo = script.DMCPixelEnv("reach_duplo", seed=0)
    assert duplo.reset().shape == (9, 84, 84) and duplo.action_dim == 9
    obs, reward, _, done = duplo.step(np.zeros(9, dtype=np.float32))
    assert obs.shape == (9, 84, 84) and np.isfinite(reward) and not done
    quadruped = script.DMCPixelEnv("quadruped_run", seed=0)
    assert quadruped._camera == 2 and quadruped.reset().shape == (9, 84, 84)
