"""Speed and memory of the agent scripts, on random data of the right shapes:
  seconds per update at each script's default batch, with default flags and with each speed option,
  the update's floating-point work (counted by torch from the layer shapes) as a fraction of the rate of large
  matmuls in the update's dtype (fp32 or bf16), measured in turn with the updates in this process,
  seconds to sample a batch from a filled replay, bytes per stored transition and the memory of a filled replay,
  and environment frames per second (step + render).
Prints a Markdown table and appends it, with the commit, the command and the machine, to benchmarks/RESULTS.md.
  python benchmarks/speed.py                   # CPU here; the same command uses CUDA where a GPU is present
"""

import contextlib
import dataclasses
import importlib.util
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Speed options by name: the flags they set.
OPTIONS = {
    "default": {},
    "amp-bf16": {"amp": "bf16"},
    "no-tf32": {"tf32": False},
    "cudagraphs": {"cudagraphs": True},
    "cudagraphs+amp-bf16": {"cudagraphs": True, "amp": "bf16"},
    "cudagraphs+no-tf32": {"cudagraphs": True, "tf32": False},
    "compile": {"compile": True},
    "compile+amp-bf16": {"compile": True, "amp": "bf16"},
}
CUDA_ONLY = ("cudagraphs", "tf32")  # flags that need CUDA (TF32 changes nothing on a CPU)
SAME_WORK = ("compile", "cudagraphs", "tf32")  # flags that change how the update runs, not its FLOPs


@dataclass
class Args:
    scripts: list[str] = field(default_factory=lambda: ["drqv2_continuous_action", "taco_continuous_action"])
    """agent scripts to measure (file names without .py)"""
    options: list[str] = field(default_factory=lambda: list(OPTIONS))
    """speed options to time (the default names them all); cudagraphs and tf32 need CUDA: skipped elsewhere"""
    repeats: int = 5
    """timed updates per configuration, after one untimed warm-up (which includes compilation)"""
    batch_size: int | None = None
    """batch of the timed updates, None for each script's (256 DrQ-v2, 1024 TACO); the replay is sampled at it too"""
    env_id: str = "cheetah_run"
    """task whose shapes (6-dimensional actions) the update uses, and whose frames per second are measured"""
    replay_transitions: int = 100_000
    """transitions in the replay that is filled, measured and sampled from"""
    env_steps: int = 200
    """agent steps timed in the environment"""
    profile: int = 0
    """also profile 4 updates of each option and record its N costliest operations by input shape (self time); 0: none"""
    results: str = os.path.join(ROOT, "benchmarks", "RESULTS.md")
    """Markdown file the results are appended to; empty to only print them"""


def sample_to(replay, batch_size, device):
    """A batch sampled and moved to the training device, as the scripts' loop does it."""
    return {key: value.to(device) for key, value in replay.sample(batch_size).items()}


