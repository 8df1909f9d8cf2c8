# Evaluates a model saved by either agent script's --save-model (or the policy in a run's checkpoint.pt), as
# CleanRL's cleanrl_utils/evals do: N episodes acting with the policy's mean action on the task it was trained on (or
# another task with the same action size), the first one filmed if asked. Prints the mean and standard deviation of
# the return and writes them, with each episode's return, to a JSON file next to the model.
#   python evaluate_model.py runs/<run_name>/drqv2_continuous_action.cleanrl_model --num-episodes 10
#   python evaluate_model.py runs/<run_name>/checkpoint.pt
# The networks, the environment and the evaluation loop are those of the script that trained the model, found by the
# algorithm the model records (a script's code above its `# Run machinery.` banner, hashed); --script names another.
import contextlib
import importlib.util
import json
import os
import pickle
import re
import tempfile
import zipfile
from dataclasses import dataclass
from typing import Annotated

import numpy as np
import torch
import tyro

from plot import unwritable  # why a folder cannot be written, or None

ROOT = os.path.dirname(os.path.abspath(__file__))
AGENT_SCRIPTS = ["drqv2_continuous_action", "taco_continuous_action"]
# what this file uses of an agent script
AGENT_PARTS = ["ALGORITHM", "Args", "Encoder", "Actor", "DMCPixelEnv", "TASK_PRESET", "evaluate", "NonFiniteAction"]
AGENT_PARTS += ["make_folder"]
SAVED_KEYS = {"encoder", "actor", "args", "obs_shape", "action_dim"}
# the training settings read here, and their types
TRAINED_ARGS = {"env_id": str, "exp_name": str, "seed": int}
TRAINED_ARGS |= {"feature_dim": int, "hidden_dim": int, "action_repeat": int, "frame_stack": int}

# a field whose docstring says its default: --help shows that one, not "None"
DOCUMENTED_DEFAULT = tyro.conf.arg(help_behavior_hint="")


@dataclass
class Args:
    """Evaluates a model saved by an agent script's --save-model (or the policy of a run's checkpoint.pt): episodes
    with the policy's mean action; prints the return's mean and standard deviation and writes them to a JSON file."""

    model_path: tyro.conf.Positional[str]
    """the `.cleanrl_model` file that `--save-model` wrote, or a run's `checkpoint.pt`"""
    script: Annotated[str | None, DOCUMENTED_DEFAULT] = None
    """the agent script to build the networks with (default: the one whose code trained the model; docs/running.md)"""
    env_id: Annotated[str | None, DOCUMENTED_DEFAULT] = None
    """task to evaluate on (default: the one the model was trained on); it must have the same action size"""
    num_episodes: int = 10
    """evaluation episodes"""
    seed: int = 100
    """seed of the evaluation environment (a training run's own evaluations use its --seed)"""
    max_episode_frames: Annotated[int | None, DOCUMENTED_DEFAULT] = None
    """cut episodes after this many frames (default: the task's time limit); for quick checks only"""
    capture_video: bool = False
    """if toggled, films the first episode to a `.mp4` next to the model, named as the default results file"""
    output: Annotated[str | None, DOCUMENTED_DEFAULT] = None
    """JSON file for the results (default: next to the model, `<model's name>_eval_<env_id>_seed<seed>.json`)"""
    cuda: bool = True
    """runs the networks on the GPU when there is one (--no-cuda: on the CPU)"""


class RunError(Exception):
    """Bad input or a file that cannot be used: said in one line, with a non-zero exit."""


def first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__


LOADED = {}  # agent scripts loaded, by path


def agent_script(path: str):
    """An agent script as a module (its main() does not run): its environment, networks and evaluation loop."""
    if path not in LOADED:
        spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
        if spec is None or not os.path.isfile(path):
            raise RunError(f"cannot load the agent script {path}: it is not a Python file")
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)  # sets MUJOCO_GL=egl unless it is set
        except Exception as error:  # no such file, a syntax error, an import that fails
            raise RunError(f"cannot load the agent script {path} ({first_line(error)})") from error
        missing = [part for part in AGENT_PARTS if not hasattr(module, part)]
        if missing:
            raise RunError(f"{path} is not an agent script (it lacks {', '.join(missing)})")
        LOADED[path] = module
    return LOADED[path]


