"""Augmentation, networks, initialisation, target updates and one agent update (docs/drqv2.md, details 6-10)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_batch


def published_random_shift(x, shift, pad=4):
    """The published augmentation: replicate pad, then bilinear grid_sample by whole-pixel shifts.
    shift[:, 0] moves rows (y), shift[:, 1] columns (x), both in 0 .. 2 * pad."""
    n, h = x.shape[0], x.shape[2]
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    eps = 1.0 / (h + 2 * pad)
    arange = torch.linspace(-1.0 + eps, 1.0 - eps, h + 2 * pad)[:h]
    base = torch.stack(torch.meshgrid(arange, arange, indexing="xy"), dim=-1)[None].repeat(n, 1, 1, 1)
    offset = torch.stack([shift[:, 1], shift[:, 0]], dim=-1).float()[:, None, None, :] * 2.0 / (h + 2 * pad)
    return F.grid_sample(padded, base + offset, padding_mode="zeros", align_corners=False)


def test_random_shift_is_a_whole_pixel_crop_of_the_padded_image(script):
    torch.manual_seed(0)
    x = torch.rand(64, 9, 84, 84) * 255
    out = script.random_shift(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    padded = F.pad(x, (4, 4, 4, 4), mode="replicate")
    shifts = set()
    for i in range(len(x)):
        matches = [
            (dy, dx)
            for dy in range(9)
            for dx in range(9)
            if torch.equal(out[i], padded[i, :, dy : dy + 84, dx : dx + 84])
        ]
        assert len(matches) == 1, "each output is exactly one crop of the padded image, within +-4 pixels"
        shifts.add(matches[0])
    assert len(shifts) > 20, "shifts are drawn per sample"


def test_random_shift_equals_the_published_grid_sample(script):
    x = torch.rand(32, 9, 84, 84) * 255
    torch.manual_seed(1)
    out = script.random_shift(x)
    torch.manual_seed(1)
    shift = torch.randint(0, 9, (32, 2))  # the same draws random_shift makes
    # grid_sample's coordinates are whole pixels up to float rounding: a few thousandths on a 0-255 scale
    torch.testing.assert_close(out, published_random_shift(x, shift), atol=0.01, rtol=0)


def test_network_shapes(script):
    encoder = script.Encoder((9, 84, 84))
    assert encoder.repr_dim == 32 * 35 * 35 == 39_200
    features = encoder(torch.randint(0, 256, (5, 9, 84, 84)).float())
    assert features.shape == (5, 39_200)
    actor = script.Actor(encoder.repr_dim, 6, 50, 64)
    mean = actor(features)
    assert mean.shape == (5, 6) and mean.abs().max() <= 1
    critic = script.Critic(encoder.repr_dim, 6, 50, 64)
    q1, q2 = critic(features, mean)
    assert q1.shape == q2.shape == (5, 1) and not torch.equal(q1, q2)


def test_orthogonal_init_and_zero_bias(script):
    encoder = script.Encoder((9, 84, 84))
    conv = encoder.convnet[2].weight.reshape(32, -1)
    torch.testing.assert_close(conv @ conv.T, 2.0 * torch.eye(32), atol=1e-4, rtol=0)  # ReLU gain sqrt(2), squared
    linear = script.Actor(100, 3, 20, 64).trunk[0].weight
    torch.testing.assert_close(linear @ linear.T, torch.eye(20), atol=1e-4, rtol=0)
    assert all(m.bias.abs().max() == 0 for m in encoder.convnet if hasattr(m, "bias"))


def test_sample_action_clips_noise_and_passes_gradient_straight_through(script):
    mean = torch.zeros(10_000, 2, requires_grad=True)
    action = script.sample_action(mean, std=1.0, clip=0.3)
    assert action.abs().max() <= 0.3 + 1e-6 and action.std() > 0.1
    action.sum().backward()
    torch.testing.assert_close(mean.grad, torch.ones_like(mean))
    wide = script.sample_action(torch.full((1000, 2), 0.9), std=1.0)
    assert wide.max() < 1.0 and wide.min() > -1.0, "actions are clamped into [-1, 1]"


def test_soft_update_is_polyak_with_tau(script):
    torch.manual_seed(0)
    source, target = script.Critic(10, 2, 4, 8), script.Critic(10, 2, 4, 8)
    before = [p.clone() for p in target.parameters()]
    script.soft_update(target, source, 0.01)
    for old, new, src in zip(before, target.parameters(), source.parameters()):
        torch.testing.assert_close(new, 0.99 * old + 0.01 * src)


def tiny_args(script, **overrides):
    args = script.Args(env_id="cartpole_balance", hidden_dim=32, batch_size=16, **overrides)
    return script.resolve_args(args)


def test_update_moves_every_network_and_the_target_by_polyak(script):
    torch.manual_seed(0)
    agent = script.Agent((9, 84, 84), 1, tiny_args(script), torch.device("cpu"))
    snapshot = {
        name: [p.clone() for p in net.parameters()] for name, net in vars(agent).items() if hasattr(net, "parameters")
    }
    metrics = agent.update(tiny_batch(script), step=5000)
    for name in ["encoder", "actor", "critic"]:
        assert any(not torch.equal(a, b) for a, b in zip(snapshot[name], getattr(agent, name).parameters())), name
    for old, new, online in zip(snapshot["critic_target"], agent.critic_target.parameters(), agent.critic.parameters()):
        torch.testing.assert_close(new, 0.99 * old + 0.01 * online.detach())
    for key in ["losses/critic_loss", "losses/actor_loss", "losses/q_values", "charts/actor_std"]:
        assert torch.isfinite(metrics[key]), key
    assert metrics["charts/actor_std"].item() == pytest.approx(1.0 + (0.1 - 1.0) * 5000 / 100_000)


def test_actor_loss_sends_no_gradient_to_the_encoder(script):
    """In the agent's own update: when the actor steps, the encoder's gradients are still those the critic loss left
    (an actor loss through the encoder would add to them)."""
    torch.manual_seed(0)
    agent = script.Agent((9, 84, 84), 1, tiny_args(script), torch.device("cpu"))
    seen = {}
    for name, optimizer in [("critic", agent.encoder_opt), ("actor", agent.actor_opt)]:
        step = optimizer.step

        def recording_step(*args, _name=name, _step=step, **kwargs):
            grads = [None if p.grad is None else p.grad.clone() for p in agent.encoder.parameters()]
            seen.setdefault(_name, grads)  # the first call: the encoder steps again in TACO's step
            return _step(*args, **kwargs)

        optimizer.step = recording_step
    agent.update(tiny_batch(script), step=5000)
    assert all(grad is not None and grad.abs().sum() > 0 for grad in seen["critic"]), "the critic loss trains it"
    for after_critic, at_actor_step in zip(seen["critic"], seen["actor"]):
        assert torch.equal(after_critic, at_actor_step)


def test_act_explores_uniformly_then_follows_the_schedule(script):
    agent = script.Agent((9, 84, 84), 1, tiny_args(script), torch.device("cpu"))
    obs = np.zeros((9, 84, 84), dtype=np.uint8)
    early = np.array([agent.act(obs, 0, eval_mode=False) for _ in range(200)])
    assert early.min() < -0.8 and early.max() > 0.8, "uniform in [-1, 1] during the first agent steps"
    mean = agent.act(obs, 10**7, eval_mode=True)
    np.testing.assert_array_equal(mean, agent.act(obs, 10**7, eval_mode=True))
    late = np.array([agent.act(obs, 10**7, eval_mode=False) for _ in range(200)])
    assert 0.05 < late.std() < 0.2, "std decayed to 0.1"
