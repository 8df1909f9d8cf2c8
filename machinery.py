# What the two agent scripts (drqv2_continuous_action.py, taco_continuous_action.py) need around their algorithm, the
# same for both: speed (the next batch sampled while the agent acts, the whole update as one CUDA graph) and the run's
# machinery (logs, evaluations and progress, checks made before anything is written, checkpoints that continue a run
# exactly, stop signals). Nothing here changes what an update computes; the scripts import it by name.
import concurrent.futures
import contextlib
import copy
import glob
import math
import os
import random
import shutil
import signal
import time
import zipfile

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import tree_leaves

# ----------------------------------------------------------------------------------------------------------------------
# Speed: the next batch sampled while the agent acts, the whole update replayed as one CUDA graph


class BatchPrefetcher:
    """Hands out the next batch and requests the one after it at once, 2 agent steps before its update. A host replay
    is sampled on a background thread while the agent acts and the environment steps, under the replay's lock, so a
    batch is what `replay.sample` gave when requested; on a GPU it then crosses through pinned memory. A GPU replay
    is sampled in the main thread: the host only draws indices and queues one gather."""

    def __init__(self, replay, batch_size: int, device: torch.device):
        self.replay, self.batch_size, self.device = replay, batch_size, device
        self._worker = concurrent.futures.ThreadPoolExecutor(1) if replay.device.type == "cpu" else None
        self._pending = self._in_transfer = None

    def _sample(self) -> dict:
        try:
            batch = self.replay.sample(self.batch_size)
        finally:
            self.replay.lock.release()
        pin = self.device.type == "cuda" and self._worker is not None
        return {key: value.pin_memory() for key, value in batch.items()} if pin else batch

    def _request(self):
        self.replay.lock.acquire()  # released once the sample is taken
        self._pending = self._worker.submit(self._sample) if self._worker else self._ready(self._sample())

    @staticmethod
    def _ready(batch: dict) -> concurrent.futures.Future:
        future = concurrent.futures.Future()
        future.set_result(batch)
        return future

    def can_supply(self) -> bool:
        """Whether a batch is requested or can be sampled now."""
        return self._pending is not None or self.replay.can_sample()

    def next(self) -> dict:
        if self._pending is None:
            self._request()
        self._in_transfer = self._pending.result()  # a pinned batch is kept until its copy has surely finished
        self._pending = None
        if self.replay.can_sample():
            self._request()
        return {key: value.to(self.device, non_blocking=True) for key, value in self._in_transfer.items()}

    def state_dict(self):
        """The requested batch on the host (its draw already moved the replay's RNG), or None."""
        return None if self._pending is None else {key: value.cpu() for key, value in self._pending.result().items()}

    def load_state_dict(self, batch):
        if batch is not None:
            self._pending = self._ready({key: value.to(self.replay.device) for key, value in batch.items()})


class CudaGraph:
    """--cudagraphs: the whole update (forwards, backwards, optimizer steps, target update) recorded once as a CUDA
    graph, then replayed: one launch instead of hundreds. Each replay reads the batch and std copied into the graph's
    input tensors and overwrites the metrics it returned last time; random draws come from the CUDA generator."""

    def __init__(self, agent):
        self.agent, self.graph = agent, None

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
        # weights, the optimizer states and the random generator are put back, in place, as they were before it.
        agent, saved, rng = self.agent, copy.deepcopy(self.agent.state_dict()), torch.cuda.get_rng_state()
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
                        before = saved[name]["state"].get(index)  # None: no state before the warm-up
                        for key, tensor in part.state[parameter].items():
                            tensor.copy_(before[key]) if before else tensor.zero_()
                    part.zero_grad(set_to_none=True)
        torch.cuda.set_rng_state(rng)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):  # the sampling thread may pin memory
            self.metrics = agent.compute_update(self.batch, self.std)


# ----------------------------------------------------------------------------------------------------------------------
# Run: what the loop records (logs, evaluations, progress, checkpoints), the checks made before anything is written,
# checkpoints that continue a run exactly, and stop signals


