"""The worked plug-in example, examples/dnnmod-mean-activation, as a researcher uses it: built
and installed (into a folder of its own on the path, leaving the venv as it was), checked by
``dnnmod check-approach``, named in a study config and run by the workflow end to end."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest
from workflow_helpers import REPO, TINY, make_project, snakemake, write_config

from dnnmod import plugins
from dnnmod.cli import main

EXAMPLE = REPO / "examples" / "dnnmod-mean-activation"
NAME = "mean_activation"


@pytest.fixture(scope="module")
def installed_example(tmp_path_factory):
    """The example built as a wheel and installed into a fresh folder, which this process and
    the workflow's jobs (PYTHONPATH) see; the registries re-read the metadata on the way in
    and out."""
    root = tmp_path_factory.mktemp("plugin")
    source = shutil.copytree(EXAMPLE, root / "source")  # the build writes next to its source
    target = root / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--no-index", "--disable-pip-version-check",
                    "--target", str(target), str(source)], check=True)
    saved_path = os.environ.get("PYTHONPATH")
    sys.path.insert(0, str(target))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target), saved_path]))
    plugins.refresh_all()
    try:
        yield target
    finally:
        sys.path.remove(str(target))
        if saved_path is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = saved_path
        sys.modules.pop("dnnmod_mean_activation", None)
        plugins.refresh_all()


def test_the_installed_example_is_a_registered_approach(installed_example, capsys):
    from dnnmod.approaches import APPROACHES

    assert NAME in APPROACHES and APPROACHES.source(NAME) == "dnnmod-mean-activation"
    assert type(APPROACHES[NAME]).__module__ == "dnnmod_mean_activation"
    assert f"random_{NAME}" in APPROACHES  # its random control comes with it
    assert main(["list", "approaches"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert f"{NAME} (dnnmod-mean-activation)" in listed and "gradsplitter" in listed


def test_check_approach_passes_the_example_and_names_each_requirement(installed_example,
                                                                      tmp_path, capsys):
    status = main(["check-approach", "dnnmod_mean_activation:MeanActivation",
                   "--work-dir", str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    assert status == 0, lines
    assert lines[-1] == (f"{NAME} (dnnmod_mean_activation.MeanActivation): 8 of 8 "
                         "requirements met")
    assert all(line.startswith("passed ") for line in lines[:-1])
    assert any("survives save -> load" in line for line in lines)


def test_a_study_names_the_plugin_and_the_workflow_runs_it_to_the_report(installed_example,
                                                                           tmp_path):
    project = make_project(tmp_path / "project")
    config = {**TINY, "approaches": {NAME: {"keep": 0.25}},
              "modularize": [{"approach": NAME, "dataset": "digits", "models": ["simcnn"]}]}
    run = snakemake(project, "--cores", "2", "--configfile", write_config(project, config))
    assert run.returncode == 0, run.stdout[-3000:]

    results = project / "results" / "tiny"
    modules = json.loads((results / f"modules/digits/simcnn/{NAME}/seed0/modules.json"
                          ).read_text())
    assert modules["approach"] == NAME
    assert modules["provenance"]["hyperparameters"]["keep"] == 0.25
    e2 = pd.read_csv(results / "tables" / "e2_modularization.csv")
    row = e2[e2["approach"] == NAME].iloc[0]
    # A quarter of every conv group's kernels, per class (simcnn at width 1/16: groups of 4
    # to 32 channels, so the rounding keeps the ratio exactly).
    assert row["krr"] == pytest.approx(0.25)
    report = (results / "report.html").read_text()
    assert f"<td>{NAME}</td>" in report
