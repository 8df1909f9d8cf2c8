"""evaluate_model.py: a model saved by --save-model, evaluated on its task; bad and mismatched files refused."""

import errno
import glob
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, load_script


@pytest.fixture(scope="module")
def saved_model(tiny_run):
    """The model saved by the session's tiny TACO run on cartpole_balance (1-dimensional actions)."""
    _, run_dir = tiny_run("taco_continuous_action")
    (path,) = glob.glob(f"{run_dir}/*.cleanrl_model")
    return path


def taco_of(evaluate_model):
    """The TACO script as evaluate_model.py loads it to evaluate a TACO model: its evaluate() is what tests replace."""
    return evaluate_model.agent_script(os.path.join(evaluate_model.ROOT, "taco_continuous_action.py"))


def evaluate(*args):
    command = [sys.executable, str(ROOT / "evaluate_model.py"), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)


def test_evaluates_a_saved_model_and_writes_its_returns(saved_model, tmp_path):
    output = tmp_path / "not yet made" / "result.json"  # the folder is made before the evaluation
    result = evaluate(
        saved_model, "--num-episodes", 3, "--max-episode-frames", 40, "--output", output, "--capture-video"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads(output.read_text())
    assert saved["env_id"] == saved["trained_env_id"] == "cartpole_balance" and saved["episodes"] == 3
    returns = np.array(saved["returns"])
    assert len(returns) == 3 and np.all((returns >= 0) & (returns <= 40)), "at most 1 per frame on cartpole"
    assert saved["mean"] == pytest.approx(returns.mean()) and saved["std"] == pytest.approx(returns.std())
    assert f"return {returns.mean():.1f} ± {returns.std():.1f}" in result.stdout
    video = glob.glob(
        saved_model.rsplit("/", 1)[0] + "/taco_continuous_action_eval_cartpole_balance_seed100_3episodes_cut40.mp4"
    )
    assert video, "the first episode is filmed next to the model"

    again = evaluate(saved_model, "--num-episodes", 3, "--max-episode-frames", 40, "--output", tmp_path / "b.json")
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((tmp_path / "b.json").read_text())["returns"] == saved["returns"], "same seed, same episodes"


def test_a_checkpoint_is_evaluated_as_the_model_saved_beside_it(saved_model, tmp_path):
    """The final checkpoint.pt holds the policy the model file holds: same seed, same returns."""
    checkpoint = saved_model.rsplit("/", 1)[0] + "/checkpoint.pt"
    results = []
    for path in [saved_model, checkpoint]:
        output = tmp_path / f"{path.rsplit('/', 1)[1]}.json"
        result = evaluate(path, "--num-episodes", 2, "--max-episode-frames", 40, "--output", output)
        assert result.returncode == 0, result.stderr[-3000:]
        results.append(json.loads(output.read_text()))
    assert results[1]["returns"] == results[0]["returns"] and results[1]["exp_name"] == "taco_continuous_action"


def test_another_task_with_the_same_action_size_is_allowed(saved_model, tmp_path):
    result = evaluate(saved_model, "--env-id", "pendulum_swingup", "--num-episodes", 1, "--max-episode-frames", 20)
    assert result.returncode == 0, result.stderr[-3000:]
    (written,) = glob.glob(
        saved_model.rsplit("/", 1)[0] + "/taco_continuous_action_eval_pendulum_swingup_seed100_1episode_cut20.json"
    )
    with open(written) as f:
        assert json.load(f)["trained_env_id"] == "cartpole_balance"


class Unsafe:
    """A Python object in a file: weights-only loading refuses it (unpickling it could run any code)."""


def flip_bits(source, target):
    """A copy of a file torch.save wrote with bits flipped in the middle of its largest tensor: torch.load reads it
    without a word; its record's CRC no longer matches."""
    with zipfile.ZipFile(source) as archive:
        record = max(archive.infolist(), key=lambda r: r.file_size)
    data = bytearray(Path(source).read_bytes())
    name_length, extra_length = struct.unpack("<HH", data[record.header_offset + 26 : record.header_offset + 30])
    middle = record.header_offset + 30 + name_length + extra_length + record.file_size // 2
    for i in range(0, 64, 8):
        data[middle + i] ^= 0x10
    Path(target).write_bytes(data)
    return record.filename


PROBLEMS = ["garbage", "not_a_model", "missing", "other_actions", "unknown_task", "objects", "frames", "seed"]
PROBLEMS += ["damaged_model", "damaged_checkpoint", "folder", "wrong_types", "args_missing", "other_frame_stack"]
PROBLEMS += ["output_folder", "output_under_a_file", "nan_weights"]


@pytest.mark.parametrize("problem", PROBLEMS)
def test_bad_input_gets_one_line(saved_model, tmp_path, problem):
    path, extra = tmp_path / "model.cleanrl_model", []
    if problem == "objects":
        torch.save({"encoder": Unsafe()}, path)
        expected = "holds Python objects (test_evaluate.Unsafe) that weights-only loading refuses: loading them can"
    elif problem == "frames":
        path, extra = saved_model, ["--max-episode-frames", "-5"]
        expected = "--max-episode-frames must be positive, got -5"
    elif problem == "seed":
        path, extra = saved_model, ["--seed", str(2**32)]
        expected = "--seed must be in [0, 2**32), as numpy's seeds, got 4294967296"
    elif problem == "garbage":
        path.write_bytes(b"not a torch file at all")
        expected = "is not a readable model file"
    elif problem == "not_a_model":
        torch.save({"encoder": {}}, path)
        expected = "is not a model saved by --save-model (missing action_dim, actor, args, obs_shape)"
    elif problem in ["damaged_model", "damaged_checkpoint"]:
        source = saved_model if problem == "damaged_model" else Path(saved_model).parent / "checkpoint.pt"
        record = flip_bits(source, path)
        expected = f"{path} is corrupt: its record {record} does not match its CRC"
    elif problem == "folder":
        path, expected = Path(saved_model).parent, "is a folder, not a model file: pass the .cleanrl_model or"
    elif problem == "wrong_types":
        torch.save({"encoder": 1, "actor": "x", "args": {}, "obs_shape": 3, "action_dim": "a"}, path)
        expected = "is not a model saved by --save-model (encoder is not a dict of tensors)"
    elif problem in ["args_missing", "other_frame_stack", "nan_weights"]:
        saved = torch.load(saved_model, weights_only=True)
        if problem == "nan_weights":  # the policy would act NaN: torch.load and the networks take them silently
            next(iter(saved["actor"].values()))[0] = float("nan")
            expected = "is not a model saved by --save-model (actor holds weights that are not finite (NaN or inf))"
        elif problem == "args_missing":
            del saved["args"]["hidden_dim"]
            expected = "is not a model saved by --save-model (args lacks hidden_dim)"
        else:
            saved["args"]["frame_stack"] = 1  # the weights take 3 stacked frames
            expected = "the model takes observations of shape (9, 84, 84); cartpole_balance with frame_stack 1 gives"
        torch.save(saved, path)
    elif problem == "output_folder":
        path, extra = saved_model, ["--output", tmp_path]
        expected = f"--output {tmp_path} is a folder: name a file"
    elif problem == "output_under_a_file":
        (tmp_path / "file").write_text("")
        path, extra = saved_model, ["--output", tmp_path / "file" / "result.json"]
        expected = f"cannot write {tmp_path / 'file' / 'result.json'}: {tmp_path / 'file'} is a file, not a folder"
    elif problem == "missing":
        path, expected = tmp_path / "nothing.cleanrl_model", "no such file"
    elif problem == "other_actions":
        path, extra = saved_model, ["--env-id", "cheetah_run"]
        expected = "cheetah_run has 6-dimensional actions; the model was trained on cartpole_balance, with 1"
    else:
        path, extra = saved_model, ["--env-id", "cartpole_sideways"]
        expected = "unknown env_id 'cartpole_sideways'"
    result = evaluate(path, *extra, "--num-episodes", 1)
    lines = [line for line in result.stderr.splitlines() if not line.startswith("WARNING:absl")]  # dm_control's
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr[-2000:]


@pytest.mark.parametrize("where", ["beside the model", "--output"])
def test_an_output_folder_that_cannot_be_written_is_refused_before_the_episodes(
    saved_model, tmp_path, where, monkeypatch
):
    """The tests run as root, whom permission bits do not stop: the read-only folder is one os.access says so of (as it
    does for root on a read-only file system)."""
    evaluate_model = load_script("evaluate_model")
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    model, output = Path(saved_model), None
    if where == "beside the model":
        model = Path(shutil.copy(saved_model, read_only))
    else:
        output = read_only / "results" / "result.json"
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: "read-only" not in str(path) and access(path, mode))
    monkeypatch.setattr(taco_of(evaluate_model), "evaluate", lambda *_: pytest.fail("the episodes ran first"))
    args = evaluate_model.Args(
        model_path=str(model), num_episodes=1, max_episode_frames=20, output=output and str(output)
    )
    written = output or read_only / "taco_continuous_action_eval_cartpole_balance_seed100_1episode_cut20.json"
    hint = " (--output writes the results elsewhere)" if output is None else ""
    message = f"cannot write {written}: {read_only} is not writable{hint}"
    with pytest.raises(evaluate_model.RunError, match=f"^{re.escape(message)}$"):
        evaluate_model.main(args)
    assert sorted(read_only.iterdir()) == ([] if output else [model]), "nothing written"