class Run:
    """What the loop records: TensorBoard (and wandb), evaluations, progress lines, checkpoints and stop requests."""

    def __init__(self, args, run_dir, start_step, progress, agent, replay, prefetcher, envs, evaluate):
        self.args, self.progress, self.agent, self.envs = args, progress, agent, envs
        self.replay, self.prefetcher, self.evaluate = replay, prefetcher, evaluate
        self.dir = run_dir or f"runs/{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
        self.name, frame = os.path.basename(self.dir), start_step * args.action_repeat
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(self.dir, f"{CHECKPOINT}.tmp"))  # left by a run killed while writing a checkpoint
        self.wandb = None
        if args.track:  # a resumed run continues the same wandb run
            import wandb

            project = {"project": args.wandb_project_name, "entity": args.wandb_entity, "config": vars(args)}
            wandb.init(**project, name=self.name, id=self.name, resume="allow", sync_tensorboard=True, save_code=True)
            self.wandb = wandb
        from torch.utils.tensorboard import SummaryWriter

        # On resume, TensorBoard drops what the interrupted run logged after its checkpoint: each step appears once.
        self.writer = SummaryWriter(self.dir, purge_step=frame + 1 if frame else None)
        if not frame:
            table = "\n".join(f"|{key}|{value}|" for key, value in vars(args).items())
            self.writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + table)
        self.start_time = self.window_time = time.time()  # SPS is measured over each episode's window of frames
        self.window_frame = self.checkpoint_frame = frame
        self.eval_seconds, self.stop = 0.0, StopRequest(checkpoints=args.checkpoint_every > 0)

    def log_evaluation(self, frame):
        """Evaluates at `frame`; an evaluation cut short by a stop request is redone on resume."""
        start, args, progress = time.time(), self.args, self.progress
        video_path = f"videos/{self.name}/eval_{frame}.mp4" if args.capture_video else None
        stopping, step = lambda: self.stop.signal is not None, frame // args.action_repeat
        returns = self.evaluate(self.agent, self.envs[1], args.num_eval_episodes, step, video_path, stopping)
        progress["pending_eval"] = frame if returns is None else None
        if returns is not None:
            progress["last_eval"], self.eval_seconds = float(np.mean(returns)), time.time() - start
            self.writer.add_scalar("eval/episodic_return", progress["last_eval"], frame)
            print(f"frame {frame}: eval return {progress['last_eval']:.1f}")
        self.window_time += time.time() - start  # SPS measures training, not evaluation

    def end_episode(self, global_step, episode_return, steps, metrics, timed):
        """Logs the episode and the latest update's metrics (read once per episode: reading waits for the GPU),
        prints progress, checkpoints when due or asked to stop, and stops if asked."""
        args, frame = self.args, global_step * self.args.action_repeat
        sps = (frame - self.window_frame) / (time.time() - self.window_time)
        scalars = {"charts/episodic_return": episode_return, "charts/episodic_length": steps * args.action_repeat}
        scalars.update({"charts/SPS": sps, **{tag: tensor.item() for tag, tensor in metrics.items()}})
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, frame)
            if not math.isfinite(value):
                kept = f"the last checkpoint, at frame {self.checkpoint_frame}, is kept"
                raise RunError(f"non-finite {tag} ({value}) at frame {frame}; stopping without checkpointing ({kept})")
        frames_left = args.total_timesteps - frame  # time left: the evaluations still to come included
        left = frames_left / sps + frames_left // args.eval_every * self.eval_seconds if timed else math.nan
        print(
            f"frame {frame}/{args.total_timesteps} ({100 * frame / args.total_timesteps:.1f}%) | return "
            f"{episode_return:.1f} | SPS {sps:.0f} | last eval {self.progress['last_eval']:.1f} | elapsed "
            f"{duration(time.time() - self.start_time)} | left {duration(left)}"
        )
        every = args.checkpoint_every
        if every and (frame // every > self.checkpoint_frame // every or self.stop.signal):
            self.write_checkpoint(global_step)
        if self.stop.signal:
            resume = f"with a checkpoint at frame {frame}; resume with --resume {self.dir}"
            nothing = f"at frame {frame}; checkpoints are off, so there is nothing to resume"
            print(f"stopped by {signal.Signals(self.stop.signal).name} {resume if every else nothing}")
            raise SystemExit(128 + self.stop.signal)
        self.window_time, self.window_frame = time.time(), frame

    def write_checkpoint(self, global_step):
        check_finite(self.agent, global_step * self.args.action_repeat)
        keep = self.args.checkpoint_replay  # the prefetched batch first: taking it releases the replay's lock
        payload = {"prefetched": self.prefetcher.state_dict() if keep else None, "args": vars(self.args)}
        payload.update(global_step=global_step, agent=self.agent.state_dict(), rng=rng_state(self.envs))
        payload.update(replay=self.replay.state_dict() if keep else None, **self.progress)
        last = self.checkpoint_frame
        save_checkpoint(
            f"{self.dir}/{CHECKPOINT}", payload, f"the checkpoint of frame {last} is kept" if last else "none is kept"
        )
        self.checkpoint_frame = global_step * self.args.action_repeat

    def finish(self, start_step):
        args, elapsed = self.args, time.time() - self.start_time
        frames = args.total_timesteps - start_step * args.action_repeat
        print(
            f"done: {frames} frames in {elapsed:.0f} s ({frames / elapsed:.0f} frames/s with evaluations); "
            f"last eval return {self.progress['last_eval']:.1f}"
        )
        if args.checkpoint_every:  # a last episode cut short by the budget is not kept
            self.write_checkpoint(args.total_timesteps // args.action_repeat)

    def close(self):
        self.writer.close()
        if self.wandb:
            self.wandb.finish()


def duration(seconds: float) -> str:
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m" if math.isfinite(seconds) else "?"


class RunError(ValueError):
    """A problem the user can fix (bad settings, a damaged checkpoint, no renderer): one clear line, non-zero exit."""


def first_line(error: Exception) -> str:
    return str(error).splitlines()[0][:200] if str(error) else type(error).__name__


def choose_device(args) -> torch.device:
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    if args.cuda and device.type == "cpu":
        print("warning: no CUDA device is available; running on the CPU")
    if args.cudagraphs and device.type != "cuda":
        raise RunError("--cudagraphs needs a CUDA device")
    return device


def configure_torch(args):
    """cuDNN's deterministic algorithms (--torch-deterministic) and the precision of fp32 convolutions (--tf32)."""
    torch.backends.cudnn.deterministic = args.torch_deterministic
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = args.tf32, False


def choose_replay_device(args, device: torch.device, env, replay_memory, update_memory: float) -> tuple:
    """--replay-device, and the memory of the replay once full checked now (not when a run fails hours in), given the
    bytes a replay of n transitions of `env` allocates, `replay_memory(n, frame_shape, action_dim)`, and the bytes the
    updates take on the CPU. Returns the device and a line that says it."""
    if args.replay_device == "cuda" and device.type == "cpu":
        raise RunError("--replay-device cuda needs a CUDA device")
    full = replay_memory(args.buffer_size, env.frame_shape, env.action_dim)
    fits = args.replay_device == "cuda" or device.type == "cuda" and full <= torch.cuda.mem_get_info(device)[0] / 2
    replay_device = device if args.replay_device != "cpu" and fits else torch.device("cpu")
    transitions = min(args.buffer_size, args.total_timesteps // args.action_repeat)
    replay = replay_memory(transitions, env.frame_shape, env.action_dim)
    host = (replay if replay_device.type == "cpu" else 0) + (update_memory if device.type == "cpu" else 0)
    available = math.inf  # where /proc/meminfo cannot tell
    with contextlib.suppress(OSError, StopIteration, ValueError), open("/proc/meminfo") as meminfo:
        available = 1024 * int(next(line.split()[1] for line in meminfo if line.startswith("MemAvailable:")))
    if host > available:
        raise RunError(
            f"the replay's {transitions} transitions take {replay / 1e9:.1f} GB and the updates about "
            f"{update_memory / 1e9:.1f} GB, but {available / 1e9:.1f} GB of memory are available: lower --buffer-size"
        )
    if replay_device.type == "cuda" and replay > torch.cuda.mem_get_info(replay_device)[0]:
        raise RunError(f"the replay's {replay / 1e9:.1f} GB do not fit in the GPU's free memory: --replay-device cpu")
    where = f"{replay / 1e9:.2f} GB in {replay_device.type} memory"
    return replay_device, f"replay: up to {transitions} transitions, {where}"


CHECKPOINT = "checkpoint.pt"
# Settings that may differ when a run is resumed; every other setting must equal the checkpoint's.
RESUMABLE_CHANGES = {"total_timesteps", "eval_every", "num_eval_episodes", "checkpoint_every", "checkpoint_replay"}
RESUMABLE_CHANGES |= {"resume", "cuda", "torch_deterministic", "track", "wandb_project_name", "wandb_entity"}
RESUMABLE_CHANGES |= {"capture_video", "save_model", "compile", "cudagraphs", "tf32", "replay_device"}


def save_checkpoint(path: str, payload: dict, kept: str = "the previous checkpoint is kept"):
    """Writes a temporary file, fsyncs, renames it over `path`: a kill or a full disk at any moment leaves the
    previous checkpoint whole, and the temporary file goes whatever the error."""
    folder, temporary = os.path.dirname(path) or ".", f"{path}.tmp"
    needed = sum(x.nbytes for x in tree_leaves(payload) if isinstance(x, torch.Tensor)) + 2**20
    free = shutil.disk_usage(folder).free
    if needed > free + (os.path.getsize(path) if os.path.exists(path) else 0):  # the old file goes at the rename
        raise RunError(
            f"not enough disk space for {path} (about {needed / 1e9:.2f} GB, {free / 1e9:.2f} GB free); {kept} "
            "(--no-checkpoint-replay writes about 0.1 GB)"
        )
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
        raise RunError(f"could not write {path} ({first_line(error)}); {kept}") from error
    finally:
        with contextlib.suppress(OSError):
            os.remove(temporary)


def load_checkpoint(path: str, args=None) -> dict:
    """The checkpoint's payload (tensors memory-mapped) once every record of its zip file matches its CRC (torch.load
    checks none) and, given `args`, the settings that change what is computed match them."""
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
        payload = torch.load(path, weights_only=True, mmap=True) if damaged is None else None
    except Exception as error:  # a damaged file fails in many ways
        raise RunError(f"the checkpoint {path} is unreadable or corrupt ({first_line(error)})") from error
    if damaged is not None:
        raise RunError(f"the checkpoint {path} is corrupt: its record {damaged} does not match its CRC")
    if not isinstance(payload, dict):
        raise RunError(f"the checkpoint {path} is corrupt: it holds no run's checkpoint")
    if differences := settings_differences(payload.get("args", {}), args) if args else []:
        raise RunError("cannot resume with settings other than the checkpoint's: " + "; ".join(differences))
    return payload


def settings_differences(saved: dict, args) -> list:
    return [
        f"--{name.replace('_', '-')} is {saved.get(name)!r} in the checkpoint but {value!r} now"
        for name, value in vars(args).items()
        if name not in RESUMABLE_CHANGES and saved.get(name) != value
    ]


def find_run_to_resume(args) -> str | None:
    """The run directory --resume names (or holds the checkpoint file it names); for `auto`, the newest run of the
    same env_id, exp_name and seed whose checkpoint has the same settings, else the newest, else None."""
    if args.resume != "auto":
        if os.path.isfile(args.resume) and os.path.basename(args.resume) == CHECKPOINT:
            return os.path.dirname(os.path.abspath(args.resume))
        if not os.path.isfile(os.path.join(args.resume, CHECKPOINT)):
            missing = "no such run directory" if not os.path.isdir(args.resume) else f"there is no {CHECKPOINT} in it"
            raise RunError(f"--resume {args.resume}: {missing} (pass runs/<run_name> or auto; checkpoints off?)")
        return os.path.normpath(args.resume)
    found = sorted(glob.glob(f"runs/{args.env_id}__{args.exp_name}__{args.seed}__*/{CHECKPOINT}"))
    found.sort(key=os.path.getmtime, reverse=True)
    if not found:
        print("--resume auto: no checkpoint of this env_id, exp_name and seed under runs/; starting a new run")
        return None
    matching = [path for path in found if not settings_differences(checkpoint_args(path), args)]
    which = "with the same settings" if matching else "(none has the same settings)"
    chosen = os.path.dirname((matching or found)[0])
    print(f"--resume auto: resuming {chosen}, the newest of {len(found)} runs of this task and seed {which}")
    return chosen


def checkpoint_args(path: str) -> dict:
    """The settings saved in a checkpoint, read without loading its tensors; {} if unreadable."""
    try:
        return torch.load(path, weights_only=True, mmap=True).get("args", {})
    except Exception:  # noqa: BLE001 (a damaged file is reported when it is loaded)
        return {}


def rng_state(envs) -> dict:
    """Python's, numpy's, torch's (CUDA's) and the environments' random states; numpy's arrays as tensors."""
    numpy = [state.get_state() for state in [np.random, *(env.random_state for env in envs)]]
    numpy = [[state[0], torch.from_numpy(state[1].copy()), *state[2:]] for state in numpy]
    state = {"python": random.getstate(), "torch": torch.get_rng_state(), "numpy": numpy[0], "envs": numpy[1:]}
    return {**state, "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore(checkpoint: dict, agent, replay, prefetcher: BatchPrefetcher, envs) -> tuple:
    """Puts the run back as its checkpoint left it. Returns the agent step it reached and its evaluation progress."""
    agent.load_state_dict(checkpoint["agent"])
    if checkpoint["replay"] is not None:
        replay.load_state_dict(checkpoint["replay"])
        prefetcher.load_state_dict(checkpoint["prefetched"])
    rng = checkpoint["rng"]
    random.setstate((rng["python"][0], tuple(rng["python"][1]), rng["python"][2]))
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    for state, owner in zip([rng["numpy"], *rng["envs"]], [np.random, *(env.random_state for env in envs)]):
        owner.set_state((state[0], state[1].numpy(), *state[2:]))
    progress = {"last_eval": checkpoint.get("last_eval", math.nan), "pending_eval": checkpoint.get("pending_eval")}
    return checkpoint["global_step"], progress


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
