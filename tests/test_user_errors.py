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


def _missing(command: str, flag: str, name: str, error_file: str | None = None):
    """A table or figure ``command`` whose ``flag`` names a file ``name`` that is not there
    (the error names ``error_file``, the file it reads, where that is another)."""
    return (lambda root, model, out: [*command.split(), flag, str(out.parent / name), "--out",
                                      str(out)],
            rf"{re.escape(error_file or name)}: file not found")


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
    "Dirichlet task of a concentration of zero": (
        lambda root, model, out: ["data", "derive", "--task", "pool", "--root", str(root),
                                  "--spec", '{"parts": [{"dataset": "digits", "classes": [1, 2]}]'
                                            ', "dirichlet": {"alpha": 0, "split_seed": 0}}'],
        r"tasks\.pool\.dirichlet\.alpha: 0 is out of range"),
    "E1 table of a missing model": _missing("table base-models", "--models", "m.st", "m.json"),
    "E2 table of missing metrics": _missing("table modularization", "--metrics", "x.json"),
    "unknown dataset": (
        lambda root, model, out: ["data", "prepare", "--dataset", "imagenet", "--root",
                                  str(out.parent)],
        r"unknown dataset 'imagenet'"),
    "E4 pair of the wrong shape": (
        lambda root, model, out: _new_task(root, model, out, [["digits", 3]]),
        r"--pairs: expected \[dataset A, class a, dataset B, class b\] entries"),
    "E4 pairs of two kinds": (
        lambda root, model, out: _new_task(root, model, out, [["digits", 3, "digits", 8],
                                                              ["digits", 3, "shapes", 1]]),
        r"--pairs: mixes pairs within one dataset and pairs across two"),
    "E4 missing candidate module set": (
        lambda root, model, out: _new_task(root, model, out, [["digits", 3, "digits", 8]],
                                           modules=out.parent / "gone.safetensors"),
        r"gone\.json: file not found"),
    "E4 unknown selection split": (
        lambda root, model, out: [*_new_task(root, model, out, [["digits", 3, "digits", 8]]),
                                  "--selection-split", "test"],
        r"selection split 'test' is not one of \['val', 'train'\]"),
    "E4 table of missing composed records": (
        lambda root, model, out: ["reuse", "new-task-table", "--composed",
                                  str(out.parent / "composed.json"), "--scratch", str(model),
                                  "--out", str(out)],
        r"composed\.json: file not found"),
    "E3 unknown weak type": (
        lambda root, model, out: _patch(root, model, out, f"sloppy={model}"),
        r"--weak sloppy=\.\.\.: unknown weak type 'sloppy'"),
    "E3 weak model not trained on a weak task": (
        lambda root, model, out: _patch(root, model, out, f"simple={model}"),
        r"model\.safetensors: the weak model was not trained on a derived task"),
    "E3 unknown patching protocol": (
        lambda root, model, out: [*_patch(root, model, out, f"simple={model}"),
                                  "--protocol", "modas"],
        r"--protocol: unknown protocol 'modas'; known: minmax, moda"),
    "E3 calibration layer for the min-max protocol": (
        lambda root, model, out: [*_patch(root, model, out, f"simple={model}"),
                                  "--calibration-layer", '{"epochs": 5}'],
        r"--calibration-layer: protocol 'minmax' trains no calibration layer"),
    "E3 calibration layer trained for no epochs": (
        lambda root, model, out: [*_patch(root, model, out, f"simple={model}"), "--protocol",
                                  "moda", "--calibration-layer", '{"epochs": 0}'],
        r"--calibration-layer\.epochs: 0 is out of range \[1, inf\]"),
    "E3 calibration layer on the test split": (
        lambda root, model, out: [*_patch(root, model, out, f"simple={model}"), "--protocol",
                                  "moda", "--calibration-layer", '{"split": "test"}'],
        r"--calibration-layer\.split: 'test' is not one of \['train', 'val'\]"),
    "E3 table of missing patch records": _missing("reuse patch-table", "--metrics", "patch.json"),
    "E3 figure of missing patch records": _missing("reuse patch-figure", "--metrics", "patch.json"),
    "E5 sub-task settings with an unknown key": (
        lambda root, model, out: _subtasks(root, model, out, '{"max_subset": 3}'),
        r"reuse\.subtasks: unknown keys \['max_subset'\]"),
    "E5 missing module set": (
        lambda root, model, out: _subtasks(root, model, out, "{}",
                                           modules=out.parent / "gone.safetensors"),
        r"gone\.json: file not found"),
    "E5 table of a missing sub-task table": _missing("reuse subtasks-table", "--subtasks",
                                                     "subtasks.csv"),
    "E5 figure of a missing sub-task table": _missing("reuse subtasks-figure", "--subtasks",
                                                      "subtasks.csv"),
    "E8 cost of a study without benchmark files": (
        lambda root, model, out: ["table", "cost", "--results", str(out.parent), "--out",
                                  str(out), "--scenarios", str(out.with_suffix(".json"))],
        r"benchmarks: no benchmark files"),
    "E8 energy constant out of range": (
        lambda root, model, out: ["table", "cost", "--results", str(out.parent), "--energy",
                                  '{"pue": 0.5}', "--out", str(out), "--scenarios",
                                  str(out.with_suffix(".json"))],
        r"energy\.pue: 0\.5 is out of range"),
    "HTML report of a folder without results": (
        lambda root, model, out: ["report", "html", "--results", str(out.parent), "--out",
                                  str(out)],
        r"no tables/\*\.csv and no figures/\*\.png"),
    "Pan & Rajan tangling rate out of range": (
        lambda root, model, out: ["modularize", "--approach", "pan_rajan", "--model",
                                  str(model), "--seed", "0", "--data-root", str(root),
                                  "--out", str(out), "--hyperparameters",
                                  '{"tangling_rate": 2}'],
        r"approaches\.pan_rajan\.tangling_rate: 2 is out of range"),
    "Table 1 of a missing decomposition record": _missing("table pan-rajan", "--costs", "c.json"),
    "E6 replacement with a missing module set": (
        lambda root, model, out: ["reuse", "replace", "--weaker-model", str(model),
                                  "--weaker-modules", str(out.parent / "weak.safetensors"),
                                  "--stronger-model", str(model), "--stronger-modules",
                                  str(out.parent / "weak.safetensors"), "--data-root",
                                  str(root), "--device", "cpu", "--out", str(out)],
        r"weak\.json: file not found"),
    "E6 table of a missing record": _missing("reuse replace-table", "--records", "r.json"),
    "E7 table of a missing metrics record": (
        lambda root, model, out: _sensitivity_table(out, [_E7_POINT]),
        r"m\.json: file not found"),
    "E7 table with a point per metrics file missing": (
        lambda root, model, out: _sensitivity_table(out, []),
        r"--points: 0 sweep points for 1 metrics files"),
    "E7 sweep point without its value": (
        lambda root, model, out: _sensitivity_table(
            out, [{k: v for k, v in _E7_POINT.items() if k != "value"}]),
        r"--points\[0\]: missing keys \['value'\]"),
    "E7 figure of a missing table": _missing("sensitivity figure", "--table", "e7.csv"),
    "GA convergence of a missing module set": _missing("curves ga-convergence", "--inputs",
                                                       "gone.safetensors", "gone.json"),
    "loss curves of a standard-trained model": (
        lambda root, model, out: ["curves", "modular-training", "--inputs", str(model),
                                  "--out", str(out)],
        r"model\.safetensors: a standard-trained model; this figure shows the loss parts"),
}