@pytest.mark.parametrize("spelling", ["same path", "another spelling", "symbolic link", "hard link"])
def test_an_output_that_is_the_model_is_refused_and_the_model_kept(saved_model, tmp_path, monkeypatch, spelling):
    """By any spelling of its path or a link to it: the results would replace the model (a 55 MB checkpoint became
    333 bytes of JSON). The default names, the model's own name followed by `_eval_...`, are never the model's."""
    evaluate_model = load_script("evaluate_model")
    model = tmp_path / "runs" / "model.cleanrl_model"
    model.parent.mkdir()
    shutil.copy(saved_model, model)
    before = model.read_bytes()
    output = {"same path": model, "another spelling": tmp_path / "runs" / ".." / "runs" / "." / model.name}.get(
        spelling
    )
    if spelling in ["symbolic link", "hard link"]:
        output = tmp_path / "result.json"
        if spelling == "symbolic link":
            output.symlink_to(model)
        else:
            os.link(model, output)
    monkeypatch.setattr(taco_of(evaluate_model), "evaluate", lambda *_: pytest.fail("the episodes ran"))
    args = evaluate_model.Args(model_path=str(model), output=output and str(output))
    with pytest.raises(
        evaluate_model.RunError, match=f"^cannot write .*: it is the model file {re.escape(str(model))}"
    ):
        evaluate_model.main(args)
    assert model.read_bytes() == before


