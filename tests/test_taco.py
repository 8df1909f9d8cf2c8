"""TACO (docs/taco.md): sequence sampling, the losses against loop-based references, switches, and a learning signal."""

import numpy as np
import pytest
import torch

from conftest import load_script, tiny_batch
from test_replay import FRAME_SHAPE, GAMMA, make_episode, reference_sample, source_of, stacked, store

taco = load_script("taco_continuous_action")


def make_replay(nstep, multistep, capacity=10_000):
    return taco.ReplayBuffer(capacity, FRAME_SHAPE, 2, frame_stack=3, nstep=nstep, gamma=GAMMA, multistep=multistep)


@pytest.mark.parametrize("nstep,multistep", [(3, 3), (1, 3), (3, 1), (2, 5)])
def test_sequence_sampling_matches_brute_force_reference(nstep, multistep):
    rng = np.random.default_rng(0)
    window = max(nstep, multistep)
    lengths = [12, window - 1, 6, window, 25]  # the second is too short to give a sample; the fourth gives one
    episodes = [make_episode(rng, i, length) for i, length in enumerate(lengths)]
    replay = make_replay(nstep, multistep)
    for episode in episodes:
        store(replay, episode)
    sample = replay.sample(5000)
    assert sample["action_seq"].shape == (5000, multistep, 2) and sample["future_obs"].shape == sample["obs"].shape
    seen = set()
    for i in range(5000):
        episode_id, t = source_of(sample, i)
        episode = episodes[episode_id]
        assert t <= len(episode["actions"]) - window, "both the n-step and the K-step windows fit in the episode"
        expected = reference_sample(episode, t, nstep, 3)
        for key in ["obs", "next_obs", "action"]:
            np.testing.assert_array_equal(sample[key][i], expected[key])
        np.testing.assert_allclose(sample["reward"][i, 0], expected["reward"], rtol=1e-6)
        np.testing.assert_array_equal(sample["action_seq"][i], episode["actions"][t : t + multistep])
        np.testing.assert_array_equal(sample["future_obs"][i], stacked(episode["frames"], t + multistep, 3))
        seen.add((episode_id, t))
    valid = {(e, t) for e, length in enumerate(lengths) for t in range(length - window + 1)}
    assert seen == valid, "every valid index is drawn (the last valid one included), and only those"
    assert (3, 0) in seen and not any(e == 1 for e, _ in seen)


def loop_info_nce(queries, keys, W):
    """Cross-entropy of row i of q_i W k_j against column i, one element at a time."""
    total = 0.0
    for i in range(len(queries)):
        row = torch.stack([queries[i] @ W @ keys[j] for j in range(len(keys))])
        total = total + torch.logsumexp(row, dim=0) - row[i]
    return total / len(queries)


def tiny_modules(seed=0, action_dim=2, latent_dim=3, multistep=3):
    torch.manual_seed(seed)
    encoder = taco.Encoder((3, 16, 16))
    action_encoder = taco.ActionEncoder(action_dim, latent_dim, multistep)
    head = taco.TacoHead(encoder.repr_dim, 8, latent_dim * multistep, 16)
    return encoder, action_encoder, head


def parameters_of(*modules):
    return [p for m in modules for p in m.parameters()]


