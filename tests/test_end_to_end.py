"""The script as a user runs it: a tiny run that writes every artefact the README promises."""

import glob
from pathlib import Path

import numpy as np
import torch

from conftest import load_script, read_scalars

DRQV2_TAGS = {
    "charts/episodic_return",
    "charts/episodic_length",
    "charts/SPS",
    "charts/actor_std",
    "eval/episodic_return",
    "losses/critic_loss",
    "losses/actor_loss",
    "losses/q_values",
}
TACO_TAGS = {"losses/taco_loss", "losses/curl_loss", "losses/reward_loss", "charts/taco_accuracy"}


def test_tiny_run_writes_logs_video_model_and_wandb(script, tiny_run):
    name = script.__name__
    result, run_dir = tiny_run(name)  # TINY_RUN with --track --capture-video --save-model
    assert "SPS" in result.stdout and "left" in result.stdout, "a progress line is printed"
    tmp_path = Path(run_dir).parents[1]  # where it ran
    assert glob.glob(str(tmp_path / "runs" / f"cartpole_balance__{name}__1__*")) == [run_dir]
    scalars = read_scalars(run_dir)
    expected = DRQV2_TAGS | (TACO_TAGS if hasattr(script, "TacoHead") else set())
    assert expected <= set(scalars), f"missing tags: {expected - set(scalars)}"
    assert [step for step, _ in scalars["eval/episodic_return"]] == [0, 120, 240], "evaluations at 0, 120 and the end"
    assert [step for step, _ in scalars["charts/episodic_return"]] == [40, 80, 120, 160, 200, 240]
    assert all(value == 40 for _, value in scalars["charts/episodic_length"]), "episode length in frames"
    assert all(np.isfinite(value) for _, value in scalars["losses/critic_loss"])

    for frame in [0, 120, 240]:
        video = tmp_path / "videos" / run_dir.split("/")[-1] / f"eval_{frame}.mp4"
        assert video.stat().st_size > 1000

    (model_path,) = glob.glob(f"{run_dir}/*.cleanrl_model")
    saved = torch.load(model_path, weights_only=True)
    assert saved["args"]["env_id"] == "cartpole_balance" and saved["args"]["hidden_dim"] == 32
    module = load_script(name)
    encoder = module.Encoder(saved["obs_shape"])
    actor = module.Actor(encoder.repr_dim, saved["action_dim"], saved["args"]["feature_dim"], 32)
    encoder.load_state_dict(saved["encoder"])
    actor.load_state_dict(saved["actor"])
    env = module.DMCPixelEnv("cartpole_balance", seed=0)
    with torch.no_grad():
        action = actor(encoder(torch.as_tensor(env.reset()).float()[None]))[0].numpy()
    assert action.shape == (1,) and np.abs(action).max() <= 1
    env.step(action)

    assert glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "*.wandb")), "wandb wrote an offline run"
    videos = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "files" / "media" / "videos" / "**" / "*.mp4"))
    assert len(videos) == 3, "each evaluation's video reaches the wandb run"