def test_results_are_renamed_into_place_never_written_through_a_link_or_half_written(
    saved_model, tmp_path, monkeypatch
):
    evaluate_model = load_script("evaluate_model")
    monkeypatch.setattr(taco_of(evaluate_model), "evaluate", lambda *_: [1.0, 3.0])
    target, output = tmp_path / "target.txt", tmp_path / "result.json"
    target.write_text("someone's file")
    output.symlink_to(target)  # a link planted at --output: replaced, its target untouched
    args = evaluate_model.Args(model_path=saved_model, num_episodes=2, max_episode_frames=20, output=str(output))
    assert evaluate_model.main(args)["mean"] == 2.0
    assert target.read_text() == "someone's file" and not output.is_symlink()
    assert json.loads(output.read_text())["returns"] == [1.0, 3.0]
    video = (
        tmp_path / "model_eval_cartpole_balance_seed100.mp4"
    )  # beside the model's copy below: written in place, refused
    video.symlink_to(target)
    model = shutil.copy(saved_model, tmp_path / "model.cleanrl_model")
    filmed = evaluate_model.Args(model_path=model, output=str(output), capture_video=True)
    with pytest.raises(
        evaluate_model.RunError, match="it is a symbolic link, which the video would be written through"
    ):
        evaluate_model.main(filmed)
    os.remove(video)
    os.remove(model)

    def disk_full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(evaluate_model.json, "dump", disk_full)
    message = f"cannot write {output} (No space left on device); the returns were [1.0, 3.0]"
    with pytest.raises(evaluate_model.RunError, match=f"^{re.escape(message)}$"):
        evaluate_model.main(args)
    assert json.loads(output.read_text())["returns"] == [1.0, 3.0], "the earlier results are kept"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["result.json", "target.txt"], "no temporary file left"


