"""Each script's update against an oracle written from the algorithm's description (docs/drqv2.md, docs/taco.md), not
from the scripts: plain tensor arithmetic on tiny networks with fixed weights and a fixed batch. The oracle computes
the n-step critic target (twin-Q minimum, discount), both critic losses, the actor loss through the updated critic,
TACO's InfoNCE over the bilinear score, CURL and the reward loss on the updated encoder, Adam and the Polyak step. Its
numbers are compared value by value (losses), gradient by gradient (at each optimizer step) and weight by weight
(after two updates). Mutated copies of the scripts (max for min, no discount, ...) must fail the comparison.

Two things the oracle takes from the script on purpose: the random draws (it replays the generator in the documented
order: the shifts of obs and next_obs, the target's policy noise, the actor's policy noise, then TACO's shifts of the
anchor, the future and CURL's positive), and, for its Adam steps, the gradients the script stepped with (after
checking them against its own), so that rounding in near-zero gradients cannot turn into +-lr differences.
"""

import importlib.util
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, SCRIPTS

IMAGE = 20  # 20x20 images: a 3x3x32 = 288-wide encoder output
ACTION_DIM = 2
BATCH = 8
STD = 0.6  # the schedule's std at the step the test uses; clip 0.3 cuts some of the noise
SETTINGS = {"feature_dim": 8, "hidden_dim": 16, "learning_rate": 1e-3, "tau": 0.05, "stddev_schedule": "0.6"}
NETWORKS = ["encoder", "actor", "critic", "critic_target", "action_encoder", "taco_head"]
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
LAYER_NORM_EPS = 1e-5


# ----------------------------------------------------------------------------------------------------------------------
# The oracle: networks as functions of a dict of named weights


def linear(p, name, x):
    return x @ p[f"{name}.weight"].T + p[f"{name}.bias"]


def layer_norm(p, name, x):
    centred = x - x.mean(dim=-1, keepdim=True)
    variance = (centred * centred).mean(dim=-1, keepdim=True)
    return centred / torch.sqrt(variance + LAYER_NORM_EPS) * p[f"{name}.weight"] + p[f"{name}.bias"]


def relu(x):
    return torch.where(x > 0, x, torch.zeros_like(x))


def encoder(p, images):
    """uint8 stacks -> features: /255 - 0.5, then 4 convolutions (the first with stride 2), ReLU after each."""
    x = images.double() / 255.0 - 0.5
    for index, layer in enumerate([0, 2, 4, 6]):
        stride = 2 if index == 0 else 1
        x = relu(F.conv2d(x, p[f"encoder.convnet.{layer}.weight"], p[f"encoder.convnet.{layer}.bias"], stride=stride))
    return x.reshape(len(x), -1)


def trunk(p, name, features):
    return torch.tanh(layer_norm(p, f"{name}.1", linear(p, f"{name}.0", features)))


def three_layer_mlp(p, name, x):
    hidden = relu(linear(p, f"{name}.0", x))
    hidden = relu(linear(p, f"{name}.2", hidden))
    return linear(p, f"{name}.4", hidden)


def actor_mean(p, features):
    return torch.tanh(three_layer_mlp(p, "actor.policy", trunk(p, "actor.trunk", features)))


def critic(p, name, features, action):
    h = torch.cat([trunk(p, f"{name}.trunk", features), action], dim=1)
    return three_layer_mlp(p, f"{name}.q1", h), three_layer_mlp(p, f"{name}.q2", h)


def latent_action(p, action):
    """g: Linear -> Tanh -> Linear."""
    return linear(p, "action_encoder.embed.2", torch.tanh(linear(p, "action_encoder.embed.0", action)))


def action_sequence(p, actions):
    """U_t: the K latent actions side by side, then Linear -> LayerNorm -> Tanh."""
    stacked = torch.cat([latent_action(p, actions[:, k]) for k in range(actions.shape[1])], dim=1)
    return torch.tanh(layer_norm(p, "action_encoder.sequence.1", linear(p, "action_encoder.sequence.0", stacked)))


