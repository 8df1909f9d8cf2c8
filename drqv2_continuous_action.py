# DrQ-v2 (Yarats et al., 2021, arXiv 2107.09645): data-augmented actor-critic for continuous control from pixels.
# One file: dm_control pixel environment, replay that stores each frame once, encoder, augmentation, losses, loop.
# Docs: docs/drqv2.md (what it computes and why, each implementation detail, the differences from the published code).
import concurrent.futures
import contextlib
import copy
import dataclasses
import glob
import hashlib
import math
import os
import random
import re
import shutil
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Literal

os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering; must be set before dm_control is imported

import numpy as np
import torch
import torch.nn.functional as F
import tyro
from torch import nn


class RunError(ValueError):
    """A problem the user can fix (bad settings, a damaged checkpoint, no renderer): one clear line, non-zero exit."""


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (part of the run name)"""
    seed: int = 1
    """seed of the experiment (python, numpy, torch and the environment)"""
    torch_deterministic: bool = True
    """if toggled, sets `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, uses CUDA when a GPU is available (without one: runs on the CPU and prints a warning)"""
    track: bool = False
    """if toggled, logs to Weights and Biases (works offline with WANDB_MODE=offline)"""
    wandb_project_name: str = "taco"
    """the wandb project name"""
    wandb_entity: str | None = None
    """the entity (team) of the wandb project"""
    capture_video: bool = False
    """if toggled, writes the first episode of each evaluation to `videos/{run_name}/eval_{frame}.mp4`"""
    save_model: bool = False
    """if toggled, saves the weights and the Args to `runs/{run_name}/{exp_name}.cleanrl_model` at the end"""

    # Environment
    env_id: str = "quadruped_run"
    """the DeepMind Control task, `domain_task` (e.g. `cartpole_swingup`, `cup_catch`, `reach_duplo`)"""
    frame_stack: int = 3
    """number of consecutive renders stacked into one observation"""
    action_repeat: int = 2
    """frames (physics steps) per agent step; rewards are summed over them"""
    max_episode_frames: int | None = None
    """cut episodes after this many frames (default: the task's own time limit, 1000 frames on the suite);
    for quick tests and debugging only"""

    # Budget and evaluation, all in frames (one frame = one physics step; an agent step is `action_repeat` frames)
    total_timesteps: int | None = None
    """total environment frames to train for (default: the task preset's budget: 1.1M easy, 3.1M medium, 30.1M hard)"""
    learning_starts: int = 4000
    """frames collected before the first update"""
    eval_every: int = 10000
    """evaluate every this many frames (and once at the end)"""
    num_eval_episodes: int = 10
    """episodes per evaluation, acting with the policy's mean action"""

    # Speed options: off by default until a GPU learning run shows they do no harm ("Speed and memory", README)
    amp: Literal["none", "bf16"] = "none"
    """`bf16`: run the encoder and networks of the update under bfloat16 autocast (losses and the optimizer in fp32)"""
    compile: bool = False
    """if toggled, compiles the networks with torch.compile"""
    cudagraphs: bool = False
    """if toggled (CUDA only), records the whole update once as a CUDA graph and replays it: one launch per update"""
    tf32: bool = True
    """on CUDA, convolutions may round their fp32 inputs to TF32 (10-bit mantissa), PyTorch's default and so what the
    published code ran on such GPUs (2x faster TACO updates on an H200); --no-tf32 runs them in full fp32. Matmuls
    always run in full fp32"""
    replay_device: Literal["auto", "cpu", "cuda"] = "auto"
    """where the replay's frames are stored and gathered into batches: `cuda` on the GPU (no batch crosses from the
    host), `cpu` in host memory (batches sampled on a background thread), `auto` the GPU when the replay's full
    capacity fits in half of its free memory. The batches drawn are the same on either"""

    # Checkpoints (see "Long runs" in the README)
    checkpoint_every: int = 100_000
    """write `runs/{run_name}/checkpoint.pt` every this many frames (at the next episode end), at the end, and on
    SIGTERM, SIGINT or SIGUSR1 (then exit); 0 turns checkpoints off. A checkpoint takes about 21.4 kB per stored
    transition plus 0.15 GB (DrQ-v2) or 0.35 GB (TACO) of networks, optimizers and the next batch: about 11 GB at
    the end of a 1M-frame run (500k transitions), 2.5 GB with quadruped_run's 100k-transition replay"""
    checkpoint_replay: bool = True
    """if toggled, checkpoints hold the replay buffer; with --no-checkpoint-replay they hold only the networks,
    optimizers, counters and RNG states (about 0.1 GB), and a resumed run refills its replay for
    `learning_starts` frames before updating again"""
    resume: str | None = None
    """continue a run from its checkpoint: a run directory, or `auto` for the newest run under runs/ of the same
    env_id, exp_name and seed (a new run when there is none, so a requeued job can always pass it). Settings other
    than budget, evaluation, checkpoint and logging ones must equal the checkpoint's"""

    # Algorithm
    buffer_size: int | None = None
    """replay capacity in transitions (default: 1e6; 1e5 for quadruped_run)"""
    batch_size: int | None = None
    """batch size of every update (default: 256; 512 for walker_*)"""
    nstep: int | None = None
    """n of the n-step return (default: 3; 1 for walker_*)"""
    gamma: float = 0.99
    """the discount factor gamma"""
    learning_rate: float | None = None
    """Adam learning rate of the encoder, actor and critic (default: 1e-4; 8e-5 for humanoid_*)"""
    feature_dim: int | None = None
    """width of the actor's and critic's trunk output (default: 50; 100 for humanoid_*)"""
    hidden_dim: int = 1024
    """width of the hidden layers of the actor and critic MLPs"""
    tau: float = 0.01
    """Polyak averaging rate of the target critic"""
    update_every_steps: int = 2
    """update the agent every this many agent steps"""
    num_expl_steps: int = 2000
    """agent steps of uniformly random actions at the start"""
    stddev_schedule: str | None = None
    """exploration std: a number, or `linear(init,final,duration)` over agent steps
    (default: `linear(1.0,0.1,D)` with D = 100k easy, 500k medium, 2M hard)"""
    stddev_clip: float = 0.3
    """clip of the policy noise when sampling actions for the losses"""


# Per-task settings of the published runs (docs/drqv2.md, detail 2). Preset -> (std duration in agent steps, frames).
PRESETS = {"easy": (100_000, 1_100_000), "medium": (500_000, 3_100_000), "hard": (2_000_000, 30_100_000)}
TASK_PRESET = {
    **dict.fromkeys(
        [
            "cartpole_balance",
            "cartpole_balance_sparse",
            "cartpole_swingup",
            "cup_catch",
            "finger_spin",
            "hopper_stand",
            "pendulum_swingup",
            "walker_stand",
            "walker_walk",
        ],
        "easy",
    ),
    **dict.fromkeys(
        [
            "acrobot_swingup",
            "acrobot_swingup_sparse",
            "cartpole_swingup_sparse",
            "cheetah_run",
            "finger_turn_easy",
            "finger_turn_hard",
            "hopper_hop",
            "quadruped_run",
            "quadruped_walk",
            "reach_duplo",
            "reacher_easy",
            "reacher_hard",
            "walker_run",
        ],
        "medium",
    ),
    **dict.fromkeys(["humanoid_stand", "humanoid_walk", "humanoid_run", "manipulator_bring_ball"], "hard"),
}


def resolve_args(args: Args) -> Args:
    """Fills every setting the user left unset (None) from the task's preset; what the user set wins."""
    if args.env_id not in TASK_PRESET:
        raise RunError(f"unknown env_id {args.env_id!r}; valid tasks: {', '.join(sorted(TASK_PRESET))}")
    duration, budget = PRESETS[TASK_PRESET[args.env_id]]
    preset = {
        "total_timesteps": budget,
        "buffer_size": 1_000_000,
        "batch_size": 256,
        "nstep": 3,
        "learning_rate": 1e-4,
        "feature_dim": 50,
        "stddev_schedule": f"linear(1.0,0.1,{duration})",
    }
    if args.env_id.startswith("walker_"):
        preset.update(nstep=1, batch_size=512)
    if args.env_id == "quadruped_run":
        preset.update(buffer_size=100_000)
    if args.env_id.startswith("humanoid_"):
        preset.update(learning_rate=8e-5, feature_dim=100)
    args = dataclasses.replace(args, **{k: v for k, v in preset.items() if getattr(args, k) is None})
    validate_args(args)
    return args


def validate_args(args: Args) -> None:
    """Fails fast, before any environment is built, on settings that cannot work."""
    positive = ["frame_stack", "action_repeat", "total_timesteps", "eval_every", "num_eval_episodes", "buffer_size"]
    positive += ["batch_size", "nstep", "learning_rate", "feature_dim", "hidden_dim", "update_every_steps"]
    for name in positive:
        if not getattr(args, name) > 0:
            raise RunError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ["learning_starts", "num_expl_steps", "checkpoint_every"]:
        if getattr(args, name) < 0:
            raise RunError(f"--{name.replace('_', '-')} must be non-negative, got {getattr(args, name)}")
    if args.max_episode_frames is not None and args.max_episode_frames < args.action_repeat:
        raise RunError(f"--max-episode-frames must be at least --action-repeat, got {args.max_episode_frames}")
    for name, low, high in [("gamma", 0.0, 1.0), ("tau", 0.0, 1.0)]:
        if not low < getattr(args, name) <= high:
            raise RunError(f"--{name} must be in ({low:g}, {high:g}], got {getattr(args, name)}")
    if not math.isfinite(args.learning_rate):
        raise RunError(f"--learning-rate must be finite, got {args.learning_rate}")
    if not (math.isfinite(args.stddev_clip) and args.stddev_clip >= 0):
        raise RunError(f"--stddev-clip must be finite and >= 0, got {args.stddev_clip}")
    stored_at_start = min(args.buffer_size, args.learning_starts // args.action_repeat)
    if args.batch_size > stored_at_start:
        raise RunError(
            f"--batch-size {args.batch_size} is larger than the {stored_at_start} transitions the replay holds when "
            f"updates start (--learning-starts {args.learning_starts} frames, --buffer-size {args.buffer_size})"
        )
    episode_steps = episode_frames(args) // args.action_repeat
    if args.buffer_size < episode_steps:
        raise RunError(
            f"--buffer-size {args.buffer_size} is smaller than one episode ({episode_steps} transitions): the replay "
            "could never hold a complete episode to sample from"
        )
    if args.nstep >= episode_steps:
        raise RunError(f"--nstep must be shorter than an episode ({episode_steps} agent steps)")
    parse_schedule(args.stddev_schedule)


def episode_frames(args: Args) -> int:
    """Frames in an episode of the run: the task's time limit (1000 frames; 250 for reach_duplo), or shorter."""
    limit = 250 if args.env_id == "reach_duplo" else 1000
    return min(args.max_episode_frames or limit, limit)


def parse_schedule(spec: str):
    """`0.2` -> constant; `linear(init,final,duration)` -> linear interpolation over agent steps, then constant. Stds
    must be finite and non-negative."""
    number = r"\s*([-+0-9.eE]+)\s*"
    match = re.fullmatch(rf"linear\({number},{number},{number}\)", spec)
    try:
        values = [float(g) for g in match.groups()] if match else [float(spec)]
    except ValueError:
        values = None
    if values is None or not all(math.isfinite(v) and v >= 0 for v in values):
        raise RunError(
            f"--stddev-schedule must be a number >= 0 or 'linear(init,final,duration)' of such numbers, got {spec!r}"
        )
    if not match:
        return lambda step: values[0]
    init, final, duration = values
    if duration <= 0:
        raise RunError(f"--stddev-schedule duration must be positive, got {spec!r}")
    return lambda step: init + (final - init) * min(step / duration, 1.0)


# ----------------------------------------------------------------------------------------------------------------------
# Environment (docs/drqv2.md, detail 1): dm_control from pixels, action repeat, stacked renders, channels first.


def renderer_advice(error) -> str:
    backend = os.environ.get("MUJOCO_GL")
    return (
        f"MuJoCo rendering could not start with MUJOCO_GL={backend} ({type(error).__name__}: {error}). "
        "Try MUJOCO_GL=egl (NVIDIA driver, or Mesa on CPU-only machines: apt-get install libegl1 libgl1-mesa-dri) "
        "or MUJOCO_GL=osmesa (apt-get install libosmesa6)"
    )


class DMCPixelEnv:
    """A DeepMind Control task seen through 84x84 renders, with action repeat and frame stacking."""

    def __init__(self, env_id, seed, action_repeat=2, frame_stack=3, max_episode_frames=None, size=84):
        try:
            from dm_control import manipulation, suite
        except Exception as error:  # dm_control picks the renderer at import: a bad MUJOCO_GL fails here
            raise RunError(renderer_advice(error)) from error

        if env_id == "reach_duplo":
            self._env = manipulation.load("reach_duplo_vision", seed=seed)
            self._pixels_key = "front_close"  # the manipulation task renders its own pixels
        else:
            domain, task = env_id.split("_", 1)
            domain = "ball_in_cup" if domain == "cup" else domain
            self._env = suite.load(domain, task, task_kwargs={"random": seed}, visualize_reward=False)
            self._pixels_key = None
            self._camera_id = 2 if domain == "quadruped" else 0
        spec = self._env.action_spec()
        self._action_low, self._action_high = spec.minimum.astype(np.float32), spec.maximum.astype(np.float32)
        self.action_dim = spec.shape[0]
        self.frame_shape, self.observation_shape = (3, size, size), (3 * frame_stack, size, size)
        self._size, self._action_repeat, self._max_episode_frames = size, action_repeat, max_episode_frames
        self._frames = deque(maxlen=frame_stack)
        self.frame = None  # the latest render, (3, size, size) uint8: what the replay stores
        try:
            self._env.physics.render(height=8, width=8)
        except Exception as error:
            raise RunError(renderer_advice(error)) from error

    @property
    def random_state(self) -> np.random.RandomState:
        """The task's random state: initial states, targets and noise of the episodes come from it."""
        return self._env.random_state if self._pixels_key else self._env.task.random

    def _render(self, time_step) -> np.ndarray:
        if self._pixels_key is not None:
            pixels = time_step.observation[self._pixels_key][0]
        else:
            pixels = self._env.physics.render(height=self._size, width=self._size, camera_id=self._camera_id)
        return np.ascontiguousarray(pixels.transpose(2, 0, 1))

    def _observation(self) -> np.ndarray:
        return np.concatenate(self._frames, axis=0)

    def reset(self) -> np.ndarray:
        self._episode_frames = 0
        self.frame = self._render(self._env.reset())
        for _ in range(self._frames.maxlen):  # after a reset the first frame fills every slot
            self._frames.append(self.frame)
        return self._observation()

    def step(self, action: np.ndarray):
        """Returns (stacked observation, summed reward, discount, episode over)."""
        env_action = self._action_low + (np.asarray(action, np.float32) + 1.0) / 2.0 * (
            self._action_high - self._action_low
        )
        reward, discount = 0.0, 1.0
        for _ in range(self._action_repeat):
            time_step = self._env.step(env_action)
            reward += (time_step.reward or 0.0) * discount
            discount *= time_step.discount
            self._episode_frames += 1
            done = time_step.last() or self._episode_frames == self._max_episode_frames
            if done:
                break
        self.frame = self._render(time_step)
        self._frames.append(self.frame)
        return self._observation(), reward, discount, done


# ----------------------------------------------------------------------------------------------------------------------
# Replay (docs/drqv2.md, details 3-5): whole episodes in a ring of frames stored once, stacks rebuilt at sampling.


class ReplayBuffer:
    """FIFO replay of whole episodes. Slot s of the ring holds frame o_t and, unless it is an episode's last frame,
    the transition (a_t, r_t, d_t) taken from it. Only complete episodes are sampled. The frames live on `device`
    (the GPU when they fit, see --replay-device); actions, rewards, discounts and the sampling happen on the host,
    so every device draws the same batches from the same seed and only the frame gather runs on the device. The
    running episode's frames wait on the host and reach the ring in one copy when the episode ends."""

    ARRAYS = ("frames", "actions", "rewards", "discounts")

    def __init__(self, capacity, frame_shape, action_dim, frame_stack, nstep, gamma, seed=0, device="cpu"):
        self.capacity, self.frame_stack, self.nstep, self.gamma = capacity, frame_stack, nstep, gamma
        self.device = torch.device(device)
        # An episode of T transitions stores T + 1 frames; 1% extra slots hold the episodes' last frames
        # (exact for episodes of 100 or more steps; shorter episodes are evicted by slots before transitions).
        self.num_slots = self.slots(capacity)
        # on the CPU, pages are committed as they fill
        self.frames = torch.empty((self.num_slots, *frame_shape), dtype=torch.uint8, device=self.device)
        self.actions = np.zeros((self.num_slots, action_dim), dtype=np.float32)
        self.rewards = np.zeros(self.num_slots, dtype=np.float32)
        self.discounts = np.zeros(self.num_slots, dtype=np.float32)
        self.episodes = deque()  # (first slot, number of transitions) of complete episodes, oldest first; slots
        self.num_transitions = 0  # count up forever and index the ring modulo num_slots
        self._next_slot = 0
        self._episode_start = None
        self._episode_frames = []  # the running episode's frames, not yet in the ring
        self._sample_table = None  # cached per-episode sampling table, rebuilt when the episodes change
        self.rng = np.random.default_rng(seed)
        self.lock = threading.Lock()  # writers wait while a background sample (BatchPrefetcher) reads

    @staticmethod
    def slots(capacity: int) -> int:
        return capacity + capacity // 100 + 1

    @classmethod
    def memory(cls, capacity, frame_shape, action_dim) -> int:
        """Bytes a replay of `capacity` transitions allocates: frame slots, each with an action, reward and discount."""
        return cls.slots(capacity) * (int(np.prod(frame_shape)) + 4 * (action_dim + 2))

    @property
    def window(self) -> int:
        """Steps after t that a sample at t reads; valid t in an episode of T transitions are 0 .. T - window."""
        return self.nstep

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        """A host array on the replay's device (an ordered copy: sampling runs when the GPU has nothing queued)."""
        return torch.from_numpy(array).to(self.device)

    def _claim_slot(self, frame):
        """Takes the next slot of the ring for a frame of the running episode."""
        while self.episodes and self.episodes[0][0] <= self._next_slot - self.num_slots:
            self._evict_oldest()  # the slot still holds the oldest episode
        if self._next_slot - self._episode_start >= self.num_slots:
            raise ValueError(f"an episode longer than the replay ({self.num_slots} frames) cannot be stored")
        self._episode_frames.append(frame)
        self._next_slot += 1

    def _write_episode_frames(self):
        """Copies the running episode's frames into its slots of the ring (which may wrap around)."""
        frames = torch.from_numpy(np.stack(self._episode_frames))
        first = self._episode_start % self.num_slots
        head = min(len(frames), self.num_slots - first)
        self.frames[first : first + head] = frames[:head].to(self.device)
        self.frames[: len(frames) - head] = frames[head:].to(self.device)
        self._episode_frames = []

    def _evict_oldest(self):
        self.num_transitions -= self.episodes.popleft()[1]
        self._sample_table = None

    def start_episode(self, frame: np.ndarray):
        """Stores the first frame of a new episode (an unfinished previous episode is dropped)."""
        with self.lock:
            if self._episode_start is not None:
                self._next_slot = self._episode_start
            self._episode_start, self._episode_frames = self._next_slot, []
            self._claim_slot(frame)

    def add(self, action, reward, discount, next_frame):
        """Stores the transition from the latest frame and the frame it led to."""
        with self.lock:
            slot = (self._next_slot - 1) % self.num_slots
            self.actions[slot], self.rewards[slot], self.discounts[slot] = action, reward, discount
            self._claim_slot(next_frame)

    def end_episode(self):
        """Makes the current episode sampleable, then evicts the oldest episodes beyond capacity."""
        with self.lock:
            self._write_episode_frames()
            self.episodes.append((self._episode_start, self._next_slot - 1 - self._episode_start))
            self.num_transitions += self.episodes[-1][1]
            self._episode_start, self._sample_table = None, None
            while self.num_transitions > self.capacity:
                self._evict_oldest()

    def state_dict(self) -> dict:
        """The stored data as host tensors (no copy on the CPU), the episode table and the sampling RNG; an
        unfinished episode is dropped."""
        end = self._episode_start if self._episode_start is not None else self._next_slot
        used = min(end, self.num_slots)
        arrays = {name: torch.from_numpy(getattr(self, name)[:used]) for name in self.ARRAYS[1:]}
        counters = {"episodes": list(self.episodes), "num_transitions": self.num_transitions, "next_slot": end}
        # a slice of a torch tensor would save the whole ring; a numpy view's tensor holds only the used slots
        frames = torch.from_numpy(self.frames.numpy()[:used]) if self.device.type == "cpu" else self.frames[:used].cpu()
        return {"frames": frames, **arrays, **counters, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict):
        self.frames[: len(state["frames"])] = state["frames"].to(self.device)
        for name in self.ARRAYS[1:]:
            getattr(self, name)[: len(state[name])] = state[name].numpy()
        self.episodes = deque(tuple(episode) for episode in state["episodes"])
        self.num_transitions, self._next_slot = state["num_transitions"], state["next_slot"]
        self._episode_start, self._episode_frames, self._sample_table = None, [], None
        self.rng.bit_generator.state = state["rng"]

    def nbytes_per_transition(self) -> float:
        """Bytes allocated per transition of capacity (frames, actions, rewards, discounts)."""
        return sum(getattr(self, name).nbytes for name in self.ARRAYS) / self.capacity

    def _stack_slots(self, slots, episode_starts):
        """Ring slots of the stacked observations at absolute slots: the last `frame_stack` frames, the first one
        repeated, shape (B, frame_stack)."""
        offsets = np.arange(-self.frame_stack + 1, 1)
        return np.maximum(slots[:, None] + offsets, episode_starts[:, None]) % self.num_slots

    def _gather_stacks(self, *stack_slots):
        """The stacked observations of each (B, frame_stack) array of ring slots, gathered in one pass on the
        replay's device: uint8 tensors of shape (B, frame_stack * 3, H, W)."""
        index = np.concatenate(stack_slots)
        if self.device.type == "cpu":  # numpy's gather is several times faster than torch's on the CPU
            frames = torch.from_numpy(self.frames.numpy()[index])  # (n * B, frame_stack, 3, H, W)
        else:
            frames = self.frames[self._to_device(index)]
        frames = frames.reshape(len(index), -1, *frames.shape[-2:])
        return frames.split([len(slots) for slots in stack_slots])

    def _table(self):
        """Per complete episode: its first slot, and the running count of transitions that can be sampled."""
        if self._sample_table is None:
            starts = np.array([s for s, _ in self.episodes], dtype=np.int64)
            valid = np.array([max(n - self.window + 1, 0) for _, n in self.episodes], dtype=np.int64)
            self._sample_table = (starts, np.cumsum(valid))
        return self._sample_table

    def can_sample(self) -> bool:
        cumulative = self._table()[1]
        return len(cumulative) > 0 and cumulative[-1] > 0

    def sample_indices(self, batch_size):
        """Absolute slots t, uniform over every transition whose window lies inside its episode, and their
        episodes' first slots."""
        starts, cumulative = self._table()
        if len(cumulative) == 0 or cumulative[-1] == 0:
            raise ValueError("the replay holds no complete episode long enough to sample from")
        draws = self.rng.integers(0, cumulative[-1], size=batch_size)
        episode = np.searchsorted(cumulative, draws, side="right")
        offset_in_episode = draws - np.r_[0, cumulative][episode]
        return starts[episode] + offset_in_episode, starts[episode]

    def sample(self, batch_size):
        """A batch of tensors on the replay's device: obs, action, reward (n-step), discount (gamma^n times env
        discounts), next_obs."""
        slots, episode_starts = self.sample_indices(batch_size)
        reward = np.zeros(batch_size, dtype=np.float32)
        discount = np.ones(batch_size, dtype=np.float32)
        for i in range(self.nstep):
            step = (slots + i) % self.num_slots
            reward += discount * self.rewards[step]
            discount *= self.discounts[step] * self.gamma
        obs, next_obs = self._gather_stacks(
            self._stack_slots(slots, episode_starts), self._stack_slots(slots + self.nstep, episode_starts)
        )
        host = {
            "action": self.actions[slots % self.num_slots],
            "reward": reward[:, None],
            "discount": discount[:, None],
        }
        return {"obs": obs, "next_obs": next_obs, **{key: self._to_device(value) for key, value in host.items()}}


class BatchPrefetcher:
    """Hands out the next batch and draws the one after it at once: right after the previous update, 2 agent steps
    before its own update (the published code's loader lags further). A replay on the CPU is sampled on a background
    thread while the agent updates, acts and steps the environment (torch's gathers release the GIL); the sample is
    taken under the replay's lock, which the replay's writers wait for, so a batch is exactly what `replay.sample`
    gave when it was requested. With a CUDA training device the batch then comes through pinned memory, so that its
    copy overlaps with computation. A replay on the GPU is sampled in the main thread: the host only draws indices
    and queues one gather."""

    def __init__(self, replay: ReplayBuffer, batch_size: int, device: torch.device):
        self.replay, self.batch_size, self.device = replay, batch_size, device
        self._background = replay.device.type == "cpu"
        self._worker = concurrent.futures.ThreadPoolExecutor(max_workers=1) if self._background else None
        self._pending = self._in_transfer = None

    def _sample(self):
        try:
            batch = self.replay.sample(self.batch_size)
        finally:
            self.replay.lock.release()
        if self.device.type == "cuda" and self._background:
            batch = {key: value.pin_memory() for key, value in batch.items()}
        return batch

    def _request(self):
        self.replay.lock.acquire()  # released once the sample is taken
        if self._background:
            self._pending = self._worker.submit(self._sample)
        else:
            self._pending = concurrent.futures.Future()
            self._pending.set_result(self._sample())

    def can_supply(self) -> bool:
        """Whether a batch is requested or can be sampled now (the replay holds a complete episode to sample)."""
        return self._pending is not None or self.replay.can_sample()

    def next(self) -> dict:
        """The requested batch (sampled now if none is), on the device; then requests the following one if the replay
        can be sampled (else the next call samples)."""
        if self._pending is None:
            self._request()
        batch = self._pending.result()
        self._pending = None
        if self.replay.can_sample():
            self._request()
        # the pinned batch is kept until the next call: its copy has surely finished by then
        self._in_transfer = batch
        return {key: value.to(self.device, non_blocking=True) for key, value in batch.items()}

    def state_dict(self):
        """The requested batch on the host (its draw already moved the replay's RNG), for a checkpoint; None if there
        is none."""
        return None if self._pending is None else {key: value.cpu() for key, value in self._pending.result().items()}

    def load_state_dict(self, batch):
        if batch is not None:
            self._pending = concurrent.futures.Future()
            self._pending.set_result({key: value.to(self.replay.device) for key, value in batch.items()})


# ----------------------------------------------------------------------------------------------------------------------
# Networks and augmentation (docs/drqv2.md, details 6-8)


def weight_init(m):
    """Orthogonal weights (ReLU gain for convolutions), zero biases."""
    if isinstance(m, nn.Linear):
        nn.init.orthogonal_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        nn.init.orthogonal_(m.weight, nn.init.calculate_gain("relu"))
        nn.init.zeros_(m.bias)


def random_shift(x: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """Shifts each image by a random whole number of pixels in [-pad, pad] in each axis, replicating the border.
    The published code pads by replication and resamples with bilinear grid_sample at whole-pixel offsets; that is
    this gather with clamped indices, which also works on uint8 images (a quarter of the bytes of float ones)."""
    n, c, h, w = x.shape
    shift = torch.randint(0, 2 * pad + 1, (n, 2), device=x.device) - pad
    rows = (torch.arange(h, device=x.device) + shift[:, :1]).clamp(0, h - 1)  # clamping = replicate padding
    cols = (torch.arange(w, device=x.device) + shift[:, 1:]).clamp(0, w - 1)
    pixels = (rows[:, :, None] * w + cols[:, None, :]).reshape(n, 1, h * w)  # source pixel of each output pixel
    return x.reshape(n, c, h * w).gather(2, pixels.expand(n, c, h * w)).reshape(n, c, h, w)


class Encoder(nn.Module):
    def __init__(self, obs_shape):
        super().__init__()
        self.convnet = nn.Sequential(  # in-place ReLUs: no extra activation buffer (the conv backward needs none)
            nn.Conv2d(obs_shape[0], 32, 3, stride=2),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, 32, 3, stride=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, 32, 3, stride=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, 32, 3, stride=1),
            nn.ReLU(inplace=True),
        )
        side = (obs_shape[-1] - 3) // 2 + 1 - 6  # stride-2 conv, then three 3x3 convs
        self.repr_dim = 32 * side * side  # 39 200 for 84x84 inputs
        self.apply(weight_init)
        self.convnet.to(memory_format=torch.channels_last)

    def forward(self, obs):
        """obs: uint8 (or float) images in [0, 255]. Channels-last memory speeds up the convolutions on CPU and GPU;
        the features come out in the usual (channel, row, column) order."""
        # under --amp bf16 the images go straight to bfloat16, without a float32 copy for the convolutions to cast
        autocast = torch.is_autocast_enabled(obs.device.type)
        dtype = torch.get_autocast_dtype(obs.device.type) if autocast else torch.float32
        x = obs.contiguous(memory_format=torch.channels_last).to(dtype, copy=True)
        return self.convnet(x.div_(255.0).sub_(0.5)).flatten(1)  # in place: the same numbers, no new buffers


class Actor(nn.Module):
    def __init__(self, repr_dim, action_dim, feature_dim, hidden_dim):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(repr_dim, feature_dim), nn.LayerNorm(feature_dim), nn.Tanh())
        self.policy = nn.Sequential(
            nn.Linear(feature_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, action_dim),
        )
        self.apply(weight_init)

    def forward(self, features):
        """The policy's mean action in [-1, 1]; its std comes from the schedule."""
        return torch.tanh(self.policy(self.trunk(features)))


def sample_action(mean, std, clip=None):
    """A ~ Normal(mean, std) with the noise clipped to +-clip, clamped into [-1, 1] with a straight-through gradient."""
    noise = torch.randn_like(mean) * std
    if clip is not None:
        noise = noise.clamp(-clip, clip)
    action = mean + noise
    eps = 1e-6
    return action - action.detach() + action.detach().clamp(-1.0 + eps, 1.0 - eps)


class Critic(nn.Module):
    def __init__(self, repr_dim, action_dim, feature_dim, hidden_dim):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(repr_dim, feature_dim), nn.LayerNorm(feature_dim), nn.Tanh())

        def q_head():
            return nn.Sequential(
                nn.Linear(feature_dim + action_dim, hidden_dim),
                nn.ReLU(),
                nn.Linear(hidden_dim, hidden_dim),
                nn.ReLU(),
                nn.Linear(hidden_dim, 1),
            )

        self.q1, self.q2 = q_head(), q_head()
        self.apply(weight_init)

    def forward(self, features, action):
        h_action = torch.cat([self.trunk(features), action], dim=-1)
        return self.q1(h_action), self.q2(h_action)


@torch.no_grad()
def soft_update(target: nn.Module, source: nn.Module, tau: float):
    """target <- tau * source + (1 - tau) * target, parameter by parameter (one fused lerp over the list)."""
    torch._foreach_lerp_(list(target.parameters()), list(source.parameters()), tau)


# ----------------------------------------------------------------------------------------------------------------------
# Agent: the networks, their optimizers, acting and the update


class Agent:
    def __init__(self, obs_shape, action_dim, args: Args, device):
        self.args, self.device = args, device
        self.encoder = Encoder(obs_shape).to(device)
        self.actor = Actor(self.encoder.repr_dim, action_dim, args.feature_dim, args.hidden_dim).to(device)
        self.critic = Critic(self.encoder.repr_dim, action_dim, args.feature_dim, args.hidden_dim).to(device)
        self.critic_target = Critic(self.encoder.repr_dim, action_dim, args.feature_dim, args.hidden_dim).to(device)
        self.critic_target.load_state_dict(self.critic.state_dict())
        adam = {"lr": args.learning_rate, "capturable": args.cudagraphs}  # capturable: Adam's step count on the GPU
        self.encoder_opt = torch.optim.Adam(self.encoder.parameters(), **adam)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), **adam)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), **adam)
        self.stddev = parse_schedule(args.stddev_schedule)
        if args.compile:
            for network in [part for part in vars(self).values() if isinstance(part, nn.Module)]:
                network.compile()  # keeps state_dict keys
        self.cuda_graph = CudaGraph(self) if args.cudagraphs else None

    def autocast(self):
        """bf16 autocast of forward passes under --amp bf16. Every region ends before an optimizer step, and keeps no
        cache of bf16 weights: with a cache, a forward after a step in the same region would use the weights from
        before the step (and a CUDA graph would not record the casts)."""
        bf16 = self.args.amp == "bf16"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=False)

    @torch.no_grad()
    def act(self, obs: np.ndarray, step: int, eval_mode: bool) -> np.ndarray:
        """Mean action for evaluation; otherwise scheduled exploration noise, uniform during the first steps."""
        features = self.encoder(torch.as_tensor(obs, device=self.device)[None])
        mean = self.actor(features)
        if eval_mode:
            action = mean
        elif step < self.args.num_expl_steps:
            action = torch.empty_like(mean).uniform_(-1.0, 1.0)
        else:
            action = sample_action(mean, self.stddev(step))
        return action[0].cpu().numpy()

    def update(self, batch: dict, step: int) -> dict:
        """One DrQ-v2 update on a batch already on the device. Returns {TensorBoard tag: detached tensor}; nothing in
        it waits for the GPU, so the environment steps while the update runs."""
        if self.cuda_graph is not None:
            return self.cuda_graph(batch, self.stddev(step))
        return self.compute_update(batch, self.stddev(step))

    def compute_update(self, batch: dict, std) -> dict:
        with self.autocast():
            obs = self.encoder(random_shift(batch["obs"]))
            with torch.no_grad():
                next_obs = self.encoder(random_shift(batch["next_obs"]))
        metrics = self.update_critic(obs, batch["action"], batch["reward"], batch["discount"], next_obs, std)
        metrics.update(self.update_actor(obs.detach(), std))
        soft_update(self.critic_target, self.critic, self.args.tau)
        metrics["charts/actor_std"] = torch.as_tensor(std)
        return metrics

    def update_critic(self, obs, action, reward, discount, next_obs, std):
        with self.autocast():
            with torch.no_grad():
                next_action = sample_action(self.actor(next_obs), std, self.args.stddev_clip)
                target_q = reward + discount * torch.min(*self.critic_target(next_obs, next_action))
            q1, q2 = self.critic(obs, action)
        critic_loss = F.mse_loss(q1.float(), target_q.float()) + F.mse_loss(q2.float(), target_q.float())
        self.encoder_opt.zero_grad(set_to_none=True)
        self.critic_opt.zero_grad(set_to_none=True)
        critic_loss.backward()
        self.critic_opt.step()
        self.encoder_opt.step()
        return {"losses/critic_loss": critic_loss.detach(), "losses/q_values": q1.detach().float().mean()}

    def update_actor(self, obs, std):
        with self.autocast():
            action = sample_action(self.actor(obs), std, self.args.stddev_clip)
            q = torch.min(*self.critic(obs, action))
        actor_loss = -q.float().mean()
        self.actor_opt.zero_grad(set_to_none=True)
        actor_loss.backward()
        self.actor_opt.step()
        return {"losses/actor_loss": actor_loss.detach()}

    def optimizers(self) -> list:
        return [part for part in vars(self).values() if isinstance(part, torch.optim.Optimizer)]

    def state_dict(self, optimizers=True) -> dict:
        """State dicts of the agent's networks (and optimizers), by attribute name."""
        kinds = (nn.Module, torch.optim.Optimizer) if optimizers else nn.Module
        return {name: part.state_dict() for name, part in vars(self).items() if isinstance(part, kinds)}

    def load_state_dict(self, state: dict):
        for name, part_state in state.items():
            getattr(self, name).load_state_dict(part_state)


class CudaGraph:
    """--cudagraphs: the whole update (forward, backward, optimizer steps, target update) recorded once as a CUDA graph
    and replayed: one launch instead of hundreds, so a small update is no longer bound by kernel launches and the CPU
    is free at once. The batch and the std are copied into the graph's input tensors before each replay; the metrics
    it returns are its output tensors, which the next replay overwrites. Random draws replay from the CUDA generator."""

    def __init__(self, agent: Agent):
        self.agent, self.graph = agent, None

    def __call__(self, batch: dict, std: float) -> dict:
        if self.graph is None:
            self.batch = {key: value.clone() for key, value in batch.items()}
            self.std = torch.full((), std, device=self.agent.device)
            self.capture()
        else:
            for key, value in batch.items():
                self.batch[key].copy_(value, non_blocking=True)
            self.std.fill_(std)
        self.graph.replay()
        return self.metrics

    def capture(self):
        agent = self.agent
        # A warm-up update on a side stream sets up what a graph cannot (library handles, Adam's state); then the
        # weights, the optimizer states and the random generator are put back, in place, as they were before it.
        saved, rng = copy.deepcopy(agent.state_dict()), torch.cuda.get_rng_state()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            agent.compute_update(self.batch, self.std)
        torch.cuda.current_stream().wait_stream(side)
        with torch.no_grad():
            for name, part in vars(agent).items():
                if isinstance(part, nn.Module):
                    part.load_state_dict(saved[name])
                elif isinstance(part, torch.optim.Optimizer):
                    parameters = [p for group in part.param_groups for p in group["params"]]
                    for index, parameter in enumerate(parameters):
                        before = saved[name]["state"].get(index)
                        for key, tensor in part.state[parameter].items():
                            if before:
                                tensor.copy_(before[key])
                            else:  # no state before the warm-up
                                tensor.zero_()
        torch.cuda.set_rng_state(rng)
        for optimizer in agent.optimizers():
            optimizer.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):  # the sampling thread may pin memory
            self.metrics = agent.compute_update(self.batch, self.std)


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints: everything needed to continue a run exactly, written atomically, loadable without running any code

CHECKPOINT = "checkpoint.pt"
# Settings that may differ when a run is resumed; every other setting must equal the checkpoint's.
RESUMABLE_CHANGES = {"total_timesteps", "eval_every", "num_eval_episodes", "checkpoint_every", "checkpoint_replay"}
RESUMABLE_CHANGES |= {"resume", "cuda", "torch_deterministic", "track", "wandb_project_name", "wandb_entity"}
RESUMABLE_CHANGES |= {"capture_video", "save_model", "compile", "cudagraphs", "tf32", "replay_device"}


def payload_digest(payload) -> str:
    """SHA-256 of a checkpoint's content (every key, value and tensor byte). torch.load does not check the zip's
    CRCs, so without this a flipped byte in a tensor would load silently."""
    digest = hashlib.sha256()

    def feed(x):
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().contiguous()
            digest.update(f"tensor{x.dtype}{tuple(x.shape)}".encode())
            digest.update(x.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(x, dict):
            digest.update(f"dict{len(x)}".encode())
            for key, value in x.items():
                feed(key)
                feed(value)
        elif isinstance(x, (list, tuple)):
            digest.update(f"list{len(x)}".encode())
            for value in x:
                feed(value)
        else:
            digest.update(repr(x).encode())

    feed(payload)
    return digest.hexdigest()


def tensor_bytes(x) -> int:
    """Bytes of the tensors in a nested payload (about the size of its checkpoint file)."""
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, dict):
        return sum(tensor_bytes(value) for value in x.values())
    return sum(tensor_bytes(value) for value in x) if isinstance(x, (list, tuple)) else 0


def save_checkpoint(path: str, payload: dict, kept: str = "the previous checkpoint is kept"):
    """Writes payload and its digest into a temporary file in the same folder, fsyncs, then renames it over `path`:
    a kill or a full disk at any moment leaves the previous checkpoint whole, and the temporary file is removed
    whatever the error. `kept` says what stays, for the message."""
    folder = os.path.dirname(path) or "."
    needed, free = tensor_bytes(payload) + 2**20, shutil.disk_usage(folder).free
    if needed > free + (os.path.getsize(path) if os.path.exists(path) else 0):  # the old file goes at the rename
        raise RunError(
            f"not enough disk space for {path} (about {needed / 1e9:.2f} GB, {free / 1e9:.2f} GB free); {kept} "
            "(--no-checkpoint-replay writes about 0.1 GB)"
        )
    payload = {**payload, "digest": payload_digest(payload)}
    temporary = f"{path}.tmp"
    try:
        with open(temporary, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
        descriptor = os.open(folder, os.O_RDONLY)
        os.fsync(descriptor)  # the rename itself reaches the disk
        os.close(descriptor)
    except Exception as error:  # OSError, or torch's zip writer failing on a full disk (RuntimeError)
        reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        raise RunError(f"could not write {path} ({reason}); {kept}") from error
    finally:
        with contextlib.suppress(OSError):
            os.remove(temporary)


def load_checkpoint(path: str) -> dict:
    """The checkpoint's payload, after checking it against its digest; tensors are memory-mapped from the file."""
    try:
        payload = torch.load(path, weights_only=True, mmap=True)
    except Exception as error:  # a damaged file fails in many ways inside torch.load
        reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        raise RunError(f"the checkpoint {path} is unreadable or corrupt ({reason})") from error
    if not isinstance(payload, dict) or payload.pop("digest", None) != payload_digest(payload):
        raise RunError(f"the checkpoint {path} is corrupt: its content does not match its digest")
    return payload


def rng_state(envs) -> dict:
    """Python, numpy, torch (and CUDA) and the environments' random states, with numpy arrays as tensors."""

    def numpy_state(state):
        return [state[0], torch.from_numpy(state[1].copy()), *state[2:]]

    return {
        "python": random.getstate(),
        "numpy": numpy_state(np.random.get_state()),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "envs": [numpy_state(env.random_state.get_state()) for env in envs],
    }


def set_rng_state(state: dict, envs):
    def numpy_state(saved):
        return (saved[0], saved[1].numpy(), *saved[2:])

    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    np.random.set_state(numpy_state(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for env, env_state in zip(envs, state["envs"]):
        env.random_state.set_state(numpy_state(env_state))


def find_run_to_resume(args: Args) -> str | None:
    """The run directory `--resume` names (or the directory of the checkpoint file it names); for `auto`, the newest
    run under runs/ of the same env_id, exp_name and seed whose checkpoint has the same settings (else the newest,
    whose differences are then reported), or None."""
    if args.resume == "auto":
        found = sorted(glob.glob(f"runs/{args.env_id}__{args.exp_name}__{args.seed}__*/{CHECKPOINT}"))
        found.sort(key=os.path.getmtime, reverse=True)
        matching = [path for path in found if not settings_differences(checkpoint_args(path), args)]
        if found:
            chosen = os.path.dirname((matching or found)[0])
            which = "with the same settings" if matching else "(none has the same settings)"
            print(f"--resume auto: resuming {chosen}, the newest of {len(found)} runs of this task and seed {which}")
            return chosen
        print("--resume auto: no checkpoint of this env_id, exp_name and seed under runs/; starting a new run")
        return None
    if os.path.isfile(args.resume) and os.path.basename(args.resume) == CHECKPOINT:
        return os.path.dirname(os.path.abspath(args.resume))
    if not os.path.isdir(args.resume):
        raise RunError(f"--resume {args.resume}: no such run directory (pass runs/<run_name>, or auto)")
    if not os.path.isfile(os.path.join(args.resume, CHECKPOINT)):
        raise RunError(f"--resume {args.resume}: there is no {CHECKPOINT} in that directory (checkpoints off?)")
    return os.path.normpath(args.resume)


def checkpoint_args(path: str) -> dict:
    """The settings saved in a checkpoint, read without loading its tensors; {} if unreadable."""
    try:
        return torch.load(path, weights_only=True, mmap=True).get("args", {})
    except Exception:  # noqa: BLE001 (a damaged file is reported when it is loaded)
        return {}


def settings_differences(saved: dict, args: Args) -> list:
    return [
        f"--{name.replace('_', '-')} is {saved.get(name)!r} in the checkpoint but {value!r} now"
        for name, value in vars(args).items()
        if name not in RESUMABLE_CHANGES and saved.get(name) != value
    ]


def check_resumable(saved: dict, args: Args):
    differences = settings_differences(saved, args)
    if differences:
        raise RunError("cannot resume with settings other than the checkpoint's: " + "; ".join(differences))


def check_finite(agent, frame: int):
    for name, network in agent.state_dict(optimizers=False).items():
        if not all(torch.isfinite(tensor).all() for tensor in network.values()):
            raise RunError(f"non-finite parameters in the {name} at frame {frame}; stopping without checkpointing")


class StopRequest:
    """SIGTERM, SIGINT and SIGUSR1 ask the run to checkpoint at the end of the current episode and exit; a second
    signal exits at once (the previous checkpoint stays whole)."""

    def __init__(self, checkpoints: bool):
        self.signal, self.checkpoints = None, checkpoints
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            signal.signal(signum, self._handle)

    def _handle(self, signum, _):
        if self.signal is not None:
            raise SystemExit(128 + signum)
        self.signal = signum
        then = "checkpointing and exiting" if self.checkpoints else "exiting (checkpoints are off: nothing to resume)"
        print(f"{signal.Signals(signum).name}: finishing this episode (an evaluation stops at once), then {then}")


# ----------------------------------------------------------------------------------------------------------------------
# Training loop


# bytes of a default run on the CPU besides the replay (measured: 0.9 GB at the first update)
UPDATE_MEMORY = 1.2e9


def memory_available() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is none)."""
    with contextlib.suppress(OSError, StopIteration, ValueError), open("/proc/meminfo") as f:
        return 1024 * int(next(line.split()[1] for line in f if line.startswith("MemAvailable:")))
    return None


def check_memory(args: Args, env, device, replay_device) -> str:
    """The replay's memory once the run has filled it, checked with the networks' against the memory available
    (a replay that cannot fit would end the run hours in). Returns the line that says it."""
    transitions = min(args.buffer_size, args.total_timesteps // args.action_repeat)
    replay = ReplayBuffer.memory(transitions, env.frame_shape, env.action_dim)
    host = replay if replay_device.type == "cpu" else 0.0
    host += UPDATE_MEMORY if device.type == "cpu" else 0.0
    available = memory_available()
    if available is not None and host > available:
        raise RunError(
            f"the replay's {transitions} transitions take {replay / 1e9:.1f} GB and the updates about "
            f"{UPDATE_MEMORY / 1e9:.1f} GB, but {available / 1e9:.1f} GB of memory are available: lower --buffer-size"
        )
    if replay_device.type == "cuda" and replay > torch.cuda.mem_get_info(replay_device)[0]:
        raise RunError(f"the replay's {replay / 1e9:.1f} GB do not fit in the GPU's free memory: --replay-device cpu")
    return f"replay: up to {transitions} transitions, {replay / 1e9:.2f} GB in {replay_device.type} memory"


def configure_torch(args: Args):
    """cuDNN's deterministic algorithms (--torch-deterministic) and the precision of fp32 convolutions (--tf32)."""
    torch.backends.cudnn.deterministic = args.torch_deterministic
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = args.tf32, False


def choose_replay_device(args: Args, device: torch.device, env) -> torch.device:
    """--replay-device: `auto` puts the frames on the GPU when the full replay fits in half of its free memory."""
    if args.replay_device == "cpu" or device.type == "cpu":
        if args.replay_device == "cuda":
            raise RunError("--replay-device cuda needs a CUDA device")
        return torch.device("cpu")
    if args.replay_device == "auto":
        free, _ = torch.cuda.mem_get_info(device)
        fits = ReplayBuffer.memory(args.buffer_size, env.frame_shape, env.action_dim) <= free / 2
        return device if fits else torch.device("cpu")
    return device


def evaluate(agent, env, num_episodes, step, video_path=None, interrupted=lambda: False) -> list | None:
    """Returns of `num_episodes` episodes acting with the mean action; the first one is filmed if asked. None if
    `interrupted()` turns true on the way (a stop request must not wait for a long evaluation)."""
    returns, video = [], []
    for episode in range(num_episodes):
        obs, done, episode_return = env.reset(), False, 0.0
        while not done:
            if interrupted():
                return None
            if video_path and episode == 0:
                video.append(env.frame.transpose(1, 2, 0).repeat(3, axis=0).repeat(3, axis=1))  # 84 -> 252 px
            obs, reward, _, done = env.step(agent.act(obs, step, eval_mode=True))
            episode_return += reward
        returns.append(episode_return)
    if video_path:
        import imageio

        os.makedirs(os.path.dirname(video_path), exist_ok=True)
        imageio.mimsave(video_path, video, fps=30, macro_block_size=4)
    return returns


def format_duration(seconds: float) -> str:
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m" if math.isfinite(seconds) else "?"


def main(args: Args):
    args = resolve_args(args)  # idempotent: the command line resolves first to fail before any import or file
    # Everything that can be wrong (settings, checkpoint, renderer) is found before any file is written.
    run_dir = find_run_to_resume(args) if args.resume else None
    checkpoint = load_checkpoint(os.path.join(run_dir, CHECKPOINT)) if run_dir else None
    if checkpoint is not None:
        check_resumable(checkpoint["args"], args)
    if args.cuda and not torch.cuda.is_available():
        print("warning: no CUDA device is available; running on the CPU")
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    if args.cudagraphs and device.type != "cuda":
        raise RunError("--cudagraphs needs a CUDA device")
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    configure_torch(args)

    env_kwargs = {"action_repeat": args.action_repeat, "frame_stack": args.frame_stack}
    env_kwargs["max_episode_frames"] = args.max_episode_frames
    env = DMCPixelEnv(args.env_id, args.seed, **env_kwargs)
    eval_env = DMCPixelEnv(args.env_id, args.seed, **env_kwargs)
    replay_device = choose_replay_device(args, device, env)
    memory = check_memory(args, env, device, replay_device)
    try:
        agent = Agent(env.observation_shape, env.action_dim, args, device)
    except (RuntimeError, MemoryError) as error:  # an allocation that cannot succeed: sizes far too large
        raise RunError(f"the networks do not fit in memory ({str(error).splitlines()[0][:150]})") from error
    replay_kwargs = {"frame_stack": args.frame_stack, "nstep": args.nstep, "gamma": args.gamma, "seed": args.seed}
    rb = ReplayBuffer(args.buffer_size, env.frame_shape, env.action_dim, **replay_kwargs, device=replay_device)
    prefetcher = BatchPrefetcher(rb, args.batch_size, device)
    start_step, total_steps = 0, args.total_timesteps // args.action_repeat  # in agent steps
    if checkpoint is not None:
        agent.load_state_dict(checkpoint["agent"])
        if checkpoint["replay"] is not None:
            rb.load_state_dict(checkpoint["replay"])
            prefetcher.load_state_dict(checkpoint["prefetched"])
        set_rng_state(checkpoint["rng"], (env, eval_env))
        start_step, last_eval = checkpoint["global_step"], checkpoint.get("last_eval", float("nan"))
        pending_eval = checkpoint.get("pending_eval")
        del checkpoint  # its tensors are memory-mapped from the file
        if start_step >= total_steps:
            print(f"{run_dir} already ran {start_step * args.action_repeat} frames: nothing to do")
            return
    else:
        last_eval, pending_eval = float("nan"), 0  # a new run evaluates at frame 0 first
    resumed = start_step > 0
    run_dir = run_dir or f"runs/{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_name = os.path.basename(run_dir)
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(run_dir, f"{CHECKPOINT}.tmp"))  # left by a run killed while writing a checkpoint

    if args.track:
        import wandb

        wandb.init(
            project=args.wandb_project_name,
            entity=args.wandb_entity,
            sync_tensorboard=True,
            config=vars(args),
            name=run_name,
            id=run_name,  # a resumed run continues the same wandb run
            resume="allow",
            save_code=True,
        )
    from torch.utils.tensorboard import SummaryWriter

    frame = start_step * args.action_repeat
    # On resume, TensorBoard drops what the interrupted run logged after its checkpoint: each step appears once.
    writer = SummaryWriter(run_dir, purge_step=frame + 1 if resumed else None)
    if not resumed:
        table = "\n".join(f"|{key}|{value}|" for key, value in vars(args).items())
        writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + table)
    print(f"{'resuming' if resumed else 'run'} {run_name} on {device}: {args.env_id}, frame {frame} of ", end="")
    print(f"{args.total_timesteps}; logs in {run_dir}; {memory}")

    def log_evaluation(frame):
        """Evaluates and logs at `frame`; an evaluation cut short by a stop request is redone on resume."""
        nonlocal last_eval, window_time, pending_eval, eval_seconds
        eval_start = time.time()
        video_path = f"videos/{run_name}/eval_{frame}.mp4" if args.capture_video else None
        step, stopping = frame // args.action_repeat, lambda: stop.signal is not None
        returns = evaluate(agent, eval_env, args.num_eval_episodes, step, video_path, interrupted=stopping)
        pending_eval = frame if returns is None else None
        if returns is not None:
            last_eval, eval_seconds = float(np.mean(returns)), time.time() - eval_start
            writer.add_scalar("eval/episodic_return", last_eval, frame)
            print(f"frame {frame}: eval return {last_eval:.1f}")
        window_time += time.time() - eval_start  # SPS measures training, not evaluation

    def write_checkpoint(global_step):
        check_finite(agent, global_step * args.action_repeat)
        prefetched = prefetcher.state_dict() if args.checkpoint_replay else None  # first: it holds the replay's lock
        replay = rb.state_dict() if args.checkpoint_replay else None
        rng = rng_state((env, eval_env))
        payload = {"args": vars(args), "global_step": global_step, "agent": agent.state_dict(), "replay": replay}
        payload.update(prefetched=prefetched, rng=rng, last_eval=last_eval, pending_eval=pending_eval)
        kept = f"the checkpoint of frame {last_checkpoint_frame} is kept" if last_checkpoint_frame else "none is kept"
        save_checkpoint(os.path.join(run_dir, CHECKPOINT), payload, kept)

    # Resumed without the replay: collect `learning_starts` frames anew before updating.
    updates_start = frame + args.learning_starts if resumed and rb.num_transitions == 0 else args.learning_starts
    eval_every_steps = max(args.eval_every // args.action_repeat, 1)
    start_time = window_time = time.time()
    window_start_frame = last_checkpoint_frame = frame
    metrics, stop, eval_seconds, waiting = {}, StopRequest(checkpoints=args.checkpoint_every > 0), 0.0, False
    try:
        if pending_eval is not None:  # frame 0 of a new run, or an evaluation a stop request cut short
            log_evaluation(pending_eval)
        obs, episode_return, episode_steps = env.reset(), 0.0, 0
        rb.start_episode(env.frame)
        for global_step in range(start_step, total_steps):
            action = agent.act(obs, global_step, eval_mode=False)
            if global_step * args.action_repeat >= updates_start and global_step % args.update_every_steps == 0:
                if prefetcher.can_supply():
                    metrics, waiting = agent.update(prefetcher.next(), global_step), False
                elif not waiting:  # e.g. --learning-starts shorter than an episode: wait for a whole one
                    print(f"frame {global_step * args.action_repeat}: updates wait for a complete episode to sample")
                    waiting = True

            obs, reward, discount, done = env.step(action)
            rb.add(action, reward, discount, env.frame)
            episode_return += reward
            episode_steps += 1
            frame = (global_step + 1) * args.action_repeat
            if (global_step + 1) % eval_every_steps == 0 or global_step + 1 == total_steps:
                log_evaluation(frame)
            if not done:
                continue

            rb.end_episode()
            sps = (frame - window_start_frame) / (time.time() - window_time)
            writer.add_scalar("charts/episodic_return", episode_return, frame)
            writer.add_scalar("charts/episodic_length", episode_steps * args.action_repeat, frame)
            writer.add_scalar("charts/SPS", sps, frame)
            for tag, tensor in metrics.items():  # the latest update's metrics: read once per episode
                value = tensor.item()
                writer.add_scalar(tag, value, frame)
                if not math.isfinite(value):
                    raise RunError(
                        f"non-finite {tag} ({value}) at frame {frame}; stopping without checkpointing "
                        f"(the last checkpoint, at frame {last_checkpoint_frame}, is kept)"
                    )
            # time left: only once a whole episode with updates was timed; the evaluations still to come included
            timed = window_start_frame >= updates_start and not waiting
            evaluations_left = (args.total_timesteps - frame) // args.eval_every
            eta = (args.total_timesteps - frame) / sps + evaluations_left * eval_seconds if timed else float("nan")
            print(
                f"frame {frame}/{args.total_timesteps} ({100 * frame / args.total_timesteps:.1f}%) | "
                f"return {episode_return:.1f} | SPS {sps:.0f} | last eval {last_eval:.1f} | "
                f"elapsed {format_duration(time.time() - start_time)} | left {format_duration(eta)}"
            )
            checkpoint_due = args.checkpoint_every and frame // args.checkpoint_every > last_checkpoint_frame // (
                args.checkpoint_every
            )
            if args.checkpoint_every and (checkpoint_due or stop.signal):
                write_checkpoint(global_step + 1)
                last_checkpoint_frame = frame
            if stop.signal:
                name = signal.Signals(stop.signal).name
                if args.checkpoint_every:
                    print(f"stopped by {name} with a checkpoint at frame {frame}; resume with --resume {run_dir}")
                else:
                    print(f"stopped by {name} at frame {frame}; checkpoints are off, so there is nothing to resume")
                raise SystemExit(128 + stop.signal)
            window_time, window_start_frame = time.time(), frame
            obs, episode_return, episode_steps = env.reset(), 0.0, 0
            rb.start_episode(env.frame)

        elapsed = time.time() - start_time
        done_frames = args.total_timesteps - start_step * args.action_repeat
        print(
            f"done: {done_frames} frames in {elapsed:.0f} s ({done_frames / elapsed:.0f} frames/s with "
            f"evaluations); last eval return {last_eval:.1f}"
        )
        if args.checkpoint_every:  # a last episode cut short by the budget is not kept
            write_checkpoint(total_steps)
        if args.save_model:
            model_path = f"{run_dir}/{args.exp_name}.cleanrl_model"
            saved = {"args": vars(args), "obs_shape": list(env.observation_shape), "action_dim": env.action_dim}
            torch.save({**saved, **agent.state_dict(optimizers=False)}, model_path)
            print(f"model saved to {model_path}")
    finally:
        writer.close()
        if args.track:
            wandb.finish()


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except RunError as error:  # one clear line and a non-zero exit
        raise SystemExit(f"error: {error}")