@pytest.mark.parametrize("outcome", ["NaN returns", "NaN action"])
def test_non_finite_returns_are_said_in_one_line_and_nothing_written(saved_model, tmp_path, monkeypatch, outcome):
    """Not "nan ± nan" in a results file: the weights are checked finite on loading; what stays is a policy whose
    finite weights overflow, or a simulation that diverges."""
    evaluate_model = load_script("evaluate_model")
    script = taco_of(evaluate_model)

    def episodes(*_):
        if outcome == "NaN action":
            raise script.NonFiniteAction("action ([nan])")
        return [float("nan"), 1.0]

    monkeypatch.setattr(script, "evaluate", episodes)
    output = tmp_path / "result.json"
    args = evaluate_model.Args(model_path=saved_model, num_episodes=2, max_episode_frames=20, output=str(output))
    expected = {"NaN returns": "the episodes' returns [nan, 1.0] are not all finite", "NaN action": "non-finite action"}
    with pytest.raises(evaluate_model.RunError, match=re.escape(expected[outcome])):
        evaluate_model.main(args)
    assert not output.exists()


def declare_size(source, target, size):
    """A copy of a zip file whose central directory declares `size` bytes (stored) for its largest record."""
    data = bytearray(Path(source).read_bytes())
    with zipfile.ZipFile(source) as archive:
        name = max(archive.infolist(), key=lambda r: r.file_size).filename.encode()
    position = data.find(b"PK\x01\x02")
    while data[position + 46 : position + 46 + len(name)] != name:  # the record's entry in the central directory
        position = data.find(b"PK\x01\x02", position + 4)
    data[position + 20 : position + 28] = struct.pack("<II", size, size)
    Path(target).write_bytes(data)


@pytest.mark.parametrize("packing", ["compressed", "sizes beyond the file"])
def test_a_file_not_stored_as_torch_save_stores_it_is_refused_before_unpacking(
    saved_model, tmp_path, monkeypatch, packing
):
    """A zip bomb: a compressed record (torch.load unpacks it: 3 MB reached 6.5 GB of memory), or sizes declared beyond
    what the file holds. torch.save stores every record as it is."""
    evaluate_model = load_script("evaluate_model")
    path = tmp_path / "model.cleanrl_model"
    if packing == "compressed":
        with zipfile.ZipFile(saved_model) as source, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as target:
            for record in source.infolist():
                target.writestr(record.filename, source.read(record))
        expected = "is compressed; nothing was unpacked"
    else:
        declare_size(saved_model, path, 2**32 - 2)
        expected = f"bytes, more than its {os.path.getsize(path)}"
    monkeypatch.setattr(torch, "load", lambda *_, **__: pytest.fail("loaded"))
    monkeypatch.setattr(zipfile.ZipFile, "testzip", lambda *_: pytest.fail("unpacked"))
    message = f"^{re.escape(str(path))} is not as torch.save writes it: .*{re.escape(expected)}"
    with pytest.raises(evaluate_model.RunError, match=message):
        evaluate_model.load_policy(str(path), torch.device("cpu"))


CASES = ["its own", "an edited script", "a custom exp_name", "an older version's", "settings of neither"]
CASES += ["--script", "a broken --script", "the script it records", "beside its runs folder", "exp_name plot"]
CASES += ["its script gone"]