def two_layer_mlp(p, name, x):
    return linear(p, f"{name}.2", relu(linear(p, f"{name}.0", x)))


def policy_sample(mean, noise):
    """mean + clipped noise, clamped into [-1, 1] in value with the gradient of the unclamped action."""
    action = mean + noise.clamp(-0.3, 0.3)
    return action + (action.clamp(-1 + 1e-6, 1 - 1e-6) - action).detach()


def shift(images, offsets):
    """Replicate-pad by 4, then crop 20x20 at (row, column) offsets in [0, 8] of each image."""
    padded = F.pad(images.double(), (4, 4, 4, 4), mode="replicate")
    crops = [padded[i, :, r : r + IMAGE, c : c + IMAGE] for i, (r, c) in enumerate(offsets.tolist())]
    return torch.stack(crops)


def cross_entropy_on_diagonal(logits):
    """InfoNCE with the positive of row i in column i: mean of logsumexp(row) - logit_ii."""
    return (torch.logsumexp(logits, dim=1) - torch.diagonal(logits)).mean()


def draws(taco):
    """The random draws of one update, in the documented order, from the generator as the test seeded it."""
    drawn = {
        "obs": torch.randint(0, 9, (BATCH, 2)),
        "next_obs": torch.randint(0, 9, (BATCH, 2)),
        "target_noise": torch.randn(BATCH, ACTION_DIM) * STD,
        "actor_noise": torch.randn(BATCH, ACTION_DIM) * STD,
    }
    if taco:
        drawn["anchor"] = torch.randint(0, 9, (BATCH, 2))
        drawn["future"] = torch.randint(0, 9, (BATCH, 2))
        drawn["curl"] = torch.randint(0, 9, (BATCH, 2))
    return drawn


def leaves(p, names):
    return {name: p[name].detach().clone().requires_grad_(True) for name in names}


def gradients(loss, weights):
    grads = torch.autograd.grad(loss, list(weights.values()), allow_unused=True)
    return dict(zip(weights, grads))


def adam(p, state, grads):
    """Adam (lr from SETTINGS, betas 0.9 and 0.999, eps 1e-8) on the weights that have a gradient."""
    lr = SETTINGS["learning_rate"]
    for name, grad in grads.items():
        if grad is None:
            continue
        grad = grad.double()
        entry = state.setdefault(name, {"t": 0, "m": torch.zeros_like(grad), "v": torch.zeros_like(grad)})
        entry["t"] += 1
        entry["m"] = ADAM_BETAS[0] * entry["m"] + (1 - ADAM_BETAS[0]) * grad
        entry["v"] = ADAM_BETAS[1] * entry["v"] + (1 - ADAM_BETAS[1]) * grad * grad
        m_hat = entry["m"] / (1 - ADAM_BETAS[0] ** entry["t"])
        v_hat = entry["v"] / (1 - ADAM_BETAS[1] ** entry["t"])
        p[name] = p[name] - lr * m_hat / (torch.sqrt(v_hat) + ADAM_EPS)


