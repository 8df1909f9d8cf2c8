"""CUDA only: the whole-update CUDA graph and the GPU replay compute what the eager CPU-style code computes.
Run on a GPU machine (benchmarks/gpu_check.sh runs them with the speed benchmarks); CPU-only CI skips them and
covers the same code paths on the CPU (test_replay.py, test_speed.py)."""

import numpy as np
import pytest
import torch

from conftest import TINY_RUN, run_script, tiny_batch
from test_replay import make_episode, make_replay, store

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


def agents(script, **flags):
    """An eager agent and one with `flags`, on the GPU, with the same initial weights; convolutions in full fp32."""
    args = script.resolve_args(script.Args(env_id="cheetah_run", hidden_dim=64, batch_size=32, tf32=False))
    script.configure_torch(args)
    torch.manual_seed(0)
    eager = script.Agent((9, 84, 84), 6, args, CUDA)
    torch.manual_seed(0)
    other = script.Agent((9, 84, 84), 6, script.dataclasses.replace(args, **flags), CUDA)
    return eager, other


def assert_same_networks(a, b, rtol, where):
    """Each network's weights, as one vector, within rtol of the other agent's (relative to its norm)."""
    for name, network in vars(a).items():
        if isinstance(network, torch.nn.Module):
            x = torch.cat([p.detach().flatten() for p in network.parameters()])
            y = torch.cat([p.detach().flatten() for p in getattr(b, name).parameters()])
            assert (x - y).norm() <= rtol * x.norm(), f"{where}: {name}"


def test_cuda_graph_update_equals_the_eager_update(script):
    eager, graphed = agents(script, cudagraphs=True)
    for k in range(4):  # capture at the first call, replays after; each from the same generator state
        batch = {key: value.to(CUDA) for key, value in tiny_batch(script, 32, 6).items()}
        batch["reward"] += k
        torch.manual_seed(10 + k)
        expected = eager.update(batch, step=3000 + 200 * k)
        torch.manual_seed(10 + k)
        ours = graphed.update(batch, step=3000 + 200 * k)
        for tag in expected:
            torch.testing.assert_close(ours[tag].cpu(), expected[tag].cpu(), rtol=1e-4, atol=1e-5, msg=tag)
        assert_same_networks(eager, graphed, 1e-4, f"update {k}")


def test_bf16_update_on_cuda_matches_fp32(script):
    from test_speed import with_sgd

    fp32, bf16 = agents(script, amp="bf16")
    with_sgd(fp32, 0.01), with_sgd(bf16, 0.01)
    batch = {key: value.to(CUDA) for key, value in tiny_batch(script, 32, 6).items()}
    torch.manual_seed(1)
    expected = fp32.update(batch, step=3000)
    torch.manual_seed(1)
    ours = bf16.update(batch, step=3000)
    for tag in expected:
        if tag != "charts/taco_accuracy":
            torch.testing.assert_close(ours[tag].float(), expected[tag].float(), rtol=0.15, atol=1e-3, msg=tag)
    assert_same_networks(fp32, bf16, 1e-2, "bf16")


def test_tf32_convolutions_stay_close_to_fp32(script):
    """The default --tf32 (PyTorch's own default for convolutions) against full fp32, on the same weights and batch.
    Learning rate 0: every loss of the update is computed on the same weights in both runs (Adam's first step, about
    lr x sign(gradient), turns rounding in tiny gradients into +-lr; a first GPU run failed on that, not on TF32)."""
    fp32, tf32 = agents(script)
    for agent in (fp32, tf32):
        for optimizer in [part for part in vars(agent).values() if isinstance(part, torch.optim.Optimizer)]:
            optimizer.param_groups[0]["lr"] = 0.0
    tf32.args = script.dataclasses.replace(tf32.args, tf32=True)
    batch = {key: value.to(CUDA) for key, value in tiny_batch(script, 32, 6).items()}
    torch.manual_seed(1)
    expected = fp32.update(batch, step=3000)
    script.configure_torch(tf32.args)
    torch.manual_seed(1)
    ours = tf32.update(batch, step=3000)
    script.configure_torch(fp32.args)
    for tag in expected:
        if tag != "charts/taco_accuracy":
            torch.testing.assert_close(ours[tag].cpu(), expected[tag].cpu(), rtol=1e-2, atol=1e-4, msg=tag)


def test_cuda_replay_draws_the_same_batches_as_the_cpu_replay(script):
    rng = np.random.default_rng(0)
    episodes = [make_episode(rng, i, length) for i, length in enumerate([12, 7, 30, 9, 40, 11])]
    on_cpu, on_gpu = make_replay(script, capacity=60, seed=5), make_replay(script, capacity=60, seed=5, device="cuda")
    for episode in episodes:  # the ring wraps and evicts
        store(on_cpu, episode)
        store(on_gpu, episode)
        a, b = on_cpu.sample(256), on_gpu.sample(256)
        assert a.keys() == b.keys()
        for key in a:
            assert b[key].device.type == "cuda" and torch.equal(a[key], b[key].cpu()), key
    state = on_gpu.state_dict()
    assert state["frames"].device.type == "cpu", "checkpoints hold the replay in host memory"
    restored = make_replay(script, capacity=60, seed=0, device="cuda")
    restored.load_state_dict(state)
    a, b = on_cpu.sample(64), restored.sample(64)
    for key in a:
        assert torch.equal(a[key], b[key].cpu()), key


@pytest.mark.parametrize("flags", [["--cudagraphs"], ["--cudagraphs", "--amp", "bf16", "--replay-device", "cpu"]])
def test_cuda_speed_flags_run_end_to_end(script, flags, tmp_path):
    result = run_script(script.__name__, [*TINY_RUN, *flags], cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    where = "cpu" if "--replay-device" in flags else "cuda"  # --replay-device auto puts this small replay on the GPU
    assert f"GB in {where} memory" in result.stdout
