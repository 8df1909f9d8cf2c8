# How saturated a run's actor is: on replay states of its checkpoint, the actor's output before its tanh and the share
# of mean actions beyond +-0.99 (a tanh saturated far enough passes almost no gradient, so the policy cannot move).
# A finished run's checkpoint holds no replay: then the states are those the policy visits acting with its mean action.
# It also says whether the critic prefers the actor's mean action to its opposite, and whether the critic's best action
# lies inside the action range at all (a critic whose best is always at an edge drives the actor into saturation); and
# how far one more Adam step along the actor's moments (its recent gradients) moves its output before the tanh. On the
# line of actions through the mean action, edge to edge, it gives how much the action weighs in the critics' first
# layers and, for TACO, whose critic scores the latent action g(a), how straight g is along that line.
#   python benchmarks/learning/actor_saturation.py runs/<run_name> [--states 512]
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/, for the loader
from speed import load_script


@dataclass
class Args:
    """How saturated a run's actor is (its pre-tanh output, the share of mean actions beyond +-0.99), whether its
    critic prefers the mean action to its opposite and has its best action inside the range, and which way one more
    Adam step along the actor's moments moves its output (the sign; Adam normalises the size); on the line of actions
    through the mean action, how much the action weighs in the critics' first layers and, for TACO, how straight the
    latent action g(a) its critic scores is along that line. States: from the replay, else those the policy visits."""

    run_dir: tyro.conf.Positional[str]
    """a run directory with a checkpoint"""
    states: int = 512
    """states to evaluate the actor on"""
    seed: int = 0
    """seed of the draw of replay states (or of the environment the policy acts in)"""