def load_script(name):
    """Imports an agent script by file name, once (module-level code only: its main() does not run)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(function, repeats, device):
    """Median and minimum seconds of `repeats` calls after one untimed warm-up call."""
    function()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return float(np.median(times)), float(np.min(times))


def timed_in_turn(functions: list, repeats: int, device) -> list[float]:
    """Median seconds of each function over `repeats` rounds that call each once in turn, after one warm-up round."""
    times = [[] for _ in functions]
    for round_ in range(repeats + 1):
        for function, seconds in zip(functions, times):
            start = time.perf_counter()
            function()
            synchronize(device)
            if round_ > 0:
                seconds.append(time.perf_counter() - start)
    return [sorted(seconds)[len(seconds) // 2] for seconds in times]


def random_batch(module, batch_size, action_dim, device=None):
    """A replay batch of the script's keys with random values (TACO's adds action_seq and future_obs, K = 3)."""
    rng = np.random.default_rng(0)

    def images():
        return torch.tensor(rng.integers(0, 256, (batch_size, 9, 84, 84), dtype=np.uint8), device=device)

    def uniform(*shape):
        return torch.tensor(rng.uniform(-1, 1, shape), dtype=torch.float32, device=device)

    batch = {
        "obs": images(),
        "action": uniform(batch_size, action_dim),
        "reward": uniform(batch_size, 1),
        "discount": torch.full((batch_size, 1), 0.97, device=device),
        "next_obs": images(),
    }
    if hasattr(module, "TacoHead"):
        batch.update(action_seq=uniform(batch_size, 3, action_dim), future_obs=images())
    return batch


def timed_beside_matmuls(function, repeats, device, dtype):
    """Like timed(), each call right after a round of 8 square matmuls in `dtype` (2048 on a CPU, 4096 on a GPU):
    returns the median and minimum seconds of the calls and the median FLOP/s of the rounds, the practical limit of
    the device for this dtype. Timed in turn, in one process, the two see the same machine (other processes, clock)."""
    size = 4096 if device.type == "cuda" else 2048
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)

    def matmuls():
        for _ in range(8):
            a @ b

    rates = []

    def rated_matmuls():
        start = time.perf_counter()
        matmuls()
        synchronize(device)
        rates.append(8 * 2 * size**3 / (time.perf_counter() - start))

    rated_matmuls()  # warm-up: a cold first round runs at about half the rate
    function()
    times = []
    for _ in range(repeats):
        rated_matmuls()
        start = time.perf_counter()
        function()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return float(np.median(times)), float(np.min(times)), float(np.median(rates[1:]))


def update_flops(agent, batch):
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        agent.update(batch, step=10_000)
    return counter.get_total_flops()


def profiled(update, what: str, top: int) -> str:
    """A Markdown table of the `top` operations (by input shapes) with the most self time over four updates (one
    update's stall, a page fault or another process, weighs a quarter)."""
    from torch.profiler import profile

    with profile(record_shapes=True) as profiler:
        for _ in range(4):
            update()
    events = sorted(profiler.key_averages(group_by_input_shape=True), key=lambda e: -e.self_device_time_total)
    if not events or events[0].self_device_time_total == 0:  # on a CPU
        events = sorted(events, key=lambda e: -e.self_cpu_time_total)
    rows = [f"\nProfile of {what} (self time, per update):\n\n| operation | input shapes | ms | calls |\n| --- |"]
    rows[0] += " --- | --- | --- |"
    for event in events[:top]:
        self_time = event.self_device_time_total or event.self_cpu_time_total
        rows.append(f"| {event.key} | {event.input_shapes} | {self_time / 4000:.1f} | {event.count // 4} |")
    return "\n".join(rows) + "\n"


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def fill_replay(module, transitions, action_dim, device):
    """A replay of `transitions` transitions in 500-step episodes (frames cycled from a small random set)."""
    kwargs = {"frame_stack": 3, "nstep": 3, "gamma": 0.99, "device": device}
    if hasattr(module, "TacoHead"):
        kwargs["multistep"] = 3
    before = rss_bytes()
    replay = module.ReplayBuffer(transitions, (3, 84, 84), action_dim, **kwargs)
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (16, 3, 84, 84), dtype=np.uint8)
    action = np.zeros(action_dim, dtype=np.float32)
    step = 0
    while replay.num_transitions + 500 <= transitions:
        replay.start_episode(frames[step % 16])
        for _ in range(500):
            step += 1
            replay.add(action, 1.0, 1.0, frames[step % 16])
        replay.end_episode()
    return replay, rss_bytes() - before


def environment_fps(module, env_id, steps):
    env = module.DMCPixelEnv(env_id, seed=0)
    env.reset()
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    frames = 0
    for _ in range(steps):
        _, _, _, done = env.step(rng.uniform(-1, 1, env.action_dim).astype(np.float32))
        frames += 2
        if done:
            env.reset()
    return frames / (time.perf_counter() - start)