def test_taco_and_curl_losses_equal_loop_based_infonce_values_and_gradients():
    encoder, action_encoder, head = tiny_modules()
    rng = np.random.default_rng(0)
    obs = torch.tensor(rng.integers(0, 256, (6, 3, 16, 16)), dtype=torch.float32)
    future = torch.tensor(rng.integers(0, 256, (6, 3, 16, 16)), dtype=torch.float32)
    action_seq = torch.tensor(rng.uniform(-1, 1, (6, 3, 2)), dtype=torch.float32)
    reward = torch.tensor(rng.uniform(0, 1, (6, 1)), dtype=torch.float32)
    params = parameters_of(encoder, action_encoder, head)

    torch.manual_seed(7)
    losses, accuracy = taco.taco_losses(encoder, action_encoder, head, obs, action_seq, future, reward)
    assert set(losses) == {"losses/taco_loss", "losses/curl_loss", "losses/reward_loss"}

    torch.manual_seed(7)  # the same augmentation draws, in the documented order: anchor, future, CURL's
    z_anchor = head.project(encoder(taco.random_shift(obs)))
    z_future = head.project(encoder(taco.random_shift(future))).detach()
    z_positive = head.project(encoder(taco.random_shift(obs))).detach()
    u = action_encoder.encode_sequence(action_seq)
    queries = head.predictor(torch.cat([z_anchor, u], dim=-1))
    expected = {
        "losses/taco_loss": loop_info_nce(queries, z_future, head.W),
        "losses/curl_loss": loop_info_nce(z_anchor, z_positive, head.W),
        "losses/reward_loss": ((head.reward(torch.cat([z_anchor, u], dim=-1)) - reward) ** 2).mean(),
    }
    for tag, loss in losses.items():
        torch.testing.assert_close(loss, expected[tag], rtol=1e-5, atol=1e-6)
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        expected_grads = torch.autograd.grad(expected[tag], params, retain_graph=True, allow_unused=True)
        for got, want in zip(grads, expected_grads):
            assert (got is None) == (want is None), tag
            if got is not None:
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    logits = torch.stack([torch.stack([q @ head.W @ k for k in z_future]) for q in queries])
    assert accuracy.item() == pytest.approx((logits.argmax(1) == torch.arange(6)).float().mean().item())


def test_row_max_subtraction_leaves_the_loss_unchanged():
    queries, keys, W = torch.randn(5, 4) * 30, torch.randn(5, 4), torch.rand(4, 4)
    logits = taco.bilinear_logits(queries, keys, W)
    assert torch.all(logits.max(dim=1).values == 0)
    torch.testing.assert_close(
        torch.nn.functional.cross_entropy(logits, torch.arange(5)), loop_info_nce(queries, keys, W)
    )


def test_latent_action_dim_heuristic():
    assert [taco.default_latent_action_dim(a) for a in (1, 2, 6, 12)] == [2, 3, 8, 16]


def make_agent(**overrides):
    args = taco.resolve_args(taco.Args(env_id="cheetah_run", hidden_dim=32, batch_size=8, **overrides))
    return taco.Agent((9, 84, 84), 6, args, torch.device("cpu"))


def test_critic_scores_latent_actions_and_trains_g_but_not_the_sequence_encoder():
    agent = make_agent()
    assert agent.critic.q1[0].in_features == agent.args.feature_dim + 8, "Q(s, g(a)) with d_u = 8 for |A| = 6"
    assert make_agent(latent_action_dim=5).critic.q1[0].in_features == agent.args.feature_dim + 5
    batch = tiny_batch(taco, action_dim=6)
    obs = agent.encoder(taco.random_shift(batch["obs"].float()))
    with torch.no_grad():
        next_obs = agent.encoder(taco.random_shift(batch["next_obs"].float()))
    agent.update_critic(obs, batch["action"], batch["reward"], batch["discount"], next_obs, 0.2)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in agent.action_encoder.embed.parameters())
    assert all(p.grad is None for p in agent.action_encoder.sequence.parameters())
    assert all(p.grad is not None for p in agent.encoder.parameters())
    assert {id(p) for p in agent.action_encoder.parameters()} <= {
        id(p) for group in agent.encoder_opt.param_groups for p in group["params"]
    }


def test_update_order_is_critic_actor_target_then_taco(monkeypatch):
    agent, calls = make_agent(), []
    for name in ["update_critic", "update_actor", "update_taco"]:
        method = getattr(agent, name)
        monkeypatch.setattr(agent, name, lambda *a, _m=method, _n=name: calls.append(_n) or _m(*a))
    soft_update = taco.soft_update
    monkeypatch.setattr(taco, "soft_update", lambda *a: calls.append("target") or soft_update(*a))
    metrics = agent.update(tiny_batch(taco, action_dim=6), step=10_000)
    assert calls == ["update_critic", "update_actor", "target", "update_taco"]
    for tag in ["losses/taco_loss", "losses/curl_loss", "losses/reward_loss", "charts/taco_accuracy"]:
        assert torch.isfinite(metrics[tag]), tag


