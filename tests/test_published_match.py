"""benchmarks/published_match.py compares our updates with the published code's, which is not in this repository: its
comparison is checked here on two of our own agents."""

import sys

import torch
import tyro

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import published_match
from speed import load_script


def test_rounding_stays_rounding_and_another_order_of_draws_is_seen():
    script = load_script("drqv2_continuous_action")
    args = script.resolve_args(tyro.cli(script.Args, args=["--env-id", "cartpole_balance"]))
    settings = published_match.Args(drqv2_repo="", taco_repo="", updates=2, batch_size=4, results="")

    def two_agents():
        return [(script.Agent((9, 84, 84), 1, args, torch.device("cpu")), False) for _ in range(2)]

    rows = published_match.compare("DrQ-v2: ours", *two_agents(), settings, ([0, 1], [0, 1]), perturb=1e-7)
    for row in rows:  # the second agent steps with the first's gradients: the weights stay within rounding
        losses, gradients, weights = published_match.columns(row)
        assert set(losses) == {"critic_loss", "actor_loss"} and max(losses.values()) < 1e-4, row
        assert gradients < 0.05 and weights < 1e-6, row
    swapped = published_match.compare("DrQ-v2: swapped", *two_agents(), settings, ([0, 1], [1, 0]))
    assert all(published_match.columns(row)[1] > 0.05 for row in swapped), swapped
    first, second = two_agents()
    second[0].encoder.convnet[0].bias.requires_grad_(False)  # a gradient one side lacks (a detached loss, say)
    lacking = published_match.compare("DrQ-v2: one gradient lacking", first, second, settings, ([0, 1], [0, 1]))
    assert all(published_match.columns(row)[1] == 1.0 for row in lacking), lacking
    assert script.random_shift.__name__ == "random_shift", "the script's augmentation is put back"
