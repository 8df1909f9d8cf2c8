"""Seconds per update of the published DrQ-v2 and TACO agents and of this project's (default fp32, and --amp bf16), timed
side by side in one process on one machine, from copies of the published repositories that you point to (nothing of
them is kept here):
  git clone https://github.com/facebookresearch/drqv2 /tmp/drqv2
  git clone https://github.com/FrankZheng2022/TACO /tmp/taco
  python benchmarks/published_speed.py --drqv2-repo /tmp/drqv2 --taco-repo /tmp/taco

Every update gets the same random batch of cartpole_balance's shapes (9x84x84 uint8 observations, 1-d actions) at
the published batch sizes (DrQ-v2 256, TACO 1024) and the published settings; the published agents' `update` draws
it from an iterator, as from their replay loader. The updates of an agent are timed in turn, round after
round, so that they see the same machine. Prints a Markdown table of medians and the ratios, and appends it, with
the commit, the command and the machine (its CPU model, and whether it has AMX and avx512_bf16), to
benchmarks/RESULTS.md."""

import dataclasses
import importlib
import importlib.util
import os
import shlex
import sys
import time
import types
from dataclasses import dataclass
from typing import Literal

import torch
import tyro
from speed import commit, load_script, machine, random_batch, report, timed_in_turn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Args:
    drqv2_repo: str
    """a clone of facebookresearch/drqv2"""
    taco_repo: str
    """a clone of FrankZheng2022/TACO"""
    repeats: int = 5
    """timed updates per agent and precision, after one warm-up"""
    amp: list[Literal["none", "bf16"]] = dataclasses.field(default_factory=lambda: ["none", "bf16"])
    """our --amp settings timed beside the published fp32 (bf16 is 9-10x slower on a CPU without avx512_bf16 or AMX)"""
    results: str = os.path.join(ROOT, "benchmarks", "RESULTS.md")
    """Markdown file the results are appended to; empty to only print them"""


def import_from(repo: str, module_name: str):
    """`module_name` of a published repository, with its own `utils`. Their imports of hydra and omegaconf are only
    for configuration: empty stand-ins take their place if they are not installed."""
    for missing in ["hydra", "omegaconf"]:
        if missing not in sys.modules and importlib.util.find_spec(missing) is None:
            stand_in = types.ModuleType(missing)
            stand_in.OmegaConf = None
            sys.modules[missing] = stand_in
    sys.modules.pop("utils", None)  # each repository has its own
    sys.path.insert(0, repo)
    try:
        return importlib.import_module(module_name)
    finally:
        sys.path.remove(repo)


def published_drqv2(repo: str, device):
    agent = import_from(repo, "drqv2").DrQV2Agent(
        obs_shape=(9, 84, 84),
        action_shape=(1,),
        device=device,
        lr=1e-4,
        feature_dim=50,
        hidden_dim=1024,
        critic_target_tau=0.01,
        num_expl_steps=2000,
        update_every_steps=2,
        stddev_schedule="linear(1.0,0.1,100000)",
        stddev_clip=0.3,
        use_tb=True,  # the published config's default
    )
    return agent


def published_taco(repo: str, device):
    agent = import_from(repo, "agents.taco").TACOAgent(
        obs_shape=(9, 84, 84),
        action_shape=(1,),
        device=device,
        lr=1e-4,
        encoder_lr=1e-4,
        feature_dim=50,
        hidden_dim=1024,
        critic_target_tau=0.01,
        num_expl_steps=2000,
        update_every_steps=2,
        stddev_schedule="linear(1.0,0.1,100000)",
        stddev_clip=0.3,
        use_tb=False,  # the published config's default
        reward=True,
        multistep=3,
        latent_a_dim="none",
        curl=True,
    )
    return agent


def published_update(agent, batch: dict, step: int) -> dict:
    """One update of a published agent on our batch, handed over as its replay loader yields one."""
    keys = ["obs", "action", "action_seq", "reward", "discount", "next_obs", "future_obs"]  # future_obs: TACO's
    return agent.update(iter([tuple(batch[key] for key in keys if key in batch)]), step=step)


def published_timed(agent, name: str, batch_size: int, device):
    batch = random_batch(load_script(name), batch_size, 1, device)
    return lambda: published_update(agent, batch, 100_000)


def ours(name: str, batch_size: int, device, amp: str = "none"):
    module = load_script(name)
    args = module.resolve_args(tyro.cli(module.Args, args=["--env-id", "cartpole_balance", "--amp", amp]))
    # as a run does; its settings of the C library's allocator and of cuDNN are the process's: the published updates,
    # all timed after this, get them too, so the ratio compares the two codes (the allocator's own gain: docs/speed.md)
    module.configure_torch(args)
    agent = module.Agent((9, 84, 84), 1, args, device)
    batch = random_batch(module, batch_size, 1, device)
    return lambda: agent.update(batch, 100_000)


def main(args: Args):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    measured = commit()
    agents = [
        ("DrQ-v2", 256, published_drqv2(args.drqv2_repo, device), "drqv2_continuous_action"),
        ("TACO", 1024, published_taco(args.taco_repo, device), "taco_continuous_action"),
    ]
    agents = [
        (name, size, published_timed(agent, script, size, device), script) for name, size, agent, script in agents
    ]
    ours_named = {"none": "ours fp32", "bf16": "ours bf16"}
    rows = [
        "| agent | batch | s / update: published (fp32) | "
        + " | ".join(ours_named[amp] for amp in args.amp)
        + " | "
        + " | ".join(f"published / {ours_named[amp]}" for amp in args.amp)
        + " |",
        "| --- | --- | --- |" + " --- | --- |" * len(args.amp),
    ]
    for name, batch_size, published, script in agents:
        mine = [ours(script, batch_size, device, amp) for amp in args.amp]
        published_seconds, *seconds = timed_in_turn([published, *mine], args.repeats, device)
        rows.append(
            f"| {name} | {batch_size} | {published_seconds:.3f} | "
            + " | ".join(f"{value:.3f}" for value in seconds)
            + " | "
            + " | ".join(f"{published_seconds / value:.2f}x" for value in seconds)
            + " |"
        )
        print(rows[-1], flush=True)
    header = f"## {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {measured}, {device.type}: published "
    header += "updates side by side\n\n"
    header += f"- command: `python {shlex.join(sys.argv)}`\n- machine: {machine(device)}\n"
    header += f"- updates: median of {args.repeats} rounds after a warm-up round, each round timing the published "
    header += f"update and ours (--amp {' / '.join(args.amp)}) in turn; one random batch of cartpole_balance's shapes, "
    header += "the published settings; the published agents' own code, from the clones named in the command; both with "
    header += "freed memory kept for reuse, as the scripts set glibc's allocator, and on a GPU cuDNN as they set it "
    header += "(deterministic algorithms, tf32 convolutions: the process's settings)\n\n"
    table = "\n".join(rows) + "\n"
    report(header + table, args.results)


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