def saturation(run_dir: str, states: int = 512, seed: int = 0) -> dict:
    drqv2 = load_script("drqv2_continuous_action")  # both scripts load checkpoints with the same machinery
    if not os.path.isfile(f"{run_dir}/checkpoint.pt"):
        raise SystemExit(f"error: no checkpoint.pt in {run_dir}: give a run directory of either script")
    checkpoint = drqv2.load_checkpoint(f"{run_dir}/checkpoint.pt")
    module = load_script("taco_continuous_action") if "multistep" in checkpoint["args"] else drqv2
    args = module.Args(**checkpoint["args"])
    env = module.DMCPixelEnv(args.env_id, seed, args.action_repeat, args.frame_stack, args.max_episode_frames)
    agent = module.Agent(env.observation_shape, env.action_dim, args, torch.device("cpu"))
    module.load_agent_state(agent, checkpoint["agent"])
    if checkpoint["replay"] is not None:
        replay = module.ReplayBuffer(
            args.buffer_size, env.frame_shape, env.action_dim, args.frame_stack, args.nstep, args.gamma
        )
        replay.load_state_dict(checkpoint["replay"])
        replay.rng = np.random.default_rng(seed)  # the states drawn, not the run's next batch
        observations = replay.sample(states)["obs"]  # with replacement: from fewer stored, some come twice
    else:
        visited = [env.reset()]
        while len(visited) < states:
            obs, _, _, done = env.step(agent.act(visited[-1], step=0, eval_mode=True))
            visited.append(env.reset() if done else obs)
        observations = torch.as_tensor(np.stack(visited))
    with torch.no_grad():
        features = agent.encoder(observations)
        pre_tanh = agent.actor.policy(agent.actor.trunk(features))
        action = torch.tanh(pre_tanh)
        scored = getattr(agent, "action_encoder", lambda a: a)  # TACO's critic scores the latent action g(a)

        def q(latent):  # the smaller of the two critics' values, as the actor's loss takes it
            return torch.min(*agent.critic(features, latent))

        q_gap = q(scored(action)) - q(scored(-action))
        edge = (action / action.abs().amax(-1, keepdim=True)).nan_to_num(1.0)  # the mean action stretched to the edge
        line = torch.linspace(-1, 1, 21)
        latent = torch.stack([scored(t * edge) for t in line])
        best = torch.stack([q(point) for point in latent]).argmax(0)  # of 21 actions from -edge to +edge
        straightness = None
        if hasattr(agent, "action_encoder"):  # TACO: how straight g is along that line (R² of a fit linear in t; 1:
            centred = latent - latent.mean(0)  # g neither bends nor folds the actions there; nan where g is constant)
            off_line = centred - line[:, None, None] * (line[:, None, None] * centred).sum(0) / line.pow(2).sum()
            straightness = (1 - off_line.pow(2).sum((0, 2)) / centred.pow(2).sum((0, 2))).mean().item()
        # the action's weight in each critic's first layer: how far its output moves per unit of action along the line
        trunk = agent.critic.trunk(features)
        ends = [torch.cat([trunk, scored(end)], -1) for end in [edge, -edge]]
        first_layers = [agent.critic.q1[0], agent.critic.q2[0]]
        action_weight = [
            (layer(ends[0]) - layer(ends[1])).norm(dim=-1) / (2 * edge.norm(dim=-1)) for layer in first_layers
        ]
        group = agent.actor_opt.param_groups[0]  # one Adam step along the moments it holds: m̂ / (√v̂ + eps)
        beta1, beta2 = group["betas"]
        trained = [weight for weight in group["params"] if agent.actor_opt.state.get(weight)]  # none before updates
        for weight in trained:
            moments = agent.actor_opt.state[weight]
            first = moments["exp_avg"] / (1 - beta1 ** moments["step"])
            second = moments["exp_avg_sq"] / (1 - beta2 ** moments["step"])
            weight -= group["lr"] * first / (second.sqrt() + group["eps"])
        moved = agent.actor.policy(agent.actor.trunk(features)) - pre_tanh
    return {
        "frame": checkpoint["global_step"] * args.action_repeat,
        "step_moves": moved.mean().item(),
        "pre_tanh_mean": pre_tanh.mean().item(),
        "pre_tanh_std": pre_tanh.std().item(),
        "mean_action": action.mean().item(),
        "saturated_share": (action.abs() > 0.99).float().mean().item(),
        "q_gap_mean": q_gap.mean().item(),
        "critic_prefers_share": (q_gap > 0).float().mean().item(),
        "inside_best_share": ((best > 0) & (best < 20)).float().mean().item(),
        "latent_straightness": straightness,
        "action_weight": [weight.mean().item() for weight in action_weight],
        "states": "states the policy visits"
        if checkpoint["replay"] is None
        else f"replay states, {replay.num_transitions} stored",
        "updated": bool(trained),
    }


if __name__ == "__main__":
    args = tyro.cli(Args)
    result = saturation(args.run_dir, args.states, args.seed)
    straightness = result["latent_straightness"]  # TACO's only
    latent = ""
    if straightness is not None:
        latent = f", through the latent action g(a), whose fit linear in the action along that line has R² {straightness:.4f}"
    print(
        f"{args.run_dir} at frame {result['frame']}: pre-tanh {result['pre_tanh_mean']:.2f} ± "
        f"{result['pre_tanh_std']:.2f}, mean action {result['mean_action']:.3f}, "
        f"{100 * result['saturated_share']:.0f}% of actions beyond ±0.99 ({args.states} {result['states']}); the "
        f"critic prefers the mean action to its opposite on {100 * result['critic_prefers_share']:.0f}% of them "
        f"(Q gap {result['q_gap_mean']:+.2f} on average), and its best action on the line through the mean action, edge "
        f"to edge, lies inside on {100 * result['inside_best_share']:.0f}%; one more Adam step moves the pre-tanh by "
        f"{result['step_moves']:+.1e} on average. The critics' first layers weigh a unit of action along that line "
        f"{result['action_weight'][0]:.2f} and {result['action_weight'][1]:.2f}"
        + latent
        + ("" if result["updated"] else " (no update yet: the networks are as initialised)")
    )