def script_of(saved: dict, model_path: str, script: str | None):
    """The agent script to build the model's networks with, as a module: --script (a warning when its code is not
    the model's); else the first of these whose algorithm the model records: the script it records (models do),
    `{exp_name}.py` in the folder holding its runs/ and beside this file, the two agent scripts here. A model of an
    older version records no algorithm: the first of them that holds its settings, with a warning."""
    algorithm = saved.get("algorithm")
    recorded = saved.get("script") if isinstance(saved.get("script"), str) else None
    if script:
        module = agent_script(script)
        if module.ALGORITHM != algorithm:
            name = os.path.relpath(module.__file__)
            print(
                f"warning: {name} is not the code that trained the model: its networks are built as {name} builds them"
            )
        return module
    exp_name = saved["args"]["exp_name"]
    runs_folder = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(model_path))))  # <it>/runs/<run>/
    paths = [recorded, os.path.join(runs_folder, f"{exp_name}.py"), os.path.join(ROOT, f"{exp_name}.py")]
    paths += [os.path.join(ROOT, f"{name}.py") for name in AGENT_SCRIPTS]
    tried = []
    for path in dict.fromkeys(path for path in paths if isinstance(path, str) and os.path.isfile(path)):
        try:
            module = agent_script(path)
        except RunError as error:  # not an agent script, or one that does not load: said if none fits
            tried.append(f"{os.path.relpath(path)} ({error})")
            continue
        name = os.path.relpath(path)
        if algorithm is None and set(vars(module.Args())) == set(saved["args"]):
            print(f"warning: the model records no algorithm (an older version saved it): built as {name} builds it now")
            return module
        if module.ALGORITHM == algorithm:
            if recorded and path != recorded:
                print(f"note: {recorded}, which saved the model, is gone or changed; {name} holds the code that did")
            return module
        tried.append(f"{name} (another algorithm)")
    if recorded and os.path.isfile(recorded):
        name = os.path.relpath(recorded)
        raise RunError(
            f"{name}, which saved the model, changed above its `# Run machinery.` banner since: undo that, or pass "
            f"--script {name} to build the networks as it does now"
        )
    gone = f"{recorded}, which saved the model, is not there any more" if recorded else "no script records the model"
    raise RunError(f"{gone}, and no other is its code (tried {', '.join(tried) or 'none'}): name one with --script")


class Policy:
    """The saved encoder and actor, acting with the mean action (the scripts' `evaluate` calls `act`)."""

    def __init__(self, encoder, actor, device):
        self.encoder = encoder
        self.actor = actor
        self.device = device

    @torch.no_grad()
    def act(self, obs, step, eval_mode=True):
        return self.actor(self.encoder(torch.as_tensor(obs, device=self.device)[None]))[0].cpu().numpy()


def model_of_checkpoint(checkpoint: dict) -> dict:
    """What --save-model would have saved at the checkpoint's frame: the encoder and actor, with the run's settings."""
    agent = checkpoint["agent"] if isinstance(checkpoint["agent"], dict) else {}
    encoder, actor = agent.get("encoder", {}), agent.get("actor", {})
    if not isinstance(encoder, dict) or not isinstance(actor, dict):
        return {}
    convolutions = [w for w in encoder.values() if isinstance(w, torch.Tensor) and w.ndim == 4]
    layers = [w for w in actor.values() if isinstance(w, torch.Tensor) and w.ndim == 2]
    if not convolutions or not layers:
        return {}
    image_size = 84  # the scripts' DMCPixelEnv renders 84x84 pixels
    obs_shape = [convolutions[0].shape[1], image_size, image_size]  # the first convolution takes the stacked frames
    action_dim = layers[-1].shape[0]  # the actor's last linear layer gives the action
    return {
        "encoder": encoder,
        "actor": actor,
        "args": checkpoint["args"],
        "algorithm": checkpoint.get("algorithm"),
        "global_step": checkpoint["global_step"],
        "script": checkpoint.get("script"),
        "obs_shape": obs_shape,
        "action_dim": action_dim,
    }