def cpuinfo(key: str) -> str:
    """The first value of `key` in /proc/cpuinfo ("" where there is none: not Linux)."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as lines:
        return next(
            (value.strip() for name, _, value in (line.partition(":") for line in lines) if name.strip() == key), ""
        )
    return ""


def processor() -> str:
    """This machine's CPU model as /proc/cpuinfo names it (platform.processor() says only "x86_64" on Linux)."""
    return cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    return set(cpuinfo("flags").split())


def machine(device):
    flags = cpu_flags()
    # the bf16 matrix units (AMX) and bf16 vector instructions (avx512_bf16) that --amp bf16 uses on the CPU
    bf16 = ", ".join(f"{name}: {'yes' if flag in flags else 'no'}" for name, flag in BF16_UNITS.items())
    gpu = torch.cuda.get_device_name(0) if device.type == "cuda" else "none"
    threads = torch.get_num_threads()
    usable = len(os.sched_getaffinity(0))  # taskset may pin the process to some of the machine's cores
    cores = f"{usable} of {os.cpu_count()} cores" if usable < os.cpu_count() else f"{usable} cores"
    return f"CPU {processor()} ({bf16}), {cores} ({threads} torch threads); GPU {gpu}; torch {torch.__version__}"


BF16_UNITS = {"AMX bf16": "amx_bf16", "avx512_bf16": "avx512_bf16"}


def report(text: str, results: str):
    """Prints a measurement's Markdown (heading, provenance, table) and appends it to `results`, unless that is empty."""
    print("\n" + text)
    if results:
        with open(results, "a") as f:
            f.write(text.rstrip("\n") + "\n\n")
        print(f"appended to {results}")