def oracle_update(p, adam_states, batch, drawn, stepped, taco):
    """One update on the weights p (changed in place). `stepped`: the script's gradients at each optimizer step.
    Returns the losses and the oracle's own gradients of each loss."""
    names = list(p)
    out = {}
    encoder_names = [n for n in names if n.startswith("encoder.") or (taco and n.startswith("action_encoder."))]
    critic_names = [n for n in names if n.startswith("critic.")]
    # critic: y = n-step reward + discount * min(Q1', Q2')(s', a'), a' with clipped noise; gradients reach f (and g)
    weights = leaves(p, encoder_names + critic_names)
    q = {**p, **weights}
    features = encoder(q, shift(batch["obs"], drawn["obs"]))
    with torch.no_grad():
        next_features = encoder(q, shift(batch["next_obs"], drawn["next_obs"]))
        next_action = policy_sample(actor_mean(p, next_features), drawn["target_noise"].double())
        if taco:
            next_action = latent_action(p, next_action)
        target_q1, target_q2 = critic(p, "critic_target", next_features, next_action)
        target = batch["reward"].double() + batch["discount"].double() * torch.minimum(target_q1, target_q2)
    action = latent_action(q, batch["action"].double()) if taco else batch["action"].double()
    q1, q2 = critic(q, "critic", features, action)
    critic_loss = ((q1 - target) ** 2).mean() + ((q2 - target) ** 2).mean()
    out["losses/critic_loss"] = critic_loss
    out["losses/q_values"] = q1.mean()
    out["critic gradients"] = gradients(critic_loss, weights)
    adam(p, adam_states["critic"], {n: stepped["critic_opt"][n] for n in critic_names})
    adam(p, adam_states["encoder"], {n: stepped["encoder_opt"][n] for n in encoder_names})
    # actor: on the features of obs computed before the steps, detached; through the critic just stepped
    actor_names = [n for n in names if n.startswith("actor.")]
    weights = leaves(p, actor_names)
    q = {**p, **weights}
    action = policy_sample(actor_mean(q, features.detach()), drawn["actor_noise"].double())
    if taco:
        action = latent_action(p, action)
    q1, q2 = critic(p, "critic", features.detach(), action)
    actor_loss = -torch.minimum(q1, q2).mean()
    out["losses/actor_loss"] = actor_loss
    out["actor gradients"] = gradients(actor_loss, weights)
    adam(p, adam_states["actor"], {n: stepped["actor_opt"][n] for n in actor_names})
    # Polyak: target <- tau * critic + (1 - tau) * target
    for name in critic_names:
        target_name = name.replace("critic.", "critic_target.", 1)
        p[target_name] = p[target_name] + SETTINGS["tau"] * (p[name] - p[target_name])
    if taco:
        # TACO, CURL and reward losses on the encoder after the critic's step, one Adam over f, g, U, h, G, W, reward
        taco_names = encoder_names + [n for n in names if n.startswith("taco_head.")]
        weights = leaves(p, taco_names)
        q = {**p, **weights}
        z_anchor = trunk(q, "taco_head.project", encoder(q, shift(batch["obs"], drawn["anchor"])))
        with torch.no_grad():
            z_future = trunk(q, "taco_head.project", encoder(q, shift(batch["future_obs"], drawn["future"])))
            z_positive = trunk(q, "taco_head.project", encoder(q, shift(batch["obs"], drawn["curl"])))
        z_u = torch.cat([z_anchor, action_sequence(q, batch["action_seq"].double())], dim=1)
        logits = two_layer_mlp(q, "taco_head.predictor", z_u) @ q["taco_head.W"] @ z_future.T
        logits = logits - logits.max(dim=1, keepdim=True).values
        curl_logits = z_anchor @ q["taco_head.W"] @ z_positive.T
        curl_logits = curl_logits - curl_logits.max(dim=1, keepdim=True).values
        predicted_reward = two_layer_mlp(q, "taco_head.reward", z_u)
        out["losses/taco_loss"] = cross_entropy_on_diagonal(logits)
        out["losses/curl_loss"] = cross_entropy_on_diagonal(curl_logits)
        out["losses/reward_loss"] = ((predicted_reward - batch["reward"].double()) ** 2).mean()
        out["charts/taco_accuracy"] = (logits.argmax(dim=1) == torch.arange(BATCH)).double().mean()
        total = out["losses/taco_loss"] + out["losses/curl_loss"] + out["losses/reward_loss"]
        out["taco gradients"] = gradients(total, weights)
        adam(p, adam_states["taco"], {n: stepped["taco_opt"][n] for n in taco_names})
    return out


# ----------------------------------------------------------------------------------------------------------------------
# The comparison


def load_copy(name, tmp_path, replace=(), mutation=None):
    """A fresh import of a script, with pieces of its source replaced: (old, new) pairs, each old occurring once. A
    patch that does not find its piece fails the test saying so, apart from the oracle failing."""
    source = (ROOT / f"{name}.py").read_text()
    for old, new in replace:
        if source.count(old) != 1:
            found = f"{old!r} occurs {source.count(old)} times"
            pytest.fail(f"the patch for {mutation} no longer applies: {name}.py changed where it looks ({found})")
        source = source.replace(old, new)
    path = tmp_path / f"{name}_copy.py"
    path.write_text(source)
    module_name = f"{name}_oracle_copy_{abs(hash(source))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses look their module up while the script runs
    spec.loader.exec_module(module)
    return module