def malformed(saved: dict) -> str | None:
    """What in a dict holding SAVED_KEYS is not of the kind --save-model writes, or None."""
    for name in ["encoder", "actor"]:
        if not isinstance(saved[name], dict) or not all(isinstance(v, torch.Tensor) for v in saved[name].values()):
            return f"{name} is not a dict of tensors"
        if not all(v.isfinite().all() for v in saved[name].values()):
            return f"{name} holds weights that are not finite (NaN or inf)"
    shape = saved["obs_shape"]
    if not isinstance(shape, (list, tuple)) or len(shape) != 3 or not all(type(n) is int and n > 0 for n in shape):
        return "obs_shape is not 3 positive whole numbers"
    if type(saved["action_dim"]) is not int or saved["action_dim"] < 1:
        return "action_dim is not a positive whole number"
    trained = saved["args"]
    if not isinstance(trained, dict):
        return "args is not a dict"
    missing = sorted(set(TRAINED_ARGS) - set(trained))
    if missing:
        return f"args lacks {', '.join(missing)}"
    for name, kind in TRAINED_ARGS.items():
        if type(trained[name]) is not kind or (kind is int and name != "seed" and trained[name] < 1):
            return f"args' {name} is not a {'string' if kind is str else 'positive whole number'}"
    return None


def unlike_torch_save(records: list, file_size: int) -> str | None:
    """How a zip file's records differ from torch.save's, which stores each as it is, or None: a compressed record
    (a small file that unpacks to gigabytes), or sizes declared beyond what the file holds."""
    packed = [r.filename for r in records if r.compress_type != zipfile.ZIP_STORED or r.compress_size != r.file_size]
    declared = sum(r.file_size for r in records)
    if packed:
        return f"is not as torch.save writes it: its record {packed[0]} is compressed; nothing was unpacked"
    if declared > file_size:
        return f"is not as torch.save writes it: its records declare {declared} bytes, more than its {file_size}"
    return None


def load_policy(path: str, device, script: str | None = None):
    """(policy, saved dict, the agent script as a module), or a RunError naming what is wrong with the file."""
    if os.path.isdir(path):
        raise RunError(f"{path} is a folder, not a model file: pass the .cleanrl_model or checkpoint.pt in it")
    if not os.path.isfile(path):
        raise RunError(f"{path}: no such file")
    try:
        # every record of the zip file against its CRC first, as --resume checks a checkpoint: torch.load checks none
        # and would load flipped bits as weights (this reads all of a checkpoint, its replay included)
        with zipfile.ZipFile(path) as archive:
            problem = unlike_torch_save(archive.infolist(), os.path.getsize(path))
            damaged = None if problem else archive.testzip()
        problem = problem or damaged and f"is corrupt: its record {damaged} does not match its CRC"
        # weights only: loading runs no code; memory-mapped on the CPU: a checkpoint's replay is not read again
        saved = None if problem else torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as error:  # torch refuses objects other than tensors and plain containers
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        what = f" ({found.group(1)})" if found else ""
        raise RunError(
            f"{path} holds Python objects{what} that weights-only loading refuses: loading them can execute arbitrary "
            "code; torch.load(path, weights_only=False) does it, only for a file from a source you trust"
        ) from error
    except Exception as error:  # a damaged or foreign file fails in many ways inside torch.load
        raise RunError(f"{path} is not a readable model file ({first_line(error)})") from error
    if problem:
        raise RunError(f"{path} {problem}")
    if isinstance(saved, dict) and {"agent", "args", "global_step"} <= set(saved):  # a checkpoint: its policy part
        saved = model_of_checkpoint(saved)
    if not isinstance(saved, dict) or not SAVED_KEYS <= set(saved):
        missing = sorted(SAVED_KEYS - set(saved)) if isinstance(saved, dict) else sorted(SAVED_KEYS)
        raise RunError(f"{path} is not a model saved by --save-model (missing {', '.join(missing)})")
    problem = malformed(saved)
    if problem:
        raise RunError(f"{path} is not a model saved by --save-model ({problem})")
    trained = saved["args"]
    module = script_of(saved, path, script)
    try:
        encoder = module.Encoder(saved["obs_shape"]).to(device)
        actor = module.Actor(encoder.repr_dim, saved["action_dim"], trained["feature_dim"], trained["hidden_dim"])
        encoder.load_state_dict(saved["encoder"])
        actor.load_state_dict(saved["actor"])
    except (RuntimeError, ValueError) as error:  # torch's first line names no tensor: the next ones do
        lines = [line.strip() for line in str(error).splitlines()[1:] if line.strip()] or [first_line(error)]
        detail = lines[0][:300]
        raise RunError(
            f"{path}: the weights do not fit the networks of {os.path.relpath(module.__file__)} ({detail})"
        ) from error
    return Policy(encoder.eval(), actor.to(device).eval(), device), saved, module