def commit():
    def git(*command):
        return subprocess.run(["git", *command], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()

    return git("rev-parse", "--short", "HEAD") + (" (with uncommitted changes)" if git("status", "--porcelain") else "")


def main(args: Args):
    os.environ.setdefault("MUJOCO_GL", "egl")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    measured = commit()  # the code as it is when the measurement starts
    rows = [
        "| script | batch | option | s / update (median) | min | GFLOP / update | achieved | of the matmul rate |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    memory_rows = []
    profiles = []
    action_dim = 6  # cheetah_run's, as --env-id's help says
    # the replays filled first, all of them, as a run fills its own before any update: configure_torch keeps freed
    # memory in the process, where a replay made after it would find pages already resident; then sampled as a run
    # samples, after configure_torch
    replays = []
    fill_replay(load_script(args.scripts[0]), 1000, action_dim, "cpu")  # dropped: the first fill's one-time costs
    # (about 13 MB of the process's own) would be counted in the first replay's memory
    for name in args.scripts:
        module = load_script(name)
        base = module.resolve_args(module.Args(env_id=args.env_id, batch_size=args.batch_size))
        for replay_device in ["cpu", "cuda"] if device.type == "cuda" else ["cpu"]:
            replay, replay_rss = fill_replay(module, args.replay_transitions, action_dim, replay_device)
            replays.append((name, module, base, replay_device, replay, replay_rss))
    for name, module, base, replay_device, replay, replay_rss in replays:
        module.configure_torch(base)
        allocated = module.ReplayBuffer.memory(replay.capacity, replay.frames.shape[1:], replay.actions.shape[1])
        if replay_device == "cuda":
            replay_rss = allocated
            where = "frames in GPU memory"
        else:
            where = f"{replay_rss / replay.num_transitions:.0f} B / transition resident"
        # a batch sampled and on the training device, as the update receives it
        sample, _ = timed(lambda: sample_to(replay, base.batch_size, device), max(args.repeats, 20), device)  # noqa: B023
        memory_rows.append(
            f"| {name} | {replay_device} | {replay.num_transitions} | {allocated / replay.capacity:.0f} | "
            f"{replay_rss / 1e6:.0f} MB ({where}) | {base.batch_size} | {1000 * sample:.1f} |"
        )
    replays.clear()  # the replays freed before the updates are timed
    replay = None
    for name in args.scripts:
        module = load_script(name)
        base = module.resolve_args(module.Args(env_id=args.env_id, batch_size=args.batch_size))
        batch = random_batch(module, base.batch_size, action_dim, device)
        flops = {}  # FLOPs of one update by the options that change the computation (compiling changes none)
        for option in args.options:
            flags = OPTIONS[option]
            needs_cuda = any(flag in flags for flag in CUDA_ONLY)
            if (needs_cuda and device.type != "cuda") or not set(flags) <= set(vars(base)):
                continue
            dtype = torch.bfloat16 if flags.get("amp") == "bf16" else torch.float32
            # without bf16 instructions a CPU runs bf16 in software (a 2048 matmul took a minute on a 2-core AMD EPYC):
            # its updates are timed alone, and its matmul rate is not measured
            software_bf16 = (
                dtype == torch.bfloat16 and device.type == "cpu" and not set(BF16_UNITS.values()) & cpu_flags()
            )
            work = {key: value for key, value in flags.items() if key not in SAME_WORK}
            module.configure_torch(base)  # FLOPs counted under the default settings
            if str(work) not in flops:
                torch.manual_seed(0)
                plain = module.Agent((9, 84, 84), action_dim, dataclasses.replace(base, **work), device)
                flops[str(work)] = update_flops(plain, batch)
                del plain
            configured = dataclasses.replace(base, **flags)
            module.configure_torch(configured)  # matmuls run in full fp32 or bf16 (--tf32 is about convolutions)
            torch.manual_seed(0)
            agent = module.Agent((9, 84, 84), action_dim, configured, device)
            print(f"{name}: timing {option} at batch {base.batch_size} ...", flush=True)
            try:
                update = lambda a=agent, b=batch: a.update(b, step=10_000)
                if software_bf16:
                    median, best = timed(update, args.repeats, device)
                else:
                    median, best, rate = timed_beside_matmuls(update, args.repeats, device, dtype)
            except Exception as error:  # noqa: BLE001 (one failing option is reported, the others still measured)
                rows.append(
                    f"| {name} | {base.batch_size} | {option} | failed: {type(error).__name__}: "
                    f"{str(error).splitlines()[0][:150]} | | | | |"
                )
                print(rows[-1], flush=True)
                continue
            achieved = flops[str(work)] / median
            rows.append(
                f"| {name} | {base.batch_size} | {option} | {median:.3f} | {best:.3f} | {flops[str(work)] / 1e9:.0f} | "
                f"{achieved / 1e9:.1f} GFLOP/s | "
                + (
                    "not measured: no bf16 instructions on this CPU |"
                    if software_bf16
                    else f"{100 * achieved / rate:.0f}% of {rate / 1e9:.0f} GFLOP/s ({str(dtype).split('.')[-1]}) |"
                )
            )
            print(rows[-1], flush=True)
            if args.profile:
                profiles.append(profiled(update, f"{name}, {option}", args.profile))
            del agent

    fps = environment_fps(module, args.env_id, args.env_steps)
    table = "\n".join(rows)
    table += (
        "\n\n| script | replay on | transitions in the replay | bytes allocated / transition | memory of the filled "
    )
    table += "replay | batch | ms / batch on the device (median) |\n| --- | --- | --- | --- | --- | --- | --- |\n"
    table += "\n".join(memory_rows)
    table += f"\n\nEnvironment: {args.env_id}, {fps:.0f} frames / s (step and 84x84 render, MUJOCO_GL="
    table += f"{os.environ['MUJOCO_GL']}, one process).\n"
    table += "".join(profiles)
    header = f"## {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {measured}, {device.type}\n\n"
    header += f"- command: `python {shlex.join(sys.argv)}`\n- machine: {machine(device)}\n"
    header += f"- updates: median and minimum of {args.repeats} after one warm-up, random data of the shapes of "
    header += f"{args.env_id}; FLOPs counted by torch.utils.flop_counter over one update; the matmul rate of the "
    header += "update's dtype: median of rounds of 8 square matmuls, one before each timed update\n\n"
    report(header + table, args.results)


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
