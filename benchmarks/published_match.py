"""Does our update compute what the published one computes? The published DrQ-v2 and TACO agents, from clones you
point to (nothing of them is kept here), and ours, built with the published settings of cartpole_balance and given
the same weights, the same batches, the same augmentation shifts and the same policy noise, make a few updates each:
  git clone https://github.com/facebookresearch/drqv2 /tmp/drqv2
  git clone https://github.com/FrankZheng2022/TACO /tmp/taco
  python benchmarks/published_match.py --drqv2-repo /tmp/drqv2 --taco-repo /tmp/taco

For each update it prints the relative difference of each loss, the largest of the gradients each optimizer steps
with, and the largest of the weights after the update, and appends the table, with the commit, the command and the
machine, to benchmarks/RESULTS.md. The published agent's optimizers step with our gradients (after they are
compared), so that both sides stay at the same weights: in fp32, a gradient at rounding level would otherwise move
its weight by up to 2 learning rates through Adam, and the two runs would part; so the weights' column checks only
the optimizers and the target update, and the gradients' column is where a difference in a loss shows. Two more
pairs of agents, a row per update each, say what the figures mean: the published agent against itself with its
weights changed in the 7th digit (what fp32 rounding alone gives), and a control, ours given the shifts in the
published order of draws (ours draws the TACO step's future before CURL's positive, the published code after; each
side is otherwise handed them in the order it asks), to show that the comparison sees a difference where there is
one."""

import contextlib
import copy
import operator
import os
import shlex
import sys
import time
from dataclasses import dataclass

import torch
import tyro
from published_speed import published_drqv2, published_taco, published_update
from speed import commit, load_script, machine, random_batch, report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# our agent's networks: the published agent's, part by part (parameters in the same order and shapes)
PARTS = {
    "encoder": "encoder",
    "actor": "actor",
    "critic": "critic",
    "critic_target": "critic_target",
    "action_encoder.embed": "act_tok.action_tokenizer",
    "action_encoder.sequence": "act_tok.action_seq_tokenizer",
    "taco_head.project": "TACO.proj_s",
    "taco_head.predictor": "TACO.proj_sa",
    "taco_head.reward": "TACO.reward",
    "taco_head.W": "TACO.W",
}
LOSSES = ["critic_loss", "actor_loss", "taco_loss", "curl_loss", "reward_loss"]
OPTIMIZERS = ["encoder_opt", "critic_opt", "actor_opt", "taco_opt"]
# the published TACO step draws the shifts of its anchor, CURL's positive, then the future; ours anchor, future, CURL's
OUR_ORDER = {"DrQ-v2": [0, 1], "TACO": [0, 1, 2, 4, 3]}
SCRIPTS = {"DrQ-v2": "drqv2_continuous_action", "TACO": "taco_continuous_action"}


@dataclass
class Args:
    drqv2_repo: str
    """a clone of facebookresearch/drqv2"""
    taco_repo: str
    """a clone of FrankZheng2022/TACO"""
    updates: int = 3
    """updates compared per agent, each on a new batch"""
    batch_size: int = 256
    """the batch of both agents (the published TACO uses 1024; the computation is the same)"""
    step: int = 5000
    """the agent step of the updates; it sets the exploration std (0.96 at 5000: the noise clip of 0.3 acts)"""
    results: str = os.path.join(ROOT, "benchmarks", "RESULTS.md")
    """Markdown file the results are appended to; empty to only print them"""


def named_parts(agent, published: bool) -> dict[str, torch.Tensor]:
    """Every parameter of the parts in PARTS that the agent has, named by our part and its place in it."""
    named = {}
    for our_part, their_part in PARTS.items():
        with contextlib.suppress(AttributeError):  # DrQ-v2 has no TACO parts
            part = operator.attrgetter(their_part if published else our_part)(agent)
            tensors = list(part.parameters()) if isinstance(part, torch.nn.Module) else [part]
            named |= {f"{our_part}[{index}]": tensor for index, tensor in enumerate(tensors)}
    return named


