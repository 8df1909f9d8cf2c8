"""Replay (docs/drqv2.md, details 3-4): samples against a brute-force reference built from the raw episodes."""

import numpy as np
import pytest
import torch

FRAME_SHAPE = (3, 6, 6)
GAMMA = 0.9


def make_episode(rng, episode_id, length, action_dim=2):
    """Raw episode whose frames and actions carry (episode_id, t) so a sample can be traced to its source."""
    frames = rng.integers(0, 256, size=(length + 1, *FRAME_SHAPE), dtype=np.uint8)
    frames[:, 0, 0, 0] = episode_id
    frames[:, 0, 0, 1] = np.arange(length + 1)
    actions = rng.uniform(-1, 1, size=(length, action_dim)).astype(np.float32)
    rewards = rng.uniform(0, 1, size=length).astype(np.float32)
    discounts = rng.choice([1.0, 0.5], size=length).astype(np.float32)
    return {"frames": frames, "actions": actions, "rewards": rewards, "discounts": discounts}


def store(replay, episode, finish=True):
    replay.start_episode(episode["frames"][0])
    for t in range(len(episode["actions"])):
        replay.add(episode["actions"][t], episode["rewards"][t], episode["discounts"][t], episode["frames"][t + 1])
    if finish:
        replay.end_episode()


def stacked(frames, t, frame_stack):
    """Reference stack at t: frames t-frame_stack+1 .. t, indices before the episode start repeat frame 0."""
    return np.concatenate([frames[max(t - k, 0)] for k in reversed(range(frame_stack))], axis=0)


def reference_sample(episode, t, nstep, frame_stack):
    reward, discount = 0.0, 1.0
    for i in range(nstep):
        reward += discount * episode["rewards"][t + i]
        discount *= GAMMA * episode["discounts"][t + i]
    return {
        "obs": stacked(episode["frames"], t, frame_stack),
        "action": episode["actions"][t],
        "reward": np.float32(reward),
        "discount": np.float32(discount),
        "next_obs": stacked(episode["frames"], t + nstep, frame_stack),
    }


def source_of(sample, i):
    """(episode id, t) of sample i, read from the newest frame of its observation."""
    return int(sample["obs"][i, -3, 0, 0]), int(sample["obs"][i, -3, 0, 1])


def make_replay(script, capacity=10_000, nstep=3, frame_stack=3, seed=0, device="cpu"):
    kwargs = {"frame_stack": frame_stack, "nstep": nstep, "gamma": GAMMA, "seed": seed, "device": device}
    return script.ReplayBuffer(capacity, FRAME_SHAPE, 2, **kwargs)


@pytest.mark.parametrize("nstep,frame_stack", [(3, 3), (1, 3), (5, 2)])
def test_samples_match_brute_force_reference(script, nstep, frame_stack):
    rng = np.random.default_rng(0)
    episodes = [make_episode(rng, i, length) for i, length in enumerate([12, 7, 30, 2, 9])]
    replay = make_replay(script, nstep=nstep, frame_stack=frame_stack)
    for episode in episodes:
        store(replay, episode)
    sample = replay.sample(4000)
    seen = set()
    for i in range(len(sample["action"])):
        episode_id, t = source_of(sample, i)
        episode = episodes[episode_id]
        assert 0 <= t <= len(episode["actions"]) - nstep, "sampled a transition whose n-step target leaves the episode"
        expected = reference_sample(episode, t, nstep, frame_stack)
        np.testing.assert_array_equal(sample["obs"][i], expected["obs"])
        np.testing.assert_array_equal(sample["next_obs"][i], expected["next_obs"])
        np.testing.assert_array_equal(sample["action"][i], expected["action"])
        np.testing.assert_allclose(sample["reward"][i, 0], expected["reward"], rtol=1e-6)
        np.testing.assert_allclose(sample["discount"][i, 0], expected["discount"], rtol=1e-6)
        seen.add((episode_id, t))
    valid = {(e, t) for e, ep in enumerate(episodes) for t in range(len(ep["actions"]) - nstep + 1)}
    assert seen == valid, "every valid transition is drawn, and only those"
    assert sample["obs"].shape == (4000, 3 * frame_stack, *FRAME_SHAPE[1:]) and sample["obs"].dtype == torch.uint8
    assert sample["reward"].shape == sample["discount"].shape == (4000, 1)


