# DrQ-v2 (Yarats et al., 2021, arXiv 2107.09645): data-augmented actor-critic for continuous control from pixels.
# One self-contained file: copy it anywhere and run it. It reads in the algorithm's order: settings, environment,
# replay, networks, agent (losses and update), training loop (main). Below main, under one banner, the run machinery
# (argument checks, CUDA graphs, memory, logs, checkpoints, signals): none of it changes what is learned. Blocks marked
# `# --- shared: ... ---` are the same, byte for byte, in taco_continuous_action.py (a test keeps them so).
# docs/drqv2.md explains each numbered detail.
import ast
import contextlib
import copy
import ctypes
import dataclasses
import errno
import fcntl
import glob
import hashlib
import math
import os
import pickle
import random
import re
import resource
import signal
import socket
import sys
import threading
import time
import zipfile
from collections import deque
from dataclasses import dataclass
from typing import Annotated, Literal

os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering; must be set before dm_control is imported

import numpy as np
import torch
import torch.nn.functional as F
import tyro
from torch import nn
from torch.utils.tensorboard import SummaryWriter

# ----------------------------------------------------------------------------------------------------------------------
# Settings: the command line (every field is a flag, `--help` lists them) and the published per-task presets

PRESET = tyro.conf.arg(help_behavior_hint="")  # a field the task's preset fills: its docstring gives the defaults


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (part of the run name): letters, digits, `.`, `_` and `-`"""
    seed: int = 1
    """seed of the experiment (python, numpy, torch and the environment)"""
    torch_deterministic: bool = True
    """if toggled, sets `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, uses CUDA when a GPU is available (without one: runs on the CPU and prints a warning)"""
    track: bool = False
    """if toggled, logs to Weights and Biases with this file, the whole algorithm (offline: WANDB_MODE=offline)"""
    wandb_project_name: str = "drqv2"
    """the wandb project name"""
    wandb_entity: str | None = None
    """the entity (team) of the wandb project"""
    capture_video: bool = False
    """if toggled, writes the first episode of each evaluation to `videos/{run_name}/eval_{frame}.mp4`"""
    save_model: bool = False
    """if toggled, saves the weights and the Args to `runs/{run_name}/{exp_name}.cleanrl_model` at the end"""

    # Environment (one frame = one physics step; an agent step is `action_repeat` frames)
    env_id: str = "quadruped_run"
    """the DeepMind Control task, `domain_task` (e.g. `cartpole_swingup`, `cup_catch`, `reach_duplo`)"""
    frame_stack: int = 3
    """number of consecutive renders stacked into one observation"""
    action_repeat: int = 2
    """frames per agent step; rewards are summed over them"""
    max_episode_frames: Annotated[int | None, PRESET] = None
    """cut episodes after this many frames (default: the task's time limit, 1000 frames); for tests and debugging"""
    total_timesteps: Annotated[int | None, PRESET] = None
    """total environment frames to train for (default: the task preset's: 1.1M easy, 3.1M medium, 30.1M hard)"""
    learning_starts: int = 4000
    """frames collected before the first update"""
    eval_every: int = 10000
    """evaluate every this many frames (and once at the end)"""
    num_eval_episodes: int = 10
    """episodes per evaluation, acting with the policy's mean action"""

    # Speed options: off by default until a GPU learning run shows they do no harm (docs/speed.md)
    amp: Literal["none", "bf16"] = "none"
    """`bf16`: forward passes in bfloat16 autocast (a CPU needs avx512_bf16); DrQ-v2 learned as in fp32 (README)"""
    compile: bool = False
    """if toggled, compiles the networks with torch.compile"""
    cudagraphs: bool = False
    """if toggled (CUDA only), records the whole update once as a CUDA graph and replays it: one launch per update"""
    tf32: bool = True
    """on CUDA, fp32 convolutions may use TF32 (PyTorch's default, so the published code's); --no-tf32: full fp32"""
    replay_device: Literal["auto", "cpu", "cuda"] = "auto"
    """where the replay's frames live (same batches on either); `auto`: the GPU if they fit in half its free memory"""

    # Checkpoints (see docs/long-runs.md)
    checkpoint_every: int = 100_000
    """runs/{run_name}/checkpoint.pt each this many frames (at an episode end), at the end, on stop signals; 0: never"""
    checkpoint_replay: bool = True
    """if toggled, checkpoints hold the replay (21.4 kB a transition); else a resumed run refills it first"""
    resume: str | None = None
    """continue a run with its settings: its folder, or `auto` (newest of this env_id, exp_name, seed, or a new one)"""

    # Algorithm
    buffer_size: Annotated[int | None, PRESET] = None
    """replay capacity in transitions (default: 1e6; 1e5 for quadruped_run)"""
    batch_size: Annotated[int | None, PRESET] = None
    """batch size of every update (default: 256; 512 for walker_*)"""
    nstep: Annotated[int | None, PRESET] = None
    """n of the n-step return (default: 3; 1 for walker_*)"""
    gamma: float = 0.99
    """the discount factor gamma"""
    learning_rate: Annotated[float | None, PRESET] = None
    """Adam learning rate of the encoder, actor and critic (default: 1e-4; 8e-5 for humanoid_*)"""
    feature_dim: Annotated[int | None, PRESET] = None
    """width of the actor's and critic's trunk output (default: 50; 100 for humanoid_*)"""
    hidden_dim: int = 1024
    """width of the hidden layers of the actor and critic MLPs"""
    tau: float = 0.01
    """Polyak averaging rate of the target critic"""
    update_every_steps: int = 2
    """update the agent every this many agent steps"""
    num_expl_steps: int = 2000
    """agent steps of uniformly random actions at the start"""
    stddev_schedule: Annotated[str | None, PRESET] = None
    """exploration std: a number or `linear(init,final,duration)` in agent steps (default: the task preset's)"""
    stddev_clip: float = 0.3
    """clip of the policy noise when sampling actions for the losses"""


# The published runs' settings (detail 2): DEFAULTS hold for every task except the OVERRIDES of some task families.
DEFAULTS = {"buffer_size": 1_000_000, "batch_size": 256, "nstep": 3, "learning_rate": 1e-4, "feature_dim": 50}
OVERRIDES = {  # task name prefix: the settings that differ from DEFAULTS
    "walker_": {"nstep": 1, "batch_size": 512},
    "quadruped_run": {"buffer_size": 100_000},
    "humanoid_": {"learning_rate": 8e-5, "feature_dim": 100},
}

# --- shared: presets ---
# A task's difficulty sets the exploration std's decay (agent steps) and the budget (frames).
PRESETS = {"easy": (100_000, 1_100_000), "medium": (500_000, 3_100_000), "hard": (2_000_000, 30_100_000)}
TASKS = """
easy    cartpole_balance cartpole_balance_sparse cartpole_swingup cup_catch finger_spin hopper_stand pendulum_swingup
easy    walker_stand walker_walk
medium  acrobot_swingup acrobot_swingup_sparse cartpole_swingup_sparse cheetah_run finger_turn_easy finger_turn_hard
medium  hopper_hop quadruped_run quadruped_walk reach_duplo reacher_easy reacher_hard walker_run
hard    humanoid_stand humanoid_walk humanoid_run manipulator_bring_ball
"""
TASK_PRESET = {task: row.split()[0] for row in TASKS.strip().splitlines() for task in row.split()[1:]}


def resolve_args(args):
    """Fills every setting left unset (None) from the task's preset (what the user set wins), then checks them."""
    if args.env_id not in TASK_PRESET:
        raise RunError(f"unknown env_id {args.env_id!r}; valid tasks: {', '.join(sorted(TASK_PRESET))}")
    decay, frames = PRESETS[TASK_PRESET[args.env_id]]
    preset = {**DEFAULTS, "total_timesteps": frames, "stddev_schedule": f"linear(1.0,0.1,{decay})"}
    for prefix, settings in OVERRIDES.items():
        if args.env_id.startswith(prefix):
            preset.update(settings)
    unset = {key: value for key, value in preset.items() if getattr(args, key) is None}
    args = dataclasses.replace(args, **unset)
    validate_args(args)
    return args


def parse_schedule(spec: str):
    """`0.2`: constant; `linear(init,final,duration)`: linear over agent steps, then constant."""
    number = r"\s*([-+0-9.eE]+)\s*"
    match = re.fullmatch(rf"linear\({number},{number},{number}\)", spec)
    try:
        values = [float(group) for group in match.groups()] if match else [float(spec), float(spec), 1.0]
    except ValueError:
        values = [math.nan] * 3
    init, final, duration = values
    if not all(math.isfinite(value) and value >= 0 for value in values) or duration == 0:
        raise RunError(
            f"--stddev-schedule must be a number >= 0 or 'linear(init,final,duration)' of such, got {spec!r}"
        )
    return lambda step: init + (final - init) * min(step / duration, 1.0)


# --- end shared ---


# ----------------------------------------------------------------------------------------------------------------------
# Environment (detail 1): a dm_control task seen through 84x84 renders, action repeat, stacked frames, channels first


# --- shared: environment ---
class NonFiniteAction(FloatingPointError):
    """An action with a NaN or an infinity in it (a policy gone non-finite), which MuJoCo cannot step with."""


class DMCPixelEnv:
    def __init__(self, env_id, seed, action_repeat=2, frame_stack=3, max_episode_frames=None, size=84):
        try:  # dm_control picks the renderer at import; a bad MUJOCO_GL fails there or at the first render
            from dm_control import manipulation, suite

            if env_id == "reach_duplo":  # the manipulation task renders its own 84x84 pixels
                self._env = manipulation.load("reach_duplo_vision", seed=seed)
                self._camera = None
            else:
                domain, task = env_id.split("_", 1)
                domain = "ball_in_cup" if domain == "cup" else domain
                self._env = suite.load(domain, task, task_kwargs={"random": seed}, visualize_reward=False)
                self._camera = 2 if domain == "quadruped" else 0
            self._env.physics.render(height=8, width=8)
        except Exception as error:
            backend = os.environ.get("MUJOCO_GL")
            needs = {"egl": "libegl1 and libgl1-mesa-dri, or NVIDIA's driver", "osmesa": "libosmesa6"}.get(backend)
            cause = f"it needs {needs}" if needs else "an unknown backend"
            raise RunError(
                f"MuJoCo rendering could not start with MUJOCO_GL={backend} ({cause}; {first_line(error)}). Try "
                "MUJOCO_GL=egl (NVIDIA driver, or Mesa on CPU-only machines: apt-get install libegl1 libgl1-mesa-dri)"
            ) from error
        spec = self._env.action_spec()
        # Actions in [-1, 1] are rescaled as the published code's wrappers do, in the same order and dtypes: its
        # float32 action spec, then dm_control's action_scale.Wrapper; other roundings make trajectories drift apart.
        self._action_low = spec.minimum.astype(np.float32)
        self._action_scale = (spec.maximum.astype(np.float32) - self._action_low) / (np.array(1.0) - np.array(-1.0))
        self._action_dtype = spec.dtype
        self.action_dim = spec.shape[0]
        self.frame_shape = (3, size, size)
        self.observation_shape = (3 * frame_stack, size, size)
        self._size = size
        self._action_repeat = action_repeat
        self._max_episode_frames = max_episode_frames
        self._frames = deque(maxlen=frame_stack)
        self.frame = None  # the latest render, (3, size, size) uint8: what the replay stores
        self.episode_frames = 0  # frames of the running episode so far

    @property
    def random_state(self) -> np.random.RandomState:
        """The task's random state: initial states, targets and noise of the episodes come from it."""
        return self._env.task.random if self._camera is not None else self._env.random_state

    def _observe(self, time_step, copies=1) -> np.ndarray:
        if self._camera is None:
            pixels = time_step.observation["front_close"][0]
        else:
            pixels = self._env.physics.render(height=self._size, width=self._size, camera_id=self._camera)
        self.frame = np.ascontiguousarray(pixels.transpose(2, 0, 1))
        self._frames.extend([self.frame] * copies)
        return np.concatenate(self._frames, axis=0)

    def reset(self) -> np.ndarray:
        self.episode_frames = 0
        return self._observe(self._env.reset(), copies=self._frames.maxlen)  # the first render fills every slot

    def step(self, action: np.ndarray):
        """Returns (stacked observation, summed reward, discount, episode over)."""
        if not np.isfinite(action).all():
            raise NonFiniteAction(f"action ({action})")
        scaled = self._action_low + self._action_scale * (np.asarray(action) - np.array(-1.0))
        action = scaled.astype(np.float32, copy=False).astype(self._action_dtype)
        reward = 0.0
        discount = 1.0
        for _ in range(self._action_repeat):
            time_step = self._env.step(action)
            reward += (time_step.reward or 0.0) * discount
            discount *= time_step.discount
            self.episode_frames += 1
            done = time_step.last() or self.episode_frames == self._max_episode_frames
            if done:
                break
        return self._observe(time_step), reward, discount, done


# --- end shared ---


# ----------------------------------------------------------------------------------------------------------------------
# Replay (details 3-5): whole episodes in a ring of frames stored once; stacks and n-step returns built at sampling


class ReplayBuffer:
    """FIFO replay of whole episodes. Slot s of the ring holds frame o_t and, unless it ends its episode, the
    transition (a_t, r_t, d_t) taken from it; only complete episodes are sampled. The frames live on `device`, the
    rest (and the drawing of indices) on the host, so every device draws the same batches. The running episode's
    frames wait on the host and reach the ring in one copy when it ends."""

    def __init__(self, capacity, frame_shape, action_dim, frame_stack, nstep, gamma, seed=0, device="cpu"):
        self.capacity = capacity
        self.frame_stack = frame_stack
        self.nstep = nstep
        self.gamma = gamma
        self.window = nstep  # steps after t that a sample at t reads
        self.device = torch.device(device)
        self.num_slots = self.slots(capacity)
        self.frames = torch.empty((self.num_slots, *frame_shape), dtype=torch.uint8, device=self.device)
        self.actions = np.zeros((self.num_slots, action_dim), dtype=np.float32)
        self.rewards = np.zeros(self.num_slots, np.float32)
        self.discounts = np.zeros(self.num_slots, np.float32)
        self.episodes = deque()  # (first slot, transitions) of the complete episodes, oldest first; slots count up
        self.num_transitions = 0
        self._next_slot = 0
        self._episode_start = None  # first slot of the running episode
        self._episode_frames = []  # its frames, on the host until it ends
        self._table = None  # what sampling needs of the episode table, rebuilt when it changes
        self.rng = np.random.default_rng(seed)

    @staticmethod
    def slots(capacity: int) -> int:
        """An episode of T transitions takes T + 1 slots: 1% extra holds the last frames (episodes of 100+ steps)."""
        return capacity + capacity // 100 + 1

    @classmethod
    def memory(cls, capacity, frame_shape, action_dim) -> int:
        """Bytes a replay of `capacity` transitions allocates: frame slots, each with an action, reward and discount."""
        return cls.slots(capacity) * (int(np.prod(frame_shape)) + 4 * (action_dim + 2))

    def _claim_slot(self, frame):
        while self.episodes and self.episodes[0][0] <= self._next_slot - self.num_slots:
            self._evict_oldest()  # the slot still holds the oldest episode
        if self._next_slot - self._episode_start >= self.num_slots:
            raise ValueError(f"an episode longer than the replay ({self.num_slots} frames) cannot be stored")
        self._episode_frames.append(frame)
        self._next_slot += 1

    def _evict_oldest(self):
        self.num_transitions -= self.episodes.popleft()[1]
        self._table = None

    def start_episode(self, frame: np.ndarray):
        """Stores the first frame of a new episode (an unfinished previous episode is dropped)."""
        if self._episode_start is not None:
            self._next_slot = self._episode_start
        self._episode_start = self._next_slot
        self._episode_frames = []
        self._claim_slot(frame)

    def add(self, action, reward, discount, next_frame):
        """Stores the transition from the latest frame and the frame it led to."""
        slot = (self._next_slot - 1) % self.num_slots
        self.actions[slot] = action
        self.rewards[slot] = reward
        self.discounts[slot] = discount
        self._claim_slot(next_frame)

    def end_episode(self):
        """Writes the episode's frames into the ring (which may wrap), makes it sampleable, evicts beyond capacity."""
        frames = torch.from_numpy(np.stack(self._episode_frames))
        first = self._episode_start % self.num_slots
        head = min(len(frames), self.num_slots - first)
        self.frames[first : first + head] = frames[:head].to(self.device)
        self.frames[: len(frames) - head] = frames[head:].to(self.device)
        transitions = self._next_slot - 1 - self._episode_start
        self.episodes.append((self._episode_start, transitions))
        self.num_transitions += transitions
        self._episode_start = None
        self._episode_frames = []
        self._table = None
        while self.num_transitions > self.capacity:
            self._evict_oldest()

    def state_dict(self) -> dict:
        """The used slots as host tensors, the episode table and the RNG (an unfinished episode is dropped)."""
        end = self._next_slot if self._episode_start is None else self._episode_start
        used = min(end, self.num_slots)
        # a slice of a torch tensor would save the whole ring; a numpy view's tensor holds only the used slots
        frames = torch.from_numpy(self.frames.numpy()[:used]) if self.device.type == "cpu" else self.frames[:used].cpu()
        arrays = {name: torch.from_numpy(getattr(self, name)[:used]) for name in ("actions", "rewards", "discounts")}
        counters = {"episodes": list(self.episodes), "num_transitions": self.num_transitions, "next_slot": end}
        return {"frames": frames, **arrays, **counters, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict):
        self.frames[: len(state["frames"])] = state["frames"].to(self.device)
        for name in ("actions", "rewards", "discounts"):
            getattr(self, name)[: len(state[name])] = state[name].numpy()
        self.episodes = deque(tuple(episode) for episode in state["episodes"])
        self.num_transitions = state["num_transitions"]
        self._next_slot = state["next_slot"]
        self._episode_start = None
        self._episode_frames = []
        self._table = None
        self.rng.bit_generator.state = state["rng"]

    def _sample_table(self):
        """Per complete episode: its first slot, and the running count of its transitions that can be sampled."""
        if self._table is None:
            starts = np.array([start for start, _ in self.episodes], dtype=np.int64)
            valid = np.array([max(n - self.window + 1, 0) for _, n in self.episodes], dtype=np.int64)
            self._table = (starts, np.cumsum(valid))
        return self._table

    def can_sample(self) -> bool:
        cumulative = self._sample_table()[1]
        return len(cumulative) > 0 and cumulative[-1] > 0

    def sample_indices(self, batch_size):
        """Slots t drawn uniformly over every transition whose window lies in its episode, and the episodes' starts."""
        if not self.can_sample():
            raise ValueError("the replay holds no complete episode long enough to sample from")
        starts, cumulative = self._sample_table()
        draws = self.rng.integers(0, cumulative[-1], size=batch_size)
        episode = np.searchsorted(cumulative, draws, side="right")
        return starts[episode] + draws - np.r_[0, cumulative][episode], starts[episode]

    def _gather_stacks(self, episode_starts, slots: list):
        """The stacked observations at each array of slots (an episode's first frame repeats before its start),
        gathered in one pass on the replay's device: uint8 tensors of shape (B, frame_stack * 3, H, W)."""
        offsets = np.arange(-self.frame_stack + 1, 1)
        index = np.concatenate([np.maximum(s[:, None] + offsets, episode_starts[:, None]) for s in slots])
        index %= self.num_slots
        if self.device.type == "cpu":  # numpy's gather is several times faster than torch's on the CPU
            frames = torch.from_numpy(self.frames.numpy()[index])
        else:
            frames = self.frames[torch.from_numpy(index).to(self.device)]
        stacks = frames.reshape(len(index), -1, frames.shape[-2], frames.shape[-1])
        return stacks.split(len(episode_starts))

    def sample(self, batch_size):
        """A batch on the replay's device: obs, action, n-step reward, discount (gamma^n times the env's), next_obs."""
        slots, episode_starts = self.sample_indices(batch_size)
        reward = np.zeros((batch_size, 1), np.float32)
        discount = np.ones((batch_size, 1), np.float32)
        for step in ((slots[:, None] + i) % self.num_slots for i in range(self.nstep)):
            reward += discount * self.rewards[step]
            discount *= self.discounts[step] * self.gamma
        obs, next_obs = self._gather_stacks(episode_starts, [slots, slots + self.nstep])
        arrays = {"action": self.actions[slots % self.num_slots], "reward": reward, "discount": discount}
        return {"obs": obs, "next_obs": next_obs, **{k: torch.from_numpy(v).to(self.device) for k, v in arrays.items()}}


# ----------------------------------------------------------------------------------------------------------------------
# Networks and augmentation (details 6-8): the encoder of stacked frames, its random shifts, the actor, the twin critic


# --- shared: networks ---
def weight_init(m):
    """Orthogonal weights (ReLU gain for convolutions), zero biases."""
    if isinstance(m, (nn.Linear, nn.Conv2d)):
        nn.init.orthogonal_(m.weight, nn.init.calculate_gain("relu") if isinstance(m, nn.Conv2d) else 1.0)
        nn.init.zeros_(m.bias)


def random_shift(x: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """Shifts each image by a random whole number of pixels in [-pad, pad] per axis, replicating the border: what the
    published replicate padding and bilinear grid_sample compute, as one gather that also works on uint8 images."""
    n, c, h, w = x.shape
    shift = torch.randint(0, 2 * pad + 1, (n, 2), device=x.device) - pad
    rows = (torch.arange(h, device=x.device) + shift[:, :1]).clamp(0, h - 1)  # clamping = replicate padding
    cols = (torch.arange(w, device=x.device) + shift[:, 1:]).clamp(0, w - 1)
    pixels = (rows[:, :, None] * w + cols[:, None, :]).reshape(n, 1, h * w)  # source pixel of each output pixel
    return x.reshape(n, c, h * w).gather(2, pixels.expand(n, c, h * w)).reshape(n, c, h, w)


class Encoder(nn.Module):
    def __init__(self, obs_shape):
        super().__init__()
        # in-place ReLUs: no extra activation buffer (the convolutions' backward needs none)
        self.convnet = nn.Sequential(
            nn.Conv2d(obs_shape[0], 32, 3, stride=2),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, 32, 3, stride=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, 32, 3, stride=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, 32, 3, stride=1),
            nn.Flatten(),  # before the last ReLU, the same numbers: its backward then reads one memory layout (faster)
            nn.ReLU(inplace=True),
        )
        self.repr_dim = 32 * ((obs_shape[-1] - 3) // 2 + 1 - 6) ** 2  # 39 200 for 84x84 inputs
        self.apply(weight_init)
        self.convnet.to(memory_format=torch.channels_last)  # faster convolutions on CPU and GPU

    def forward(self, obs):
        """uint8 (or float) images in [0, 255] -> features in the usual (channel, row, column) order."""
        # under --amp bf16 the images go straight to bfloat16: a cast anywhere else costs 4-9% more (docs/speed.md)
        autocast = torch.is_autocast_enabled(obs.device.type)
        dtype = torch.get_autocast_dtype(obs.device.type) if autocast else torch.float32
        x = obs.contiguous(memory_format=torch.channels_last).to(dtype, copy=True)
        return self.convnet(x.div_(255.0).sub_(0.5))  # in place: the same numbers, no new buffers


def trunk(repr_dim, feature_dim):
    return nn.Sequential(nn.Linear(repr_dim, feature_dim), nn.LayerNorm(feature_dim), nn.Tanh())


def mlp(in_dim, hidden_dim, out_dim):
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim),
        nn.ReLU(),
        nn.Linear(hidden_dim, hidden_dim),
        nn.ReLU(),
        nn.Linear(hidden_dim, out_dim),
    )


class Actor(nn.Module):
    def __init__(self, repr_dim, action_dim, feature_dim, hidden_dim):
        super().__init__()
        self.trunk = trunk(repr_dim, feature_dim)
        self.policy = mlp(feature_dim, hidden_dim, action_dim)
        self.apply(weight_init)

    def forward(self, features):
        """The policy's mean action in [-1, 1]; its std comes from the schedule."""
        # tanh in fp32 under --amp bf16 too: bf16's is exactly +-1, with no gradient, from |x| = 3.5 on (fp32's from 9)
        return torch.tanh(self.policy(self.trunk(features)).float())


class Critic(nn.Module):
    def __init__(self, repr_dim, action_dim, feature_dim, hidden_dim):
        super().__init__()
        self.trunk = trunk(repr_dim, feature_dim)
        self.q1 = mlp(feature_dim + action_dim, hidden_dim, 1)
        self.q2 = mlp(feature_dim + action_dim, hidden_dim, 1)
        self.apply(weight_init)

    def forward(self, features, action):
        h_action = torch.cat([self.trunk(features), action], dim=-1)
        return self.q1(h_action), self.q2(h_action)


def sample_action(mean, std, clip=None):
    """A ~ Normal(mean, std) with the noise clipped to +-clip, clamped into [-1, 1] with a straight-through gradient."""
    noise = torch.randn_like(mean) * std
    action = mean + (noise if clip is None else noise.clamp(-clip, clip))
    return action - action.detach() + action.detach().clamp(-1.0 + 1e-6, 1.0 - 1e-6)


@torch.no_grad()
def soft_update(target: nn.Module, source: nn.Module, tau: float):
    """target <- tau * source + (1 - tau) * target, as one fused lerp over the parameters."""
    torch._foreach_lerp_(list(target.parameters()), list(source.parameters()), tau)


# --- end shared ---


# ----------------------------------------------------------------------------------------------------------------------
# Agent (details 9-10): the networks and their optimizers, acting, and the update with its losses


class Agent:
    def __init__(self, obs_shape, action_dim, args: Args, device):
        self.args = args
        self.device = device
        self.encoder = Encoder(obs_shape).to(device)
        repr_dim = self.encoder.repr_dim
        self.actor = Actor(repr_dim, action_dim, args.feature_dim, args.hidden_dim).to(device)
        self.critic = Critic(repr_dim, action_dim, args.feature_dim, args.hidden_dim).to(device)
        self.critic_target = copy.deepcopy(self.critic)
        adam = {"lr": args.learning_rate, "capturable": args.cudagraphs}  # capturable: Adam's step count on the GPU
        self.encoder_opt = torch.optim.Adam(self.encoder.parameters(), **adam)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), **adam)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), **adam)
        self.stddev = parse_schedule(args.stddev_schedule)
        if args.compile:
            for network in [part for part in vars(self).values() if isinstance(part, nn.Module)]:
                network.compile()  # keeps the state_dict keys
        self.cuda_graph = CudaGraph(self) if args.cudagraphs else None  # --cudagraphs (below main)

    def autocast(self):
        """bf16 autocast under --amp bf16. Each region ends before an optimizer step and keeps no cache of bf16
        weights: with one, a forward after a step would use the weights from before it."""
        return torch.autocast(self.device.type, torch.bfloat16, enabled=self.args.amp == "bf16", cache_enabled=False)

    @torch.no_grad()
    def act(self, obs: np.ndarray, step: int, eval_mode: bool) -> np.ndarray:
        """The mean action for evaluation; else uniform during the first steps, then scheduled exploration noise."""
        mean = self.actor(self.encoder(torch.as_tensor(obs, device=self.device)[None]))
        if eval_mode:
            return mean[0].cpu().numpy()
        if step < self.args.num_expl_steps:
            return torch.empty_like(mean).uniform_(-1.0, 1.0)[0].cpu().numpy()
        return sample_action(mean, self.stddev(step))[0].cpu().numpy()

    def update(self, batch: dict, step: int) -> dict:
        """One update on a batch on the device. Returns {TensorBoard tag: tensor}; nothing waits for the GPU."""
        return (self.cuda_graph or self.compute_update)(batch, self.stddev(step))

    def compute_update(self, batch: dict, std) -> dict:
        with self.autocast():
            obs = self.encoder(random_shift(batch["obs"]))
            with torch.no_grad():
                next_obs = self.encoder(random_shift(batch["next_obs"]))
        metrics = self.update_critic(obs, batch["action"], batch["reward"], batch["discount"], next_obs, std)
        metrics.update(self.update_actor(obs.detach(), std))
        soft_update(self.critic_target, self.critic, self.args.tau)
        return {**metrics, "charts/actor_std": torch.as_tensor(std)}

    def update_critic(self, obs, action, reward, discount, next_obs, std):
        with self.autocast():
            with torch.no_grad():
                next_action = sample_action(self.actor(next_obs), std, self.args.stddev_clip)
                target_q1, target_q2 = self.critic_target(next_obs, next_action)
                target_q = reward + discount * torch.min(target_q1, target_q2)
            q1, q2 = self.critic(obs, action)
        critic_loss = F.mse_loss(q1.float(), target_q) + F.mse_loss(q2.float(), target_q)  # fp32: bf16 keeps 3 digits
        self.encoder_opt.zero_grad(set_to_none=True)
        self.critic_opt.zero_grad(set_to_none=True)
        critic_loss.backward()
        self.critic_opt.step()
        self.encoder_opt.step()
        return {"losses/critic_loss": critic_loss.detach(), "losses/q_values": q1.detach().float().mean()}

    def update_actor(self, obs, std):
        with self.autocast():
            action = sample_action(self.actor(obs), std, self.args.stddev_clip)
            q1, q2 = self.critic(obs, action)
            actor_loss = -torch.min(q1, q2).float().mean()  # fp32: bf16 keeps 3 significant digits
        self.actor_opt.zero_grad(set_to_none=True)
        actor_loss.backward()
        self.actor_opt.step()
        return {"losses/actor_loss": actor_loss.detach()}


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation and training loop (detail 11): act, update when due, step the environment; evaluate, log, checkpoint


def evaluate(agent, env, num_episodes: int, video_path: str | None = None) -> list:
    """Returns of episodes acting with the mean action (the first one filmed to `video_path`, if given, and sent to
    the wandb run, if one is tracking)."""
    returns = []
    video = []
    for episode in range(num_episodes):
        obs = env.reset()
        done = False
        returns.append(0.0)
        while not done:
            if video_path and episode == 0:
                video.append(env.frame.transpose(1, 2, 0).repeat(3, axis=0).repeat(3, axis=1))  # 84 -> 252 px
            obs, reward, _, done = env.step(agent.act(obs, step=0, eval_mode=True))
            returns[-1] += reward
    if video_path:
        import imageio

        os.makedirs(os.path.dirname(video_path), exist_ok=True)
        imageio.mimsave(video_path, video, fps=30, macro_block_size=4)
        wandb = sys.modules.get("wandb")  # imported by --track only
        if wandb is not None and wandb.run is not None:
            wandb.log({"videos/eval": wandb.Video(video_path, format="mp4")})
    return returns


def main(args: Args):
    run = Run(args)  # the settings (a resumed run's come from its checkpoint), device and memory checked; no file yet
    args = run.args
    if run.finished:
        return
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    env = DMCPixelEnv(args.env_id, args.seed, args.action_repeat, args.frame_stack, args.max_episode_frames)
    eval_env = DMCPixelEnv(args.env_id, args.seed, args.action_repeat, args.frame_stack, args.max_episode_frames)
    agent = Agent(env.observation_shape, env.action_dim, args, run.device)
    rb = ReplayBuffer(
        args.buffer_size,
        env.frame_shape,
        env.action_dim,
        args.frame_stack,
        args.nstep,
        args.gamma,
        args.seed,
        device=run.replay_device,
    )
    eval_every_steps = max(args.eval_every // args.action_repeat, 1)
    # start() puts a resumed run back as its checkpoint left it, takes the run directory, opens the logs and catches
    # stop signals; leaving the block, the run writes its final checkpoint (and --save-model's file)
    with run.start(agent, rb, [env, eval_env]) as writer:
        start_step = run.start_step  # 0, or the agent step a resumed run's checkpoint was written at
        total_steps = run.total_steps  # --total-timesteps frames in agent steps of --action-repeat frames
        updates_start = run.updates_start  # --learning-starts frames; resumed without its replay, that many after
        if run.new:  # frame 0 is evaluated first
            run.last_eval = float(np.mean(evaluate(agent, eval_env, args.num_eval_episodes, run.video_path(0))))
            writer.add_scalar("eval/episodic_return", run.last_eval, 0)
            print(f"frame 0: eval return {run.last_eval:.1f}")
            run.checkpoint_when_due(0, {})  # a stop signal during that evaluation: checkpoint and exit now
        obs = env.reset()
        rb.start_episode(env.frame)
        episode_return = 0.0
        episode_start = time.time()
        metrics = {}
        for global_step in range(start_step, total_steps):
            action = agent.act(obs, global_step, eval_mode=False)
            due = global_step * args.action_repeat >= updates_start and global_step % args.update_every_steps == 0
            if due and rb.can_sample():  # (it cannot until a complete episode is stored)
                batch = {key: value.to(run.device) for key, value in rb.sample(args.batch_size).items()}
                metrics = agent.update(batch, global_step)

            obs, reward, discount, done = env.step(action)
            rb.add(action, reward, discount, env.frame)
            episode_return += reward
            frame = (global_step + 1) * args.action_repeat
            if (global_step + 1) % eval_every_steps == 0 or global_step + 1 == total_steps:
                eval_start = time.time()
                run.last_eval = float(np.mean(evaluate(agent, eval_env, args.num_eval_episodes, run.video_path(frame))))
                writer.add_scalar("eval/episodic_return", run.last_eval, frame)
                print(f"frame {frame}: eval return {run.last_eval:.1f}")
                episode_start += time.time() - eval_start  # SPS measures training, not evaluation
            if done:
                rb.end_episode()
                sps = env.episode_frames / (time.time() - episode_start)
                writer.add_scalar("charts/episodic_return", episode_return, frame)
                writer.add_scalar("charts/episodic_length", env.episode_frames, frame)
                writer.add_scalar("charts/SPS", sps, frame)
                for tag, value in metrics.items():  # the last update's losses
                    writer.add_scalar(tag, value, frame)
                print(run.progress(frame, episode_return, sps))
                run.checkpoint_when_due(global_step + 1, metrics)  # or asked to stop by a signal: then it exits
                metrics = {}
                obs = env.reset()
                rb.start_episode(env.frame)
                episode_return = 0.0
                episode_start = time.time()
        for tag, value in metrics.items():  # the losses of a last episode cut short by the budget
            writer.add_scalar(tag, value, run.total_frames)


# ======================================================================================================================
# Run machinery. Everything below serves the run, not the algorithm: argument checks, CUDA graphs, device and memory
# choice, logs, checkpoints and resume, the run directory's lock, stop signals, the progress line. None of it changes
# what an update computes.
# ======================================================================================================================


# --- shared: checks ---
def check_common_args(args, positive: list[str]) -> int:
    """Fails fast, before any environment is built, on settings that cannot work; returns an episode's agent steps."""
    value = vars(args)
    positive += ["frame_stack", "action_repeat", "total_timesteps", "eval_every", "num_eval_episodes", "buffer_size"]
    positive += ["batch_size", "nstep", "learning_rate", "feature_dim", "hidden_dim", "update_every_steps"]
    rules = [(name, value[name] is None or 0 < value[name] < math.inf, "must be positive, finite") for name in positive]
    rules += [(name, value[name] >= 0, "must be non-negative") for name in ("learning_starts", "num_expl_steps")]
    rules.append(("checkpoint_every", args.checkpoint_every >= 0, "must be non-negative"))
    rules += [(name, 0 < value[name] <= 1, "must be in (0, 1]") for name in ("gamma", "tau")]
    texts = [name for name, text in value.items() if isinstance(text, str)]  # they reach file names and the logs
    rules += [(name, value[name].isprintable(), "must hold no newline or other control character") for name in texts]
    rules.append(("stddev_clip", math.isfinite(args.stddev_clip) and args.stddev_clip >= 0, "must be finite and >= 0"))
    at_least_one_step = args.max_episode_frames is None or args.max_episode_frames >= args.action_repeat
    rules.append(("max_episode_frames", at_least_one_step, "must be at least --action-repeat"))
    rules.append(("total_timesteps", args.total_timesteps >= args.action_repeat, "must be at least --action-repeat"))
    rules.append(("seed", 0 <= args.seed < 2**32, "must be in [0, 2**32), as numpy's seeds"))
    name_ok = re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", args.exp_name)  # it names a directory and a model file
    rules.append(("exp_name", name_ok, "must start with a letter or digit and hold only those, '.', '_' and '-'"))
    rules.append(("exp_name", len(args.exp_name) <= 128, "must be at most 128 characters (a file name's part)"))
    for name, ok, requirement in rules:
        if not ok:
            raise RunError(f"--{name.replace('_', '-')} {requirement}, got {value[name]!r}")
    time_limit = 250 if args.env_id == "reach_duplo" else 1000  # the task's, in frames
    episode_steps = math.ceil(min(args.max_episode_frames or time_limit, time_limit) / args.action_repeat)
    stored = min(args.buffer_size, args.learning_starts // args.action_repeat)
    if args.batch_size > stored:
        raise RunError(
            f"--batch-size {args.batch_size} is larger than the {stored} transitions the replay holds when updates "
            f"start (--learning-starts {args.learning_starts} frames, --buffer-size {args.buffer_size})"
        )
    if args.buffer_size < episode_steps:
        raise RunError(f"--buffer-size {args.buffer_size} is smaller than one episode ({episode_steps} transitions)")
    parse_schedule(args.stddev_schedule)
    return episode_steps


# --- end shared ---


def validate_args(args: Args):
    episode_steps = check_common_args(args, positive=[])
    if args.nstep >= episode_steps:
        raise RunError(f"--nstep must be shorter than an episode ({episode_steps} agent steps)")


def update_memory(args) -> float:
    """Bytes a CPU run holds besides its replay: libraries, environments, networks, and the updates' batches and
    activations, by sample and stacked frame (set above what benchmarks/update_memory.py measures)."""
    return 0.9e9 + args.batch_size * (2.4e6 + 0.3e6 * args.frame_stack)


# --- shared: run machinery ---
class CudaGraph:
    """--cudagraphs: the whole update (forwards, backwards, optimizer steps, target update) recorded once as a CUDA
    graph, then replayed: one launch instead of hundreds. Each replay reads the batch and std copied into the graph's
    input tensors and overwrites the metrics it returned last time; random draws come from the CUDA generator."""

    def __init__(self, agent):
        self.agent = agent
        self.graph = None

    def __call__(self, batch: dict, std: float) -> dict:
        if self.graph is None:
            self.batch = {key: value.clone() for key, value in batch.items()}
            self.std = torch.full((), std, device=self.agent.device)
            self.capture()
        for key, value in batch.items():
            self.batch[key].copy_(value, non_blocking=True)
        self.std.fill_(std)
        self.graph.replay()
        return self.metrics

    def capture(self):
        # A warm-up update on a side stream sets up what a graph cannot (library handles, Adam's state); then the
        # agent's state (weights, tensors, optimizer states) and the random generator are put back in place.
        saved = copy.deepcopy(agent_state(self.agent))
        rng = torch.cuda.get_rng_state()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.agent.compute_update(self.batch, self.std)
        torch.cuda.current_stream().wait_stream(side)
        with torch.no_grad():
            for name, part in vars(self.agent).items():
                if isinstance(part, torch.optim.Optimizer):  # its state tensors stay: the graph will use these
                    for index, parameter in enumerate(p for group in part.param_groups for p in group["params"]):
                        before = saved[name]["state"].get(index, {})  # empty: no state before the warm-up
                        for key, tensor in part.state[parameter].items():
                            tensor.copy_(before.get(key, torch.zeros_like(tensor)))
                    part.zero_grad(set_to_none=True)
                elif name in saved:
                    load_agent_state(self.agent, {name: saved[name]})
        torch.cuda.set_rng_state(rng)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):  # other threads: TensorBoard's writer
            self.metrics = self.agent.compute_update(self.batch, self.std)


class RunError(ValueError):
    """A problem the user can fix (bad settings, a damaged checkpoint, no renderer): one clear line, non-zero exit."""


def first_line(error: Exception) -> str:
    return str(error).splitlines()[0][:200] if str(error) else type(error).__name__


def duration(seconds: float) -> str:
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m" if math.isfinite(seconds) else "-"


def configure_torch(args):
    """cuDNN's deterministic algorithms (--torch-deterministic), the precision of fp32 convolutions (--tf32), and
    freed memory kept in the process for reuse, not handed back to the system for the next update to fault in again."""
    if hasattr(libc := ctypes.CDLL(None), "gnu_get_libc_version"):  # glibc: same numbers, CPU updates up to 1.4x faster
        libc.mallopt(-4, 0)  # M_MMAP_MAX: no block mapped on its own, which freeing would unmap
        libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD: nor a heap top that freeing would trim
    torch.backends.cudnn.deterministic = args.torch_deterministic
    torch.backends.cudnn.allow_tf32 = args.tf32  # fp32 convolutions (--tf32); matmuls stay in full fp32
    torch.backends.cuda.matmul.allow_tf32 = False


def read_number(path: str, key: str = "", unit: int = 1) -> float:
    """The number after `key` at the start of a line of a file, times `unit`; infinite where there is none."""
    with contextlib.suppress(OSError, StopIteration, ValueError), open(path) as f:
        return unit * int(next(line[len(key) :].split()[0] for line in f if line.startswith(key)))
    return math.inf


def host_memory(proc: str = "/proc", cgroups: str = "/sys/fs/cgroup") -> tuple[float, float]:
    """(available, ceiling): the bytes this process may fill, and reserve at once: the tightest of the machine's, its
    cgroups' (a container's, Slurm's --mem; v2 or v1, the parents' too) and its address space's (ulimit -v)."""
    available = read_number(f"{proc}/meminfo", "MemAvailable:", 1024)
    ceiling = read_number(f"{proc}/meminfo", "MemTotal:", 1024) + read_number(f"{proc}/meminfo", "SwapTotal:", 1024)
    files = {"": ("memory.max", "memory.current"), "memory": ("memory.limit_in_bytes", "memory.usage_in_bytes")}
    with contextlib.suppress(OSError), open(f"{proc}/self/cgroup") as f:
        groups = [line.rstrip("\n").split(":", 2)[1:] for line in f]
    for controller, path in (group for group in groups if group[0] in files):
        while path:  # "/a/b", then "/a", then "": inf - inf (no limit there) is nan, which min() passes over
            folder = f"{cgroups}/{controller}{path}"
            limit, usage = (read_number(f"{folder}/{name}") for name in files[controller])
            available = min(available, limit - usage)
            path = path.rpartition("/")[0]
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]  # ulimit -v: what the process holds already counts against it
    room = math.inf if limit == resource.RLIM_INFINITY else limit - read_number(f"{proc}/self/status", "VmSize:", 1024)
    return min(available, room), min(ceiling, room)


def check_memory(args, device: torch.device) -> torch.device:
    """--replay-device, and the memory the run needs (networks, gradients, Adam's moments, replay, updates) checked
    now, not hours in. Returns the replay's device (`auto`: GPU if the whole replay fits in half its free memory)."""
    if args.replay_device == "cuda" and device.type == "cpu":
        raise RunError("--replay-device cuda needs a CUDA device")
    available, ceiling = host_memory()
    widest_action = 21  # of the tasks (humanoid's): the memory is checked before any environment is built
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else available
    try:
        with torch.device("meta"):  # sizes only: nothing is allocated
            agent = Agent((3 * args.frame_stack, 84, 84), 1, args, torch.device("meta"))
    except RuntimeError as error:  # sizes beyond what a tensor can hold
        raise RunError(f"the networks do not fit in memory ({first_line(error)})") from error
    networks = [part for part in vars(agent).values() if isinstance(part, nn.Module)]
    network_bytes = 16 * sum(p.numel() for network in networks for p in network.parameters())  # at most
    if network_bytes > free:
        raise RunError(f"the networks do not fit in memory: {network_bytes / 1e9:.1f} GB, {free / 1e9:.1f} GB free")
    full = ReplayBuffer.memory(args.buffer_size, (3, 84, 84), widest_action)
    fits = args.replay_device == "cuda" or device.type == "cuda" and full <= free / 2
    replay_device = device if args.replay_device != "cpu" and fits else torch.device("cpu")
    transitions = min(args.buffer_size, args.total_timesteps // args.action_repeat)
    if replay_device.type == "cpu" and full > ceiling:
        capacity = f"the replay's capacity of {args.buffer_size} transitions takes {full / 1e9:.1f} GB to allocate"
        raise RunError(f"{capacity}, more than the {ceiling / 1e9:.1f} GB the process may reserve: lower --buffer-size")
    replay_bytes = ReplayBuffer.memory(transitions, (3, 84, 84), widest_action)
    update_bytes = update_memory(args) if device.type == "cpu" else 0
    if (replay_bytes if replay_device.type == "cpu" else 0) + update_bytes > available:
        raise RunError(
            f"the replay's {transitions} transitions take {replay_bytes / 1e9:.1f} GB and the updates about "
            f"{update_bytes / 1e9:.1f} GB, but {available / 1e9:.1f} GB of memory are available to this process "
            "(the machine's, its cgroup's, ulimit -v's): lower --buffer-size or --batch-size"
        )
    if replay_device.type == "cuda" and replay_bytes > free:
        raise RunError(f"the replay's {replay_bytes / 1e9:.1f} GB exceed the GPU's free memory: --replay-device cpu")
    return replay_device


def non_finite(what: str, frame: int, checkpoint_frame: int) -> RunError:
    return RunError(f"non-finite {what} at frame {frame}; stopping without checkpointing ({kept(checkpoint_frame)})")


CHECKPOINT = "checkpoint.pt"
LOCK = "run.lock"
# Resuming, a run's settings come from its checkpoint; these a flag of the command line may change (one that changes
# what is computed is refused). THIS_PROCESS: how this process runs, always this command line's.
RESUMABLE_CHANGES = {"total_timesteps", "eval_every", "num_eval_episodes", "checkpoint_every", "checkpoint_replay"}
RESUMABLE_CHANGES |= {"track", "wandb_project_name", "wandb_entity", "capture_video", "save_model"}
THIS_PROCESS = {"resume", "cuda", "torch_deterministic", "compile", "cudagraphs", "tf32", "replay_device"}
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP)


def save_checkpoint(path: str, payload: dict, kept: str = "the previous checkpoint is kept"):
    """Writes a temporary file, fsyncs, renames it over `path`: a kill or a full disk at any moment leaves the
    previous checkpoint whole, and the temporary file goes whatever the error."""
    temporary = f"{path}.tmp"
    try:  # O_NOFOLLOW: a symbolic link planted there is refused, not written through
        with os.fdopen(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644), "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
        descriptor = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
        os.fsync(descriptor)  # the rename itself reaches the disk
        os.close(descriptor)
    except Exception as error:  # OSError (a full disk), or torch's zip writer failing on one (RuntimeError)
        link = getattr(error, "errno", None) == errno.ELOOP
        reason = f"{temporary} is a symbolic link, which a run does not write through" if link else first_line(error)
        raise RunError(f"could not write {path} ({reason}); {kept}") from error
    finally:
        with contextlib.suppress(OSError):
            os.remove(temporary)


def make_folder(path: str) -> str:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        raise RunError(f"cannot create {path} ({error.strerror or first_line(error)})") from error
    return path


def lock_run_dir(run_dir: str, new_run: bool):
    """Creates a new run's directory; returns its lock file, held for this process's life (a second is refused)."""
    if new_run and os.path.exists(run_dir):
        raise RunError(f"{run_dir} exists already (a run of this task and seed started in the same second?)")
    make_folder(run_dir)
    try:  # held open while the run lasts; O_NOFOLLOW: a symbolic link planted there is refused
        lock = os.fdopen(os.open(os.path.join(run_dir, LOCK), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644), "r+")
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write(f"process {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        lock.truncate()
        lock.flush()
    except BlockingIOError:  # locked
        holder = lock.read().strip() or "another process"
        lock.close()
        raise RunError(f"{run_dir} is in use by {holder}: one process per run directory") from None
    except OSError as error:
        if error.errno != errno.ENOLCK:  # a full disk, no permission, a link
            reason = f"{LOCK} is a symbolic link" if error.errno == errno.ELOOP else error.strerror or first_line(error)
            raise RunError(f"cannot write in {run_dir} ({reason})") from error
        print(f"warning: cannot lock {run_dir} ({error.strerror}): run one process on it at a time")
    return lock


def load_checkpoint(path: str) -> dict:
    """The checkpoint's payload (tensors memory-mapped) once every record of its zip file is stored as torch.save
    stores them (a compressed one could unpack to any size) and matches its CRC (torch.load checks none)."""
    try:
        with zipfile.ZipFile(path) as archive:
            packed = [info.filename for info in archive.infolist() if info.compress_type != zipfile.ZIP_STORED]
            damaged = packed[0] if packed else archive.testzip()
        payload = torch.load(path, weights_only=True, mmap=True) if damaged is None else None
    except pickle.UnpicklingError as error:  # torch's message goes on to suggest loading it unsafely
        raise RunError(f"{path} holds Python objects, which no checkpoint of this script does") from error
    except Exception as error:  # a damaged file fails in many ways
        raise RunError(f"the checkpoint {path} is unreadable or corrupt ({first_line(error)})") from error
    if damaged is not None:
        raise RunError(f"the checkpoint {path} is corrupt: its record {damaged} is compressed or fails its CRC")
    if not isinstance(payload, dict) or not isinstance(payload.get("args"), dict):
        raise RunError(f"the checkpoint {path} is corrupt: it holds no run's checkpoint")
    return payload


def find_run_to_resume(args) -> str | None:
    """The run directory --resume names (or holds the checkpoint file it names); for `auto`, the newest run of the
    same env_id, exp_name and seed with a checkpoint (by the start time in its name, which a copy keeps), else None."""
    if args.resume != "auto":
        run_dir = os.path.dirname(args.resume) if os.path.basename(args.resume) == CHECKPOINT else args.resume
        if not args.resume or not os.path.isfile(os.path.join(run_dir, CHECKPOINT)):
            raise RunError(f"--resume {args.resume!r}: no {CHECKPOINT} there (none written yet, or checkpoints off)")
        return os.path.normpath(run_dir)
    name = re.escape(f"{args.env_id}__{args.exp_name}__{args.seed}__") + r"\d+"  # exactly: exp_name may hold "__1"
    found = [path for path in glob.glob(f"runs/*/{CHECKPOINT}") if re.fullmatch(name, path.split(os.sep)[-2])]
    if not found:
        print(f"--resume auto: no run of {args.env_id}, seed {args.seed} ({args.exp_name}) under runs/; starting one")
        return None
    chosen = os.path.dirname(max(found, key=lambda path: int(path.split(os.sep)[-2].rpartition("__")[2])))
    print(f"--resume auto: resuming {chosen}, the newest run of this task and seed ({len(found)} found)")
    return chosen


def algorithm_hash() -> str:
    """A run's algorithm: this file's code above the run machinery's banner, as Python parses it (comments,
    docstrings and formatting do not count), hashed. A checkpoint continues only under the same."""
    with open(__file__, encoding="utf-8") as f:
        tree = ast.parse(f.read().split("\n# Run machinery.")[0])
    for node in ast.walk(tree):  # docstrings: statements that are only a constant
        if isinstance(getattr(node, "body", None), list):
            node.body = [s for s in node.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
    return hashlib.sha256(ast.unparse(tree).encode()).hexdigest()[:16]


ALGORITHM = algorithm_hash()  # read as the script starts: an edit made while it runs is not what it runs


def resumed_settings(args, checkpoint: dict, path: str):
    """The settings of the checkpoint at `path`, with those this command line gives (sys.argv) that may change on
    resume; a run of another algorithm, or a setting given that would change what is computed, is refused."""
    if checkpoint.get("algorithm") != ALGORITHM:
        raise RunError(
            f"{path} is of another algorithm, or another version of it (the code of {os.path.basename(__file__)} above "
            "its run machinery differs): put back the file that started the run, or start a new one (with a new --exp-name)"
        )
    saved = checkpoint["args"]
    named = {word[2:].split("=")[0].replace("-", "_") for word in sys.argv[1:] if word.startswith("--")}
    named |= {name[3:] for name in named if name.startswith("no_")}  # --no-track gives track
    given = {name: value for name, value in vars(args).items() if name in named | THIS_PROCESS}
    differences = [
        f"--{name.replace('_', '-')} is {saved[name]!r} in the checkpoint but {value!r} now"
        for name, value in given.items()
        if name not in RESUMABLE_CHANGES | THIS_PROCESS and value != saved[name]
    ]
    if differences:
        raise RunError("cannot resume with settings other than the checkpoint's: " + "; ".join(differences))
    return type(args)(**{**saved, **given})


def agent_state(agent) -> dict:
    """What the agent has learned, by attribute name: each network's and optimizer's state and every tensor held
    (an nn.Parameter too). Checkpoints keep it all: a part a researcher adds to the Agent is kept without more code."""
    state = {}
    for name, part in vars(agent).items():
        if isinstance(part, (nn.Module, torch.optim.Optimizer)):
            state[name] = part.state_dict()
        elif isinstance(part, torch.Tensor):
            state[name] = part.detach()
        elif isinstance(part, (list, tuple, dict)):  # what is in them would be missed: refuse it
            items = part.values() if isinstance(part, dict) else part
            if any(isinstance(item, (nn.Module, torch.Tensor)) for item in items):
                raise TypeError(f"Agent.{name}: hold networks and tensors in nn.ModuleList or nn.ParameterList")
    return state


def load_agent_state(agent, state: dict):
    for name, part_state in state.items():
        part = getattr(agent, name)
        if isinstance(part, torch.Tensor):
            with torch.no_grad():
                part.copy_(part_state)  # in place: optimizers and a CUDA graph hold this very tensor
        else:
            part.load_state_dict(part_state)


def kept(frame: int) -> str:
    return f"the checkpoint of frame {frame} is kept" if frame else "no checkpoint is kept"


def write_checkpoint(run, global_step: int, replay):
    """Everything `run` (a Run) needs to continue exactly: the agent's every network, optimizer and tensor, the replay
    (unless `replay` is None or --no-checkpoint-replay), every random state, and the algorithm that trained it."""
    learned = agent_state(run.agent)
    for name, state in learned.items():  # a non-finite weight is never checkpointed
        part = getattr(run.agent, name)
        tensors = state.values() if isinstance(part, nn.Module) else [state]
        if not isinstance(part, torch.optim.Optimizer) and not all(t.isfinite().all() for t in tensors):
            raise non_finite(f"parameters in the {name}", global_step * run.args.action_repeat, run.checkpoint_frame)
    numpy_states = [owner.get_state() for owner in [np.random, *(env.random_state for env in run.envs)]]  # envs' too
    rng = {"python": random.getstate(), "torch": torch.get_rng_state()}
    rng["numpy"] = [[state[0], torch.from_numpy(state[1].copy()), *state[2:]] for state in numpy_states]
    rng["cuda"] = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    payload = {"args": vars(run.args), "global_step": global_step, "agent": learned, "rng": rng}
    payload |= {"last_eval": run.last_eval, "algorithm": ALGORITHM, "script": os.path.abspath(__file__)}
    payload["replay"] = replay.state_dict() if run.args.checkpoint_replay and replay is not None else None
    save_checkpoint(os.path.join(run.run_dir, CHECKPOINT), payload, kept(run.checkpoint_frame))


def restore(checkpoint: dict, agent, replay, envs):
    """Puts the agent, the replay and every random state back as the checkpoint (of this algorithm) left them."""
    load_agent_state(agent, checkpoint["agent"])
    if checkpoint["replay"] is not None:
        replay.load_state_dict(checkpoint["replay"])
    rng = checkpoint["rng"]
    random.setstate((rng["python"][0], tuple(rng["python"][1]), rng["python"][2]))
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    for state, owner in zip(rng["numpy"], [np.random, *(env.random_state for env in envs)]):
        owner.set_state((state[0], state[1].numpy(), *state[2:]))


def catch_stop_signals(handler):
    """The stop signals call `handler`; one ignored when the run starts (SIGHUP under nohup) stays ignored."""
    for signum in STOP_SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, handler)


class Run:
    """A run's life around main()'s loop. Run(args): the settings (a resumed run's from its checkpoint), device and
    memory, before anything is written. start(): a resumed run put back, the run directory, logs and stop signals;
    leaving its block, the final checkpoint. checkpoint_when_due(), at episode ends: checkpoints, and stop signals."""

    def __init__(self, args):
        self.run_dir = find_run_to_resume(args) if args.resume is not None else None
        path = os.path.join(self.run_dir, CHECKPOINT) if self.run_dir else None
        self.checkpoint = load_checkpoint(path) if path else None
        self.args = resolve_args(resumed_settings(args, self.checkpoint, path) if path else args)
        self.new = path is None
        self.start_step = 0 if self.new else self.checkpoint["global_step"]
        self.start_frame = self.start_step * self.args.action_repeat
        self.last_eval = math.nan if self.new else self.checkpoint["last_eval"]
        self.total_steps = self.args.total_timesteps // self.args.action_repeat
        self.total_frames = self.total_steps * self.args.action_repeat  # --total-timesteps in whole agent steps
        self.finished = self.start_step >= self.total_steps
        if self.finished:
            print(f"{self.run_dir} already ran {self.start_frame} frames (for more: --total-timesteps): nothing to do")
            return
        self.device = torch.device("cuda" if torch.cuda.is_available() and self.args.cuda else "cpu")
        if self.args.cuda and self.device.type == "cpu":
            print("warning: no CUDA device is available; running on the CPU")
        if self.args.amp == "bf16" and self.device.type == "cpu" and not torch.cpu._is_avx512_bf16_supported():
            print("warning: this CPU has no avx512_bf16: --amp bf16 runs ~10x slower than fp32 here; leave it out")
        if self.args.cudagraphs and self.device.type != "cuda":
            raise RunError("--cudagraphs needs a CUDA device")
        configure_torch(self.args)
        self.replay_device = check_memory(self.args, self.device)

    @contextlib.contextmanager
    def start(self, agent, replay, envs):
        args = self.args
        self.agent = agent
        self.replay = replay
        self.envs = envs
        if self.checkpoint:
            restore(self.checkpoint, agent, replay, envs)
            self.checkpoint = None  # its tensors are memory-mapped from the file
        agent_state(agent)  # every part of the agent can be checkpointed: checked now, not at the first checkpoint
        self.checkpoint_frame = self.start_frame
        self.episode_start_frame = self.start_frame
        # Resumed without its replay: collect `learning_starts` frames anew before updating.
        self.updates_start = args.learning_starts + (self.start_frame if replay.num_transitions == 0 else 0)
        name = os.path.basename(self.run_dir or f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}")
        self.video_dir = make_folder(f"videos/{name}") if args.capture_video else None
        self.run_dir = self.run_dir or f"runs/{name}"
        self.lock = lock_run_dir(self.run_dir, self.new)
        settings = vars(args) | {"algorithm": ALGORITHM}  # its hash too: plot.py keeps runs of other code apart
        if args.track:  # a resumed run continues its wandb run; save_code keeps this file, the whole algorithm
            import wandb

            where = {"project": args.wandb_project_name, "entity": args.wandb_entity, "name": name, "id": name}
            wandb.init(**where, config=settings, resume="allow", sync_tensorboard=True, save_code=True)
        # resumed, TensorBoard drops what the run logged after its checkpoint: each step appears once
        writer = SummaryWriter(self.run_dir, purge_step=self.start_frame + 1 if self.start_frame else None)
        rows = [f"|{key}|" + re.sub(r"([\\|])", r"\\\1", str(value)) + "|" for key, value in settings.items()]
        writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(rows))  # \ and | escaped; each start
        self.stop_signal = None
        catch_stop_signals(self.on_stop_signal)
        transitions = min(args.buffer_size, args.total_timesteps // args.action_repeat)
        replay_bytes = ReplayBuffer.memory(transitions, replay.frames.shape[1:], replay.actions.shape[1])
        print(
            f"{'run' if self.new else 'resuming'} {name} on {self.device}: {args.env_id}, frame {self.start_frame} of "
            f"{self.total_frames}; logs in {self.run_dir}; replay: up to {transitions} transitions, "
            f"{replay_bytes / 1e9:.2f} GB in {replay.device.type} memory"
        )
        if self.updates_start >= self.total_frames:
            print(f"warning: updates start at frame {self.updates_start}, at or after the budget's end: no learning")
        self.start_time = time.time()
        self.timed_from = None  # (time, frame) of the first episode's end once updates are due: the pace's origin
        # a full disk, or a run directory gone, stops the logs' writing thread: its error is said once, below
        threading.excepthook = lambda hook: isinstance(hook.exc_value, OSError) or threading.__excepthook__(hook)
        try:
            yield writer
            self.finish()
            writer.flush()
        except NonFiniteAction as error:  # the policy's output, before dm_control fails on it
            frame = self.episode_start_frame + self.envs[0].episode_frames
            raise non_finite(str(error), frame, self.checkpoint_frame) from None
        except OSError as error:
            raise RunError(f"could not write the logs or a video ({first_line(error)}); {kept(self.checkpoint_frame)}")
        finally:
            with contextlib.suppress(OSError):  # said above
                writer.close()
            self.lock.close()
            if args.track:
                sys.modules["wandb"].finish()

    def on_stop_signal(self, signum, _):
        name = signal.Signals(signum).name
        if self.stop_signal is not None:
            print(f"{name} again: exiting now; the last checkpoint stays as it was", flush=True)
            raise SystemExit(128 + signum)
        self.stop_signal = signum
        then = "checkpointing and exiting" if self.args.checkpoint_every else "exiting (checkpoints are off)"
        print(f"{name}: finishing this episode (or evaluation), then {then}", flush=True)

    def video_path(self, frame: int) -> str | None:
        return self.video_dir and f"{self.video_dir}/eval_{frame}.mp4"

    def progress(self, frame: int, episode_return: float, sps: float) -> str:
        """An episode's progress line. The time left follows the pace since updates began, evaluations included."""
        now = time.time()
        left = math.nan  # not known yet: "-"
        if self.timed_from:
            left = (now - self.timed_from[0]) / (frame - self.timed_from[1]) * (self.total_frames - frame)
        elif frame >= self.updates_start:
            self.timed_from = (now, frame)
        return (
            f"frame {frame}/{self.total_frames} ({100 * frame / self.total_frames:.1f}%) | return {episode_return:.1f}"
            f" | SPS {sps:.{0 if sps >= 10 else 2}f} | last eval {self.last_eval:.1f} | elapsed "
            f"{duration(now - self.start_time)} | left {duration(left)}"
        )

    def checkpoint_when_due(self, step: int, metrics: dict):
        """At an episode's end (and after frame 0's evaluation): a non-finite loss stops the run; a checkpoint is
        written when one is due, or when a stop signal came, and then the run exits."""
        args = self.args
        frame = step * args.action_repeat
        for tag, value in metrics.items():  # reading them waits for the GPU: once an episode
            if not math.isfinite(value):
                raise non_finite(f"{tag} ({value.item()})", frame, self.checkpoint_frame)
        every = args.checkpoint_every
        due = every and frame // every > self.checkpoint_frame // every
        last = step == self.total_steps  # the run finishes (a signal now too): its final checkpoint comes then
        if (due or self.stop_signal and every) and not last:
            write_checkpoint(self, step, self.replay)
            self.checkpoint_frame = frame
            print(f"frame {frame}: checkpoint written to {self.run_dir}/{CHECKPOINT}", flush=True)
        self.episode_start_frame = frame
        if self.stop_signal and not last:
            resume = f"with a checkpoint at frame {frame}; resume it with --resume {self.run_dir}"
            nothing = f"at frame {frame}; checkpoints are off, so there is nothing to resume"
            print(f"stopped by {signal.Signals(self.stop_signal).name} {resume if every else nothing}")
            raise SystemExit(128 + self.stop_signal)

    def finish(self):
        """The final checkpoint (without the replay, by far its largest part), the done line and --save-model."""
        args = self.args
        elapsed = time.time() - self.start_time
        frames = self.total_frames - self.start_frame
        saved = "no checkpoint (checkpoints are off)"
        if args.checkpoint_every:
            write_checkpoint(self, self.total_steps, replay=None)
            size = os.path.getsize(os.path.join(self.run_dir, CHECKPOINT)) / 1e6
            saved = f"kept {self.run_dir}/{CHECKPOINT} ({size:.0f} MB: networks, optimizers and progress, no replay)"
        print(
            f"done: {frames} frames in {elapsed:.0f} s ({frames / elapsed:.0f} frames/s with evaluations); "
            f"last eval return {self.last_eval:.1f}; {saved}"
        )
        if args.save_model:
            path = f"{self.run_dir}/{args.exp_name}.cleanrl_model"
            optimizers = {name for name, part in vars(self.agent).items() if isinstance(part, torch.optim.Optimizer)}
            learned = {name: state for name, state in agent_state(self.agent).items() if name not in optimizers}
            model = {"args": vars(args), "algorithm": ALGORITHM, "script": os.path.abspath(__file__), **learned}
            model |= {"obs_shape": list(self.envs[0].observation_shape), "action_dim": self.envs[0].action_dim}
            save_checkpoint(path, model, kept=f"{CHECKPOINT} is kept")
            print(f"model saved to {path}")


# --- end shared ---


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except RunError as error:  # one clear line and a non-zero exit
        raise SystemExit(f"error: {error}")