def shifted(images: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Each image moved by its whole-pixel shift (rows, columns) in [-4, 4], the border replicated; any dtype."""
    size = images.shape[-1]
    rows = (torch.arange(size) + shifts[:, :1]).clamp(0, size - 1)
    cols = (torch.arange(size) + shifts[:, 1:]).clamp(0, size - 1)
    return torch.stack([image[:, r][:, :, c] for image, r, c in zip(images, rows, cols)])


def record_gradients(agent, names: dict, replace: dict | None = None) -> dict:
    """{optimizer: {parameter name: its gradient}}, filled as the agent's optimizers step. With `replace` (another
    agent's such record), each optimizer then steps with the gradients recorded there instead, so that the weights
    stay the same on both sides and each gradient is compared at the same weights (a gradient at rounding level
    would otherwise move its weight by up to 2 learning rates, in either direction, through Adam)."""
    stepped = {}
    for attribute in [name for name in OPTIMIZERS if hasattr(agent, name)]:
        optimizer = getattr(agent, attribute)
        step = optimizer.step

        def recording_step(*args, attribute=attribute, optimizer=optimizer, step=step, **kwargs):
            params = [p for group in optimizer.param_groups for p in group["params"] if id(p) in names]
            stepped[attribute] = {names[id(p)]: None if p.grad is None else p.grad.clone() for p in params}
            for p in params if replace is not None else []:  # a copy: a later backward may add to a gradient
                given = replace.get(attribute, {}).get(names[id(p)])
                p.grad = None if given is None else given.clone()
            return step(*args, **kwargs)

        optimizer.step = recording_step
    return stepped


def relative(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    """|a - b| / max(|a|, |b|), Euclidean norms over a tensor's elements; None (no gradient, no such loss) is 0, so
    that a tensor one side has and the other lacks differs by 1."""
    if a is None and b is None:
        return 0.0
    a = torch.zeros_like(b, dtype=torch.float64) if a is None else a.double()
    b = torch.zeros_like(a) if b is None else b.double()
    return ((a - b).norm() / torch.maximum(a.norm(), b.norm()).clamp_min(1e-30)).item()


def update(agent, published: bool, batch: dict, step: int, shifts: list) -> dict:
    """One update of either agent, its augmentation taking `shifts` in turn; returns {loss name: value}."""
    shifts = iter(shifts)
    if published:
        agent.aug = lambda images: shifted(images, next(shifts))
        agent.use_tb = True  # its losses as metrics
        return {name: torch.tensor(value) for name, value in published_update(agent, batch, step).items()}
    script = sys.modules[type(agent).__module__]
    drawn = script.random_shift
    script.random_shift = lambda images, pad=4: shifted(images, next(shifts))
    try:
        return {tag.removeprefix("losses/"): value.float() for tag, value in agent.update(batch, step).items()}
    finally:
        script.random_shift = drawn


def compare(label: str, first, second, args: Args, draw_order: tuple[list, list], perturb: float = 0.0) -> list[str]:
    """`first` and `second`, each (an agent, whether it is a published one), from the second's weights copied into
    the first (each then times 1 + `perturb` x standard normal noise): `args.updates` updates of both on the same
    batches, shifts and policy noise, each taking the shifts in its `draw_order`. Returns a Markdown row per update."""
    named = [named_parts(agent, published) for agent, published in (first, second)]
    if [tuple(t.shape) for t in named[0].values()] != [tuple(t.shape) for t in named[1].values()]:
        raise SystemExit("published_match.py: the agents' networks differ in shape")
    with torch.no_grad():
        for mine, theirs in zip(named[0].values(), named[1].values()):
            mine.copy_(theirs * (1 + perturb * torch.randn_like(theirs)))
    first_grads = record_gradients(first[0], {id(t): name for name, t in named[0].items()})
    second_grads = record_gradients(second[0], {id(t): name for name, t in named[1].items()}, replace=first_grads)
    rows = []
    for index in range(args.updates):
        batch = random_batch(load_script(SCRIPTS[label.split(":")[0]]), args.batch_size, 1)
        batch = {key: value.roll(index, dims=0) for key, value in batch.items()}  # a new batch each update
        generator = torch.Generator().manual_seed(index)
        shifts = [torch.randint(-4, 5, (args.batch_size, 2), generator=generator) for _ in draw_order[0]]
        losses = []
        for (agent, published), order in zip((first, second), draw_order):
            torch.manual_seed(1000 + index)  # the policy noise: both draw it in the same order and shapes
            losses.append(update(agent, published, batch, args.step, [shifts[i] for i in order]))
        named_losses = [name for name in LOSSES if name in losses[0] or name in losses[1]]
        differences = {name: relative(losses[0].get(name), losses[1].get(name)) for name in named_losses}
        stepped = {(opt, name) for grads in (first_grads, second_grads) for opt in grads for name in grads[opt]}
        gradients = [
            relative(first_grads.get(o, {}).get(n), second_grads.get(o, {}).get(n)) for o, n in sorted(stepped)
        ]
        weights = max(relative(mine, theirs) for mine, theirs in zip(named[0].values(), named[1].values()))
        rows.append(
            f"| {label} | {index + 1} | "
            + ", ".join(f"{name} {value:.1e}" for name, value in differences.items())
            + f" | {max(gradients):.1e} ({len(gradients)} tensors) | {weights:.1e} |"
        )
        print(rows[-1], flush=True)
    return rows


def ours(name: str, published):
    """Our agent of cartpole_balance's settings, checked to be the published agent's."""
    script = load_script(SCRIPTS[name])
    args = script.resolve_args(tyro.cli(script.Args, args=["--env-id", "cartpole_balance"]))
    settings = [args.tau, args.stddev_schedule, args.stddev_clip, args.learning_rate]
    published_settings = [published.critic_target_tau, published.stddev_schedule, published.stddev_clip]
    if settings != [*published_settings, published.actor_opt.param_groups[0]["lr"]]:
        raise SystemExit(f"published_match.py: our settings {settings} are not the published agent's")
    return script.Agent((9, 84, 84), 1, args, torch.device("cpu"))


def columns(row: str) -> tuple[dict, float, float]:
    """A row's ({loss: relative difference}, largest gradient difference, largest weight difference)."""
    _, _, _, losses, gradients, weights, _ = row.split("|")
    named = dict(item.split() for item in losses.split(","))
    return {name: float(value) for name, value in named.items()}, float(gradients.split()[0]), float(weights)


def largest(rows: list[str]) -> str:
    """The largest loss and gradient differences over the rows of one pair of agents."""
    losses = max(max(columns(row)[0].values()) for row in rows)
    return f"losses {losses:.1e}, gradients {max(columns(row)[1] for row in rows):.1e}"


def main(args: Args):
    torch.manual_seed(0)
    groups = {}  # a pair of agents: its rows
    repos = {"DrQ-v2": args.drqv2_repo, "TACO": args.taco_repo}
    for name, make in [("DrQ-v2", published_drqv2), ("TACO", published_taco)]:
        published = make(repos[name], torch.device("cpu"))
        published_order = list(range(len(OUR_ORDER[name])))
        both = ((ours(name, published), False), (published, True))
        label = f"{name}: ours against the published"
        groups[label] = compare(label, *both, args, (OUR_ORDER[name], published_order))
        published = make(repos[name], torch.device("cpu"))
        both = ((copy.deepcopy(published), True), (published, True))
        label = f"{name}: the published against itself, its weights x (1 + 1e-7 noise)"
        groups[label] = compare(label, *both, args, (published_order, published_order), perturb=1e-7)
    published = published_taco(args.taco_repo, torch.device("cpu"))
    both = ((ours("TACO", published), False), (published, True))
    label = "TACO: control, ours given the shifts in the published order"
    groups[label] = compare(label, *both, args, (published_order, published_order))
    rows = [
        "| agents | update | losses: relative difference | gradients at the optimizer steps: the largest | weights "
        + "after: the largest |",
        "| --- | --- | --- | --- | --- |",
        *(row for group in groups.values() for row in group),
    ]
    text = f"## {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {commit()}: our updates against the "
    text += f"published code\n\n- command: `python {shlex.join(sys.argv)}`\n- machine: {machine(torch.device('cpu'))}\n"
    text += f"- {args.updates} updates per pair of agents from the same weights (the published agent's initial ones); "
    text += f"batch {args.batch_size} of random data of cartpole_balance's shapes, at agent step {args.step}; the same "
    text += "shifts and policy noise on both sides; relative difference: |a - b| / max(|a|, |b|), Euclidean norms over "
    text += "a tensor (a gradient or loss one side lacks: 1); the second agent's optimizers step with the first's "
    text += "gradients, so the weights stay the same and their column checks only the optimizers and the target "
    text += "update; the published agents' own code, from the clones named in the command\n\n" + "\n".join(rows)
    text += "\n\nThe largest over the updates:\n\n" + "\n".join(f"- {k}: {largest(v)}" for k, v in groups.items())
    report(text, args.results)


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
