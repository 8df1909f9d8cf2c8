# Memory a CPU run needs besides its replay: for each agent script, a fresh process builds the two environments of a
# run and the agent with a task's default settings, then runs updates on random batches of each size. Its
# peak resident memory (getrusage's ru_maxrss), after the first update and after the last, is what the script's
# update_memory(args) allowance must cover, at each batch size and frame stack: before a run starts, the scripts check
# the replay plus that allowance against the memory available. Prints a Markdown table and appends it, with the
# commit, the command and the machine, to benchmarks/RESULTS.md.
#   python benchmarks/update_memory.py                # about 5 minutes on 2 cores
import multiprocessing
import os
import resource
import sys
import time
from dataclasses import dataclass, field

import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from speed import ROOT, commit, load_script, machine, random_batch, report, rss_bytes


@dataclass
class Args:
    scripts: list[str] = field(default_factory=lambda: ["drqv2_continuous_action", "taco_continuous_action"])
    """agent scripts to measure (file names without .py)"""
    env_id: str = "cheetah_run"
    """task whose default settings and action size (6) the agent takes"""
    updates: int = 5
    """updates per script; the peak is read after the first and after the last"""
    batch_sizes: list[int] = field(default_factory=lambda: [0, 64])
    """batch sizes to measure each script at (0: its default for the task)"""
    frame_stacks: list[int] = field(default_factory=lambda: [3, 9])
    """frame stacks to measure each script at"""
    results: str = os.path.join(ROOT, "benchmarks", "RESULTS.md")
    """Markdown file the results are appended to; empty to only print them"""


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def measure(name: str, env_id: str, updates: int, batch_size: int, frame_stack: int, results):
    """In a fresh process: the peak memory of a run's environments, agent and updates, without a replay."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    module = load_script(name)
    sizes = {"batch_size": batch_size or None, "frame_stack": frame_stack}
    args = module.resolve_args(module.Args(env_id=env_id, **sizes))
    module.configure_torch(args)
    torch.manual_seed(0)
    imported = rss_bytes()
    envs = [module.DMCPixelEnv(env_id, seed, args.action_repeat, args.frame_stack) for seed in (0, 1)]
    for env in envs:
        env.reset()
    agent = module.Agent(envs[0].observation_shape, envs[0].action_dim, args, torch.device("cpu"))
    batch = random_batch(module, args.batch_size, envs[0].action_dim)
    for key in [key for key in ("obs", "next_obs", "future_obs") if key in batch]:  # the frame stack's channels
        batch[key] = batch[key][:, :1].repeat(1, 3 * frame_stack, 1, 1)
    peaks = [peak_rss()]
    for step in range(updates):
        metrics = agent.update(batch, step=10_000 + step)
        assert all(torch.isfinite(value) for value in metrics.values())
        peaks.append(peak_rss())
    row = {"script": name, "batch": args.batch_size, "imported": imported, "built": peaks[0], "first": peaks[1]}
    results.put({**row, "stack": frame_stack, "last": peaks[-1]})
    results.put(module.update_memory(args))


def main(args: Args):
    measured = commit()
    rows = [
        "| script | batch | frame stack | after imports | peak with environments, agent and batch | peak after the "
        + "first update | peak after the last | update_memory(args) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    context = multiprocessing.get_context("spawn")  # a fresh process per script: one peak does not hide another
    settings = [(name, b, f) for name in args.scripts for b in args.batch_sizes for f in args.frame_stacks]
    for name, batch_size, frame_stack in settings:
        print(f"{name}, batch {batch_size or 'default'}, frame stack {frame_stack}: {args.updates} updates", flush=True)
        results = context.Queue()
        work = (name, args.env_id, args.updates, batch_size, frame_stack, results)
        process = context.Process(target=measure, args=work)
        process.start()
        row, allowance = results.get(), results.get()
        process.join()
        if process.exitcode != 0:
            raise SystemExit(f"{name}: the measuring process failed (exit code {process.exitcode})")
        gb = {key: f"{row[key] / 1e9:.2f} GB" for key in ("imported", "built", "first", "last")}
        rows.append(
            f"| {name} | {row['batch']} | {frame_stack} | {gb['imported']} | {gb['built']} | {gb['first']} | {gb['last']} | "
            f"{allowance / 1e9:.1f} GB |"
        )
        print(rows[-1], flush=True)
        if row["last"] > allowance:
            print(f"warning: {name} peaked above its update_memory(args) allowance", flush=True)
    header = f"## {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {measured}, cpu (update memory)\n\n"
    header += f"- command: `python {' '.join(sys.argv)}`\n- machine: {machine(torch.device('cpu'))}\n"
    header += "- what: peak resident memory (ru_maxrss) of a fresh process holding both environments of a run on "
    header += f"{args.env_id} and the agent with its default settings but each row's batch size and frame stack, "
    header += "after the first and the last of "
    header += f"{args.updates} updates on random batches; no replay\n\n"
    table = "\n".join(rows) + "\n"
    report(header + table, args.results)


if __name__ == "__main__":
    main(tyro.cli(Args))