def make_batch(taco, generator):
    def images():
        return torch.randint(0, 256, (BATCH, 9, IMAGE, IMAGE), dtype=torch.uint8, generator=generator)

    def uniform(*shape):
        return torch.rand(*shape, generator=generator) * 2 - 1

    batch = {
        "obs": images(),
        "action": uniform(BATCH, ACTION_DIM),
        "reward": uniform(BATCH, 1) * 3,
        "discount": torch.full((BATCH, 1), 0.95**3),
        "next_obs": images(),
    }
    if taco:
        batch["action_seq"] = uniform(BATCH, 3, ACTION_DIM)
        batch["future_obs"] = images()
    return batch


def named_weights(agent):
    return {
        f"{network}.{name}": weight
        for network in NETWORKS
        if hasattr(agent, network)
        for name, weight in getattr(agent, network).named_parameters()
    }


def record_steps(agent, names_of):
    """Wraps each optimizer's step to record the gradients it steps with, by weight name."""
    stepped = {}
    for attribute in ["encoder_opt", "critic_opt", "actor_opt", "taco_opt"]:
        optimizer = getattr(agent, attribute, None)
        if optimizer is None:
            continue

        def step(original=optimizer.step, optimizer=optimizer, attribute=attribute):
            grads = {}
            for group in optimizer.param_groups:
                for weight in group["params"]:
                    grads[names_of[id(weight)]] = None if weight.grad is None else weight.grad.detach().clone()
            stepped[attribute] = grads
            return original()

        optimizer.step = step
    return stepped


def assert_close(ours, oracle, what):
    torch.testing.assert_close(ours.double(), oracle.double(), rtol=2e-4, atol=2e-6, msg=lambda m: f"{what}: {m}")


def compare_with_oracle(module):
    """Two updates of the script's agent against the oracle, from the same weights, batches and draws."""
    taco = hasattr(module, "TacoHead")
    args = module.resolve_args(module.Args(env_id="cartpole_balance", **SETTINGS))
    torch.manual_seed(0)
    agent = module.Agent((9, IMAGE, IMAGE), ACTION_DIM, args, torch.device("cpu"))
    weights = named_weights(agent)
    names_of = {id(weight): name for name, weight in weights.items()}
    p = {name: weight.detach().double().clone() for name, weight in weights.items()}
    adam_states = {"critic": {}, "encoder": {}, "actor": {}, "taco": {}}
    generator = torch.Generator().manual_seed(1)
    for update in range(2):
        batch = make_batch(taco, generator)
        stepped = record_steps(agent, names_of)
        torch.manual_seed(100 + update)
        metrics = agent.update(batch, step=5000)
        torch.manual_seed(100 + update)
        drawn = draws(taco)
        expected = oracle_update(p, adam_states, batch, drawn, stepped, taco)
        expected_steps = {"critic_opt": "critic", "encoder_opt": "critic", "actor_opt": "actor", "taco_opt": "taco"}
        assert set(stepped) == {attribute for attribute in expected_steps if hasattr(agent, attribute)}
        for tag in [tag for tag in expected if not tag.endswith("gradients")]:
            assert_close(metrics[tag], expected[tag].detach(), f"update {update}, {tag}")
        for attribute, grads in stepped.items():
            oracle_grads = expected[f"{expected_steps[attribute]} gradients"]
            for name, grad in grads.items():
                if oracle_grads[name] is None:
                    assert grad is None or not grad.any(), f"update {update}, {attribute}: {name} has a gradient"
                else:
                    assert grad is not None, f"update {update}, {attribute}: {name} has no gradient"
                    assert_close(grad, oracle_grads[name], f"update {update}, {attribute}, gradient of {name}")
        for name, weight in weights.items():
            assert_close(weight.detach(), p[name], f"after update {update}, weight {name}")