@pytest.mark.parametrize("case", CASES)
def test_the_networks_are_those_of_the_script_that_trained_the_model(saved_model, tmp_path, capsys, case):
    """A researcher's edit to a script's networks is what evaluates its models: a model is built by the script whose
    algorithm (its code above the run machinery, hashed) it records: the one it names, `{exp_name}.py` beside its runs/
    folder or here, or one of the two agent scripts; never, silently, by another. --script overrides, with a warning
    when its code is not the trainer's; a model older than that record is built by the script with its settings."""
    evaluate_model = load_script("evaluate_model")
    saved = torch.load(saved_model, weights_only=True)
    stock = f"{evaluate_model.ROOT}/taco_continuous_action.py"
    assert saved["script"] == stock, "a model records the script that saved it"
    path = tmp_path / "model.cleanrl_model"
    expected, script, warning = stock, None, None
    copy = tmp_path / "runs_here" / "taco_half.py"  # an edited copy of the TACO script
    copy.parent.mkdir()
    text = (ROOT / "taco_continuous_action.py").read_text()
    copy.write_text(text.replace("class Actor(nn.Module):", "class Actor(nn.Module):\n    edited = True", 1))
    if case in ["an edited script", "its script gone"]:  # not the code that trained it: refused (--script overrides)
        saved["algorithm"] = "0" * 16
        expected = (
            "which saved the model, changed above its `# Run machinery.` banner since: undo that, or pass --script"
        )
        if case == "its script gone":
            saved["script"] = str(tmp_path / "gone" / "taco_half.py")
            expected = f"{saved['script']}, which saved the model, is not there any more, and no other is its code"
    elif case in ["a custom exp_name", "exp_name plot"]:  # no such script, or not an agent script: passed over
        saved["args"]["exp_name"] = "taco_k3" if case == "a custom exp_name" else "plot"
        del saved["script"]
    elif case in ["an older version's", "settings of neither"]:  # no algorithm recorded: found by its settings
        del saved["algorithm"], saved["script"]
        drqv2 = evaluate_model.agent_script(f"{evaluate_model.ROOT}/drqv2_continuous_action.py")
        saved["args"] = {name: saved["args"][name] for name in vars(drqv2.Args())} | {"exp_name": "mine"}
        saved["args"] |= {"surprise": 1} if case == "settings of neither" else {}
        expected = drqv2.__file__ if case == "an older version's" else "no script records the model, and no other is"
        warning = "warning: the model records no algorithm (an older version saved it)"
    elif case in ["--script", "a broken --script"]:  # a copy elsewhere: its networks are used
        expected = script = str(copy)
        warning = f"warning: {os.path.relpath(copy)} is not the code that trained the model"
        if case == "a broken --script":
            copy.write_text(text.replace("import", "imp ort", 1))
            expected = f"cannot load the agent script {copy} (invalid syntax"
    elif case in ["the script it records", "beside its runs folder"]:  # a model of the edited copy
        saved["algorithm"] = evaluate_model.agent_script(str(copy)).ALGORITHM
        saved["args"]["exp_name"] = "taco_half"
        expected = str(copy)
        if case == "beside its runs folder":
            del saved["script"]
            path = copy.parent / "runs" / "taco_half__1" / "taco_half.cleanrl_model"
            path.parent.mkdir(parents=True)
        else:
            saved["script"] = str(copy)
    torch.save(saved, path)
    if not os.path.isfile(expected):  # a message: refused in one line
        with pytest.raises(evaluate_model.RunError, match=re.escape(expected)):
            evaluate_model.load_policy(str(path), torch.device("cpu"), script)
        return
    policy, _, module = evaluate_model.load_policy(str(path), torch.device("cpu"), script)
    assert module.__file__ == expected and type(policy.actor) is module.Actor and type(policy.encoder) is module.Encoder
    assert getattr(policy.actor, "edited", False) == (expected == str(copy))
    printed = capsys.readouterr().out
    assert (warning in printed) if warning else "warning" not in printed, printed


def test_a_checkpoints_results_are_named_with_its_frame_and_say_what_built_it(
    saved_model, tmp_path, monkeypatch, capsys
):
    """Results beside a checkpoint name its frame, so a later checkpoint's do not replace them silently; a replaced
    file is said. The JSON records the script used and whether it is the code that trained the policy."""
    evaluate_model = load_script("evaluate_model")
    monkeypatch.setattr(taco_of(evaluate_model), "evaluate", lambda *_: [1.0, 3.0])
    checkpoint = tmp_path / "checkpoint.pt"
    shutil.copy(Path(saved_model).parent / "checkpoint.pt", checkpoint)
    stock = f"{evaluate_model.ROOT}/taco_continuous_action.py"
    assert torch.load(checkpoint, weights_only=True, mmap=True)["script"] == stock, "a checkpoint records its script"
    results = []
    for _ in range(2):
        results.append(evaluate_model.main(evaluate_model.Args(model_path=str(checkpoint), num_episodes=2)))
    printed = capsys.readouterr().out.splitlines()
    written = tmp_path / "checkpoint_frame240_eval_cartpole_balance_seed100_2episodes.json"
    assert json.loads(written.read_text()) == results[1] and written.read_text().endswith("}\n")
    assert results[1]["trained_frames"] == 240 and results[1]["script_trained_it"] is True
    assert results[1]["script"] == stock
    assert [line.endswith("(replacing the results that were there)") for line in printed if "return" in line] == [
        False,
        True,
    ]
    with pytest.raises(evaluate_model.RunError, match="it is not a Python file"):
        evaluate_model.agent_script(str(tmp_path))
