"""Bad input from a user: one `dnnmod: error:` line, exit status 2, nothing written.

Also: artifacts respect the umask, and the README's Python example runs as written.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dnnmod.artifacts import write_json
from dnnmod.cli import main

REPO = Path(__file__).resolve().parents[1]
RECIPE = {"epochs": 1, "batch_size": 64, "lr": 0.05}


def _train(data_root, out, recipe=None, *extra):
    return ["train", "--dataset", "digits", "--arch", "simcnn", "--width", "0.0625",
            "--recipe", json.dumps(recipe or RECIPE), "--seed", "0",
            "--data-root", str(data_root), "--out", str(out), *extra]


@pytest.fixture(scope="module")
def trained(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("model") / "model.safetensors"
    assert main(_train(data_root, out)) == 0
    return out


def _modularize(data_root, model, out, hyperparameters):
    return ["modularize", "--approach", "gradsplitter", "--model", str(model), "--seed", "0",
            "--data-root", str(data_root), "--out", str(out),
            "--hyperparameters", json.dumps(hyperparameters)]


BAD_INPUTS = {
    "recipe value of the wrong type": (
        lambda root, model, out: _train(root, out, {**RECIPE, "epochs": "1"}),
        r"recipe\.epochs: expected int, got '1'"),
    "missing recipe key": (
        lambda root, model, out: _train(root, out, {"epochs": 1, "batch_size": 8}),
        r"recipe: missing keys \['lr'\]"),
    "unknown training kind": (
        lambda root, model, out: _train(root, out, RECIPE, "--training", "nope"),
        r"unknown training kind 'nope'"),
    "misspelt model option": (
        lambda root, model, out: _train(root, out, RECIPE, "--options", '{"batchnorm": false}'),
        r"has no option 'batchnorm'"),
    "approach value of the wrong type": (
        lambda root, model, out: _modularize(root, model, out, {"rounds": "1"}),
        r"approaches\.gradsplitter\.rounds: expected int, got '1'"),
    "negative rounds": (
        lambda root, model, out: _modularize(root, model, out, {"rounds": -1}),
        r"approaches\.gradsplitter\.rounds: -1 is out of range"),
    "missing model file": (
        lambda root, model, out: _modularize(root, model.with_name("gone.safetensors"), out, {}),
        r"gone\.json: file not found"),
    "module set without a base": (
        lambda root, model, out: ["evaluate-modules", "--modules", str(_no_base(out)),
                                  "--model", str(model), "--data-root", str(root),
                                  "--out", str(out)],
        r"lacks key 'base"),
    "split of an unknown dataset": (
        lambda root, model, out: ["data", "split", "--dataset", "imagenet", "--root",
                                  str(out.parent), "--seed", "0"],
        r"imagenet"),
    "task from an unconfigured class": (
        lambda root, model, out: ["data", "derive", "--task", "pair", "--root", str(root),
                                  "--spec", '{"parts": [{"dataset": "digits", "classes": [42]}]}'],
        r"tasks\.pair"),
    "E1 table of a missing model": (
        lambda root, model, out: ["table", "base-models", "--models", str(out.parent / "m.st"),
                                  "--out", str(out)],
        r"m\.json: file not found"),
    "E2 table of missing metrics": (
        lambda root, model, out: ["table", "modularization", "--metrics",
                                  str(out.parent / "x.json"), "--out", str(out)],
        r"x\.json: file not found"),
    "unknown dataset": (
        lambda root, model, out: ["data", "prepare", "--dataset", "imagenet", "--root",
                                  str(out.parent)],
        r"unknown dataset 'imagenet'"),
}


def _no_base(out: Path) -> Path:
    modules = out.parent / "broken" / "modules.safetensors"
    write_json(modules.with_suffix(".json"), {
        "format": "dnnmod.modules/2", "approach": "gradsplitter", "classes": [0],
        "head": {"kind": "own_logit", "options": {}}, "combination": "argmax"})
    return modules


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_nothing_written(case, data_root, trained, tmp_path,
                                                          capsys):
    make_args, message = BAD_INPUTS[case]
    out = tmp_path / "out" / "result.safetensors"
    status = main(make_args(data_root, trained, out))
    err = capsys.readouterr().err
    assert status == 2
    errors = [line for line in err.splitlines() if line.startswith("dnnmod: error:")]
    assert len(errors) == 1 and re.search(message, errors[0]), err
    assert "Traceback" not in err
    assert not out.exists() and not out.with_suffix(".json").exists()


def test_debug_shows_the_traceback(data_root, tmp_path):
    args = _train(data_root, tmp_path / "m.safetensors", {**RECIPE, "epochs": "1"})
    run = subprocess.run([sys.executable, "-m", "dnnmod.cli", "--debug", *args],
                         capture_output=True, text=True)
    assert run.returncode != 0 and "Traceback" in run.stderr


def test_artifacts_respect_the_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
    finally:
        os.umask(previous)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o640


@pytest.mark.slow
def test_readme_python_example_runs_as_written(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    assert blocks
    script = tmp_path / "example.py"
    script.write_text("\n".join(blocks))
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