@pytest.mark.parametrize("curl,reward_loss", [(False, True), (True, False), (False, False)])
def test_switched_off_losses_are_not_computed_and_their_parameters_get_no_gradient(curl, reward_loss):
    agent = make_agent(curl=curl, reward_loss=reward_loss)
    metrics = agent.update_taco(tiny_batch(taco, action_dim=6))
    assert ("losses/curl_loss" in metrics) == curl and ("losses/reward_loss" in metrics) == reward_loss
    assert "losses/taco_loss" in metrics and "charts/taco_accuracy" in metrics
    reward_grads = [p.grad for p in agent.taco_head.reward.parameters()]
    assert all(g is None for g in reward_grads) != reward_loss
    assert agent.taco_head.W.grad is not None and agent.taco_head.predictor[0].weight.grad is not None


def colour_world_batch(rng, batch_size, multistep, size=24):
    """A square whose red is set by the coming actions (their mean first component) and whose green, one of four
    levels, is kept: the future is a fixed function of the current observation and the actions."""
    actions = rng.uniform(-1, 1, (batch_size, multistep, 2)).astype(np.float32)
    red, green = rng.uniform(0, 1, batch_size), rng.integers(0, 4, batch_size) / 3
    future_red = (actions[:, :, 0].mean(axis=1) + 1) / 2

    def paint(r, g):
        img = np.zeros((batch_size, 3, size, size), dtype=np.float32)
        img[:, 0, 6:18, 6:18] = 255 * r[:, None, None]
        img[:, 1, 6:18, 6:18] = 255 * g[:, None, None]
        return torch.tensor(img)

    return paint(red, green), torch.tensor(actions), paint(future_red, green)


# Measured (seed 0, 400 steps): the CURL loss ends at 0.33 x log(64); with CURL's positives taken from other rows of
# the batch (a broken loss) it stays at log(64).
CURL_LOSS_BOUND = 0.6


def train_on_colour_world(shuffle_actions, steps=400, batch_size=64, seed=0):
    """The agent's own TACO step (its losses and its optimizer) on the colour world, with CURL; returns the TACO loss,
    its accuracy and the CURL loss, averaged over the last 50 steps."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    settings = {"feature_dim": 32, "hidden_dim": 128, "latent_action_dim": 3, "multistep": 3, "learning_rate": 1e-3}
    args = taco.resolve_args(taco.Args(env_id="cartpole_balance", reward_loss=False, **settings))
    agent = taco.Agent((3, 24, 24), 2, args, torch.device("cpu"))
    history = []
    for _ in range(steps):
        obs, action_seq, future = colour_world_batch(rng, batch_size, 3)
        if shuffle_actions:  # only the current observation informs the future
            action_seq = action_seq[torch.randperm(batch_size)]
        batch = {"obs": obs, "action_seq": action_seq, "future_obs": future, "reward": torch.zeros(batch_size, 1)}
        metrics = agent.update_taco(batch)
        history.append(
            [metrics[tag].item() for tag in ["losses/taco_loss", "charts/taco_accuracy", "losses/curl_loss"]]
        )
    return np.mean(history[-50:], axis=0)


def test_taco_learns_to_use_the_actions():
    loss, accuracy, curl_loss = train_on_colour_world(shuffle_actions=False)
    shuffled_loss, shuffled_accuracy, _ = train_on_colour_world(shuffle_actions=True)
    chance = 1 / 64
    assert loss < 0.65 * np.log(64), f"TACO loss {loss:.2f} vs log(batch) {np.log(64):.2f}"
    assert accuracy > 7 * chance, f"accuracy {accuracy:.3f}"
    assert shuffled_loss > loss + 0.4, f"with the actions shuffled: {shuffled_loss:.2f} vs {loss:.2f}"
    assert accuracy > 2 * shuffled_accuracy, f"{accuracy:.3f} vs shuffled {shuffled_accuracy:.3f}"
    # CURL: two shifts of one image are told apart from the batch's other images, far better than chance
    assert curl_loss < CURL_LOSS_BOUND * np.log(64), f"CURL loss {curl_loss:.2f} vs log(batch) {np.log(64):.2f}"
