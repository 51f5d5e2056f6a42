"""The random controls in the workflow: the demo's DAG cuts one per approach and sets it
beside its approach in E2-E5, and a control of MwT is cut from MwT's own modular model."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from workflow_helpers import REPO, TINY, copy_project, snakemake, write_config

from dnnmod.reuse.newtask import plan_new_tasks
from dnnmod.reuse.patching import patched_approaches
from dnnmod.study import expand_modularizations

APPROACHES = ["cnnsplitter", "gradsplitter", "mwt", "moda", "pan_rajan"]


DEMO = yaml.safe_load((REPO / "config/demo.yaml").read_text())
WITH_CONTROLS = set(APPROACHES) | {f"random_{approach}" for approach in APPROACHES}


def test_the_demo_cuts_each_approachs_control_beside_it():
    sets = set(expand_modularizations(DEMO))
    for dataset in ("digits", "digits_0_4"):
        assert {
            approach for approach, d, m in sets if (d, m) == (dataset, "simcnn")
        } == WITH_CONTROLS
    assert {approach for approach, d, m in sets if (d, m) == ("shapes", "simcnn")} == {
        "gradsplitter",
        "random_gradsplitter",
        "pan_rajan",
        "random_pan_rajan",
    }


def test_a_dry_run_of_the_demo_lists_the_control_jobs():
    """Each control of digits simcnn: one modularize job (reading its approach's module set and
    the model that approach decomposes) and one evaluation, nothing else."""
    targets = [
        f"results/demo/modules/digits/simcnn/random_{approach}/seed0/metrics.json"
        for approach in APPROACHES
    ]
    run = snakemake(
        REPO,
        *targets,
        "-n",
        "-p",
        "--forceall",
        "--nolock",
        "--configfile",
        "config/demo.yaml",
        "--directory",
        str(REPO),
    )
    assert run.returncode == 0, run.stdout[-3000:]
    jobs = re.findall(
        r"^(?:local)?rule (\w+):\n(.*?)(?=^(?:local)?rule |\Z)", run.stdout, re.M | re.S
    )
    drawn = [body for rule, body in jobs if rule == "modularize" and "approach=random_" in body]
    assert len(drawn) == len(APPROACHES)
    for approach in APPROACHES:
        body = next(body for body in drawn if f"approach=random_{approach}," in body)
        training = "st" if approach in ("cnnsplitter", "gradsplitter", "pan_rajan") else approach
        assert f"models/digits/simcnn/{training}/seed0/model.safetensors" in body
        assert f"--reference {approach}=results/demo/modules/digits/simcnn/{approach}/" in body
    evaluated = [
        body for rule, body in jobs if rule == "evaluate_modules" and "approach=random_" in body
    ]
    assert len(evaluated) == len(APPROACHES)


def test_the_demo_sets_every_control_beside_its_approach_in_e3_e4_e5():
    # E3: every module set of the strong model is patched, controls included
    for setting in DEMO["reuse"]["patching"]["settings"].values():
        assert set(patched_approaches(DEMO, setting["dataset"], "simcnn")) == WITH_CONTROLS
    # E4: an approach composes a setting's pairs when it decomposed both datasets' models
    plans = plan_new_tasks(DEMO, expand_modularizations(DEMO))
    assert set(plans["digits_x_shapes"].candidates) == {
        "gradsplitter",
        "random_gradsplitter",
        "pan_rajan",
        "random_pan_rajan",
    }
    assert set(plans["digits_intra"].candidates) == WITH_CONTROLS
    # E5: every module set of digits simcnn
    subtasks = DEMO["reuse"]["subtasks"]
    assert {
        approach
        for approach, dataset, model in expand_modularizations(DEMO)
        if dataset in subtasks["datasets"] and model in subtasks["models"]
    } == WITH_CONTROLS


@pytest.mark.slow
def test_a_control_of_mwt_is_cut_from_mwts_own_model(tiny_study, tmp_path):
    project = copy_project(tiny_study, tmp_path / "project")
    config = {
        **TINY,
        "approaches": {**TINY["approaches"], "mwt": {"metric_samples": 8}},
        "modularize": [
            *TINY["modularize"],
            {"approach": "mwt", "dataset": "digits", "models": ["simcnn"]},
            {"approach": "random_mwt", "dataset": "digits", "models": ["simcnn"]},
        ],
    }
    configfile = write_config(project, config)
    sets = project / "results/tiny/modules/digits/simcnn"
    target = "results/tiny/tables/e2_modularization.csv"
    run = snakemake(project, target, "--cores", "2", "--configfile", configfile)
    assert run.returncode == 0, run.stdout[-3000:]
    mwt = json.loads((sets / "mwt/seed0/modules.json").read_text())
    control = json.loads((sets / "random_mwt/seed0/modules.json").read_text())
    mwt_model = json.loads(
        (project / "results/tiny/models/digits/simcnn/mwt/seed0/model.json").read_text()
    )
    assert (
        control["base"]["weights_sha256"]
        == mwt["base"]["weights_sha256"]
        == mwt_model["weights_sha256"]
    )
    assert control["provenance"]["matched"]["approach"] == "mwt"
    assert control["masks"] == mwt["masks"]  # the same groups and mask shapes
    metrics = json.loads((sets / "random_mwt/seed0/metrics.json").read_text())
    own = json.loads((sets / "mwt/seed0/metrics.json").read_text())
    # as many kernels per module: the same KRR by MwT's own definition and the shared one
    assert metrics["krr"] == own["krr"] and metrics["krr_shared"] == own["krr_shared"]
    assert metrics["accuracy_protocol"] == "composed"
    table = (project / target).read_text()
    assert "random_mwt" in table and "random_gradsplitter" in table