def test_frame_stack_at_episode_start_repeats_first_frame(script):
    rng = np.random.default_rng(1)
    episode = make_episode(rng, 0, 5)
    replay = make_replay(script, nstep=1)
    store(replay, episode)
    sample = replay.sample(500)
    starts = [i for i in range(500) if source_of(sample, i)[1] == 0]
    assert starts, "t = 0 was never drawn"
    first = episode["frames"][0]
    for i in starts:
        for k in range(3):
            np.testing.assert_array_equal(sample["obs"][i, 3 * k : 3 * k + 3], first)


def test_sampling_is_uniform_over_valid_transitions(script):
    rng = np.random.default_rng(2)
    episodes = [make_episode(rng, i, length) for i, length in enumerate([40, 10, 25])]
    replay = make_replay(script, nstep=3)
    for episode in episodes:
        store(replay, episode)
    sample = replay.sample(30_000)
    counts = {}
    for i in range(len(sample["action"])):
        counts[source_of(sample, i)] = counts.get(source_of(sample, i), 0) + 1
    assert len(counts) == (40 - 2) + (10 - 2) + (25 - 2)
    expected = 30_000 / len(counts)  # 434 per transition; a binomial's std is about 21
    assert all(abs(c - expected) < 6 * np.sqrt(expected) for c in counts.values()), counts


def test_unfinished_and_too_short_episodes_are_not_sampled(script):
    rng = np.random.default_rng(3)
    replay = make_replay(script, nstep=3)
    store(replay, make_episode(rng, 0, 2))  # shorter than n: contributes nothing
    with pytest.raises(ValueError):
        replay.sample(4)
    store(replay, make_episode(rng, 1, 8))
    store(replay, make_episode(rng, 2, 8), finish=False)  # still running: not sampled yet
    sample = replay.sample(1000)
    assert {source_of(sample, i)[0] for i in range(1000)} == {1}


def test_eviction_keeps_the_newest_whole_episodes(script):
    rng = np.random.default_rng(4)
    episodes = [make_episode(rng, i, 10) for i in range(12)]
    replay = make_replay(script, capacity=35, nstep=1)
    for episode in episodes:
        store(replay, episode)
    assert replay.num_transitions <= 35
    sample = replay.sample(3000)
    held = {source_of(sample, i)[0] for i in range(3000)}
    assert held == {9, 10, 11}, "FIFO by episode: the three newest whole episodes fit in 35 transitions"
    for i in range(3000):  # the ring wrapped several times: samples still match their source exactly
        episode_id, t = source_of(sample, i)
        np.testing.assert_array_equal(sample["obs"][i], stacked(episodes[episode_id]["frames"], t, 3))
        np.testing.assert_array_equal(sample["next_obs"][i], stacked(episodes[episode_id]["frames"], t + 1, 3))


def test_bytes_per_transition_is_one_frame(script):
    replay = script.ReplayBuffer(10_000, (3, 84, 84), 6, frame_stack=3, nstep=3, gamma=0.99)
    frame_bytes = 3 * 84 * 84
    assert replay.frames.shape[1:] == (3, 84, 84), "frames are stored one render at a time, not stacked"
    allocated = sum(array.nbytes for array in (replay.frames, replay.actions, replay.rewards, replay.discounts))
    assert allocated == script.ReplayBuffer.memory(10_000, (3, 84, 84), 6), "what the memory check counts"
    assert frame_bytes <= allocated / 10_000 <= 1.02 * frame_bytes + 64
    assert allocated / 10_000 < 22_000