_E7_POINT = {"approach": "mwt", "dataset": "digits", "model": "simcnn",
             "parameter": "threshold", "value": "0.5", "stage": "decomposition",
             "training": "mwt", "default": "0.9", "configured": False, "seed": 0}


def _sensitivity_table(out, points):
    return ["sensitivity", "table", "--points", json.dumps(points), "--metrics",
            str(out.parent / "m.json"), "--out", str(out)]


def _patch(root, model, out, weak):
    return ["reuse", "patch", "--modules", str(model.with_name("modules.safetensors")),
            "--model", str(model), "--weak", weak, "--setting", "s", "--data-root", str(root),
            "--out", str(out)]


def _subtasks(root, model, out, settings, modules=None):
    return ["reuse", "subtasks", "--modules",
            str(modules or model.with_name("modules.safetensors")), "--model", str(model),
            "--settings", settings, "--data-root", str(root), "--out", str(out)]


def _new_task(root, model, out, pairs, modules=None):
    return ["reuse", "new-task", "--approach", "gradsplitter", "--setting", "s", "--model",
            "simcnn", "--pairs", json.dumps(pairs), "--candidate",
            str(modules or model.with_name("modules.safetensors")), str(model),
            "--data-root", str(root), "--out", str(out), "--device", "cpu"]


def _no_base(out: Path) -> Path:
    modules = out.parent / "broken" / "modules.safetensors"
    write_json(modules.with_suffix(".json"), {
        "format": "dnnmod.modules/2", "approach": "gradsplitter", "classes": [0], "masks": {},
        "head": {"kind": "own_logit", "options": {}}, "combination": "argmax",
        "structure": {"groups": [], "output_layer": "fc", "input_shape": [1, 3, 32, 32]},
        "provenance": {}})
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