def same_file(a: str, b: str) -> bool:
    """Whether two paths name one file: by any spelling, through symbolic links, or as hard links of one file."""
    return (
        os.path.realpath(a) == os.path.realpath(b) or os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)
    )


def write_results(result: dict, output: str):
    """The results as JSON in a new temporary file beside `output`, renamed over it: a failure leaves what was there,
    and a link at `output` is replaced, not written through."""
    folder, name = os.path.split(os.path.abspath(output))
    descriptor, temporary = tempfile.mkstemp(prefix=f".{name}.", dir=folder)
    try:
        with os.fdopen(descriptor, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
        os.chmod(temporary, 0o644)  # as open() makes a file (mkstemp's are private)
        os.replace(temporary, output)
    except OSError as error:
        raise RunError(f"cannot write {output} ({error.strerror}); the returns were {result['returns']}") from error
    finally:
        with contextlib.suppress(OSError):
            os.remove(temporary)


def main(args: Args):
    if args.num_episodes < 1:
        raise RunError(f"--num-episodes must be positive, got {args.num_episodes}")
    if args.max_episode_frames is not None and args.max_episode_frames < 1:
        raise RunError(f"--max-episode-frames must be positive, got {args.max_episode_frames}")
    if not 0 <= args.seed < 2**32:
        raise RunError(f"--seed must be in [0, 2**32), as numpy's seeds, got {args.seed}")
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    policy, saved, module = load_policy(args.model_path, device, args.script)
    trained = saved["args"]
    env_id = args.env_id or trained["env_id"]
    if env_id not in module.TASK_PRESET:
        raise RunError(f"unknown env_id {env_id!r}; valid tasks: {', '.join(sorted(module.TASK_PRESET))}")
    env_kwargs = {"action_repeat": trained["action_repeat"], "frame_stack": trained["frame_stack"]}
    env = module.DMCPixelEnv(env_id, args.seed, max_episode_frames=args.max_episode_frames, **env_kwargs)
    if env.action_dim != saved["action_dim"]:
        raise RunError(
            f"{env_id} has {env.action_dim}-dimensional actions; the model was trained on {trained['env_id']}, "
            f"with {saved['action_dim']}"
        )
    if tuple(env.observation_shape) != tuple(saved["obs_shape"]):
        raise RunError(
            f"the model takes observations of shape {tuple(saved['obs_shape'])}; {env_id} with frame_stack "
            f"{trained['frame_stack']} gives {tuple(env.observation_shape)}"
        )
    folder = os.path.dirname(os.path.abspath(args.model_path))
    total = trained.get("total_timesteps")  # a model is saved at the end of its run; a checkpoint records its step
    steps = saved.get("global_step", total // trained["action_repeat"] if type(total) is int else None)
    frame = steps * trained["action_repeat"] if type(steps) is int else None
    trainers_code = module.ALGORITHM == saved.get("algorithm")
    model_name = os.path.splitext(os.path.basename(args.model_path))[0]
    at = f"_frame{frame}" if "global_step" in saved else ""  # a checkpoint's frame
    name = f"{model_name}{at}_eval_{env_id}_seed{args.seed}"
    if args.num_episodes != Args.num_episodes:  # results of other settings do not replace the default's
        name += f"_{args.num_episodes}episode{'s' if args.num_episodes > 1 else ''}"
    if args.max_episode_frames:
        name += f"_cut{args.max_episode_frames}"
    if not trainers_code:  # --script of other code than the trainer's, or a model older than that record
        name += f"_built-by-{module.__name__}"
    video_path = os.path.join(folder, f"{name}.mp4") if args.capture_video else None
    output = args.output or os.path.join(folder, f"{name}.json")
    # what will be written, checked before the evaluation, not after it
    if os.path.isdir(output):
        named = f"--output {output} is a folder: name a file"
        raise RunError(named if args.output else f"{output} is a folder: name another file with --output")
    if video_path and same_file(output, video_path):
        raise RunError(f"--output {output} is the video --capture-video writes: name another file")
    for path in [p for p in [output, video_path] if p]:
        problem = unwritable(os.path.dirname(os.path.abspath(path)))
        if not problem and os.path.exists(path) and not os.access(path, os.W_OK):
            problem = f"{path} is not writable"
        if path == video_path and os.path.islink(path):  # the video is written in place (the results are renamed)
            problem = "it is a symbolic link, which the video would be written through"
        if same_file(path, args.model_path):  # by another spelling, a link or a hard link: it would replace the model
            problem = f"it is the model file {args.model_path}"
        if problem:
            where = " (--output writes the results elsewhere)" if path == output and not args.output else ""
            raise RunError(f"cannot write {path}: {problem}{where}")
    module.make_folder(os.path.dirname(os.path.abspath(output)))
    named = "" if trained["exp_name"] == module.__name__ else f" as {trained['exp_name']}"
    trainer = f"{os.path.relpath(module.__file__)}{named}, trained on {trained['env_id']} for {frame} frames"
    print(f"evaluating {args.model_path} ({trainer}) on {env_id}: ", end="")
    print(f"{args.num_episodes} episode{'s' if args.num_episodes > 1 else ''}, seed {args.seed}", flush=True)
    try:
        returns = [float(r) for r in module.evaluate(policy, env, args.num_episodes, video_path)]
    except module.NonFiniteAction as error:
        raise RunError(f"the policy gave a non-finite {error}: its weights overflow on this task's images") from None
    if not np.isfinite(returns).all():
        raise RunError(f"the episodes' returns {returns} are not all finite (the simulation diverged?): no results")
    result = {
        "model": os.path.abspath(args.model_path),
        "exp_name": trained["exp_name"],
        "script": module.__file__,
        "script_trained_it": trainers_code,
        "trained_frames": frame,
        "trained_env_id": trained["env_id"],
        "trained_seed": trained["seed"],
        "env_id": env_id,
        "seed": args.seed,
        "max_episode_frames": args.max_episode_frames,
        "episodes": len(returns),
        "mean": float(np.mean(returns)),
        "std": float(np.std(returns)),
        "returns": returns,
    }
    replaced = " (replacing the results that were there)" if os.path.exists(output) else ""
    write_results(result, output)
    episodes = f"{len(returns)} episode{'s' if len(returns) > 1 else ''}"
    print(f"return {result['mean']:.1f} ± {result['std']:.1f} (mean ± std over {episodes}); {output}{replaced}")
    if video_path:
        print(f"video: {video_path}")
    return result


if __name__ == "__main__":
    arguments = tyro.cli(Args)
    try:
        main(arguments)
    except Exception as error:  # one clear line and a non-zero exit: this file's RunError, or an agent script's
        if type(error).__name__ != "RunError":
            raise
        raise SystemExit(f"error: {error}") from None