@pytest.mark.parametrize("name", SCRIPTS)
def test_update_matches_the_oracle(name, tmp_path):
    compare_with_oracle(load_copy(name, tmp_path))


MUTATIONS = {
    "max for min in the critic target": [
        (
            "discount * torch.min(target_q1, target_q2)",
            "discount * torch.max(target_q1, target_q2)",
        )
    ],
    "no discount in the critic target": [("reward + discount * torch.min", "reward + torch.min")],
    "one critic head in the critic loss": [
        (
            "critic_loss = F.mse_loss(q1.float(), target_q) + F.mse_loss(q2.float(), target_q)",
            "critic_loss = 2 * F.mse_loss(q1.float(), target_q)",
        )
    ],
    "max for min in the actor loss": [("-torch.min(q1, q2).float().mean()", "-torch.max(q1, q2).float().mean()")],
    "no noise clip": [
        (
            "action = mean + (noise if clip is None else noise.clamp(-clip, clip))",
            "action = mean + noise",
        )
    ],
    "Polyak rate reversed": [
        (
            "torch._foreach_lerp_(list(target.parameters()), list(source.parameters()), tau)",
            "torch._foreach_lerp_(list(target.parameters()), list(source.parameters()), 1 - tau)",
        )
    ],
    "actor before the critic": [
        (
            "        metrics = self.update_critic(",
            "        self.update_actor(obs.detach(), std)\n        metrics = self.update_critic(",
        ),
        ("        metrics.update(self.update_actor(obs.detach(), std))\n", ""),
    ],
    "no critic gradient into the encoder": [
        (
            "target_q2)\n            q1, q2 = self.critic(obs,",
            "target_q2)\n            q1, q2 = self.critic(obs.detach(),",
        )
    ],
}
TACO_MUTATIONS = {
    "CURL against its own anchor": [
        (
            "bilinear_logits(z_anchor, z_positive, head.W)",
            "bilinear_logits(z_anchor, z_anchor.detach(), head.W)",
        )
    ],
    "InfoNCE logits not against the future": [
        (
            "logits = bilinear_logits(head.predictor(z_u), z_future, head.W)",
            "logits = bilinear_logits(head.predictor(z_u), z_future.flip(0), head.W)",
        )
    ],
    "reward loss without the action sequence": [
        (
            'losses["losses/reward_loss"] = F.mse_loss(head.reward(z_u).float(), reward)',
            'losses["losses/reward_loss"] = F.mse_loss(head.reward(z_u * 0).float(), reward)',
        )
    ],
    "the target critic scores no action": [
        (
            "next_action = self.action_encoder(sample_action(self.actor(next_obs), std, self.args.stddev_clip))",
            "next_action = self.action_encoder(sample_action(self.actor(next_obs), std, self.args.stddev_clip) * 0)",
        )
    ],
    "TACO's future encoding with a gradient": [
        (
            "    with torch.no_grad():\n        z_future = head.project",
            "    if True:\n        z_future = head.project",
        )
    ],
}
CASES = [(name, mutation) for name in SCRIPTS for mutation in MUTATIONS] + [
    ("taco_continuous_action", mutation) for mutation in TACO_MUTATIONS
]


@pytest.mark.parametrize("name,mutation", CASES)
def test_a_broken_update_fails_the_oracle(name, mutation, tmp_path):
    module = load_copy(name, tmp_path, replace={**MUTATIONS, **TACO_MUTATIONS}[mutation], mutation=mutation)
    with pytest.raises(AssertionError):
        compare_with_oracle(module)


def test_a_patch_that_no_longer_applies_says_so(tmp_path):
    expected = "the patch for max for min no longer applies: drqv2_continuous_action.py changed where it looks"
    with pytest.raises(pytest.fail.Exception, match=expected):
        load_copy(
            "drqv2_continuous_action",
            tmp_path,
            replace=[("torch.min(q9, q9)", "torch.max(q9, q9)")],
            mutation="max for min",
        )
