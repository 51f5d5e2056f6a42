"""The report's reproduction scorecard, its readings of each experiment's table and its
deviations table, from result tables shaped as the paper-scale study writes them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from dnnmod.report.html import build_report
from dnnmod.report.scorecard import reading, scorecard, within_tolerance

REPO = Path(__file__).resolve().parents[1]
PAPER_CONFIG = yaml.safe_load((REPO / "config/config.yaml").read_text())


def e2_row(approach, arch, dataset, loss, krr, size=0.5, **extra):
    return {
        "approach": approach,
        "model": arch,
        "arch": arch,
        "dataset": dataset,
        "seed": 0,
        "accuracy_loss_pp": loss,
        "krr": krr,
        "module_size": size,
        **extra,
    }


def write(tables: Path, name: str, rows: list[dict]) -> None:
    tables.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(tables / f"{name}.csv", index=False)


@pytest.fixture
def tables(tmp_path):
    tables = tmp_path / "results/paper/tables"
    write(
        tables,
        "e2_modularization",
        [
            e2_row("mwt", "vgg16", "cifar10", 1.5, 0.16),
            e2_row("mwt", "vgg16", "svhn", 0.9, 0.14),
            e2_row("mwt", "simcnn", "digits", 30.0, 0.9),  # no paper dataset: left out
            e2_row("cnnsplitter", "simcnn", "cifar10", 9.0, 0.8),
            e2_row("moda", "vgg16", "cifar10", 0.2, 0.1, size=0.031),
        ],
    )
    write(
        tables,
        "e3_patching",
        [
            {
                "protocol": "minmax",
                "setting": "cifar",
                "dataset": "cifar10",
                "source_dataset": "cifar10",
                "model": "simcnn",
                "approach": "gradsplitter",
                "weak_type": weak,
                "target": "average",
                "precision_gain_pp": precision,
                "recall_gain_pp": 5.0,
                "f1_gain_pp": -2.0,
                "non_tc_accuracy_gain_pp": 0.5,
            }
            for weak, precision in (("simple", 15.0), ("overfit", 17.0))
        ],
    )
    return tables


def test_each_reproducible_headline_has_one_row_with_its_verdict(tables):
    card = scorecard(tables, PAPER_CONFIG).set_index(["experiment", "approach", "metric"])
    loss = card.loc[("E2", "mwt", "accuracy loss (pp)")]
    assert loss.ours == pytest.approx(1.2) and loss.published == 1.13  # digits left out
    assert loss["model/dataset"] == "mean over cifar10, svhn"
    assert loss.verdict == "within tolerance (±1)"
    krr = card.loc[("E2", "mwt", "KRR (%)")]
    assert krr.ours == pytest.approx(15.0) and krr.verdict == "within tolerance (±5)"
    cnnsplitter = card.loc[("E2", "cnnsplitter", "accuracy loss (pp)")]
    assert cnnsplitter["Δ"] == pytest.approx(9.0 - 2.89)
    assert cnnsplitter.verdict.startswith("outside tolerance (±1); deviations that bear on it:")
    # models_shared_by_mwt_and_splitters bears on E2's CNNSplitter rows; gamma[svhn] does not
    # bear on a CIFAR-10 row
    assert "models_shared_by_mwt_and_splitters" in cnnsplitter.verdict
    assert "gamma[svhn]" not in cnnsplitter.verdict
    size = card.loc[("E2", "moda", "module size (%)")]
    assert size["model/dataset"] == "vgg16/cifar10" and size.published == pytest.approx(2.7)
    assert size.ours == pytest.approx(3.1)
    precision = card.loc[("E3", "gradsplitter", "precision gain (pp)")]
    assert precision.ours == 16.0 and precision.verdict.startswith("within tolerance")
    f1 = card.loc[("E3", "gradsplitter", "f1 gain (pp)")]
    assert f1.verdict.startswith("outside tolerance (same sign, ±3); deviations that bear on")
    assert "gradsplitter_base_models" in f1.verdict and "[svhn]" not in f1.verdict
    assert f1["model/dataset"] == "mean over 2 minmax settings (cifar10)"
    recall = card.loc[("E3", "gradsplitter", "recall gain (pp)")]
    assert recall.ours == 5.0 and recall.verdict == "within tolerance (same sign, ±3)"


def test_the_headline_column_is_picked_by_name(tables):
    e2 = pd.read_csv(tables / "e2_modularization.csv")
    e2["krr_paper"] = e2.krr / 2  # a paper-definition KRR column wins over the shared one
    e2.to_csv(tables / "e2_modularization.csv", index=False)
    card = scorecard(tables, PAPER_CONFIG).set_index(["experiment", "approach", "metric"])
    assert card.loc[("E2", "mwt", "KRR (%)")].ours == pytest.approx(7.5)


def test_tolerances():
    assert within_tolerance("accuracy", 2.0, 1.13) and not within_tolerance("accuracy", 2.2, 1.13)
    assert within_tolerance("retention", 19.5, 14.58)
    assert not within_tolerance("gain", -1.0, 1.0)  # the wrong sign, however close
    assert within_tolerance("gain", 14.0, 11.47) and not within_tolerance("gain", 15.0, 11.47)


def test_readings_come_from_the_numbers(tables):
    text = reading(tables, "e2")
    # the reading covers every row of the table (mwt's digits row too: (1.5 + 0.9 + 30) / 3)
    assert "Least accuracy lost: moda (0.20 pp" in text and "most: mwt (10.80 pp)" in text
    assert "Fewest kernels kept: moda (KRR 10.0 %)" in text
    assert "gradsplitter (-2.00 pp)" in reading(tables, "e3")
    assert reading(tables, "e6") == ""  # no table, no reading


def test_the_report_opens_with_the_scorecard_then_the_deviations(tables, tmp_path):
    out = tmp_path / "report.html"
    build_report(tables.parent, out, PAPER_CONFIG)
    page = out.read_text()
    headings = [part.split("</h2>")[0] for part in page.split("<h2>")[1:]]
    assert headings[:3] == [
        "Reproduction scorecard",
        "Deviations from the papers",
        "E2 Modularization effectiveness",
    ]
    assert "5 of 7 published headlines reproduced within tolerance" in page
    assert "recipes.weak_full.epochs" in page and "no reason stated" not in page
    assert '<p class="reading">Least accuracy lost: moda' in page


def test_a_study_off_the_papers_datasets_says_why_its_scorecard_is_empty(tmp_path):
    tables = tmp_path / "results/demo/tables"
    write(tables, "e2_modularization", [e2_row("mwt", "simcnn", "digits", 3.0, 0.5)])
    assert scorecard(tables, {}).empty
    build_report(tables.parent, tmp_path / "r.html", {"study": "demo", "seeds": [0]})
    page = (tmp_path / "r.html").read_text()
    assert "No published headline can be set against this study" in page
    assert "seeds" in page and "no reason stated" in page  # one seed, no reason in this config


@pytest.mark.parametrize("module", ["dnnmod.report.scorecard", "dnnmod.deviations"])
def test_the_scorecard_and_deviations_leave_torch_unimported(module):
    probe = f"import sys, {module}; print('torch' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "False"


def test_e1_e4_e5_e6_and_pan_rajan_rows_from_their_tables(tmp_path):
    tables = tmp_path / "results/paper/tables"
    source = {"published_source": "paper"}
    write(
        tables,
        "e1_base_models",
        [
            {
                "training": "st",
                "model": "vgg16",
                "arch": "vgg16",
                "dataset": "cifar10",
                "seed": 0,
                "test_accuracy": 92.0,
                "published_test_accuracy": 92.62,
                **source,
            }
        ],
    )
    write(
        tables,
        "e4_new_tasks",
        [
            {
                "setting": "cifar10_x_svhn_simcnn",
                "approach": "gradsplitter",
                "variant": "composed",
                "pair": f"cifar10/{a} + svhn/{b}",
                "dataset_a": "cifar10",
                "dataset_b": "svhn",
                "accuracy_difference_pp": diff,
                "published_accuracy_difference_pp": -2.46,
                **source,
            }
            for a, b, diff in ((0, 1, -1.0), (2, 3, -3.0))
        ]
        + [
            {
                "setting": "digits_intra",
                "approach": "gradsplitter",
                "variant": "composed",
                "pair": "digits/0 + digits/1",
                "dataset_a": "digits",
                "dataset_b": "digits",
                "accuracy_difference_pp": 5.0,
                "published_accuracy_difference_pp": -2.46,
                **source,
            }
        ],
    )
    write(
        tables,
        "e5_subtask_reuse",
        [
            {
                "approach": "moda",
                "arch": "vgg16",
                "dataset": "cifar10",
                "size": size,
                "composed_accuracy": 90.0,
                "union_accuracy": accuracy,
                "published_mean_accuracy": 94.48,
                **source,
            }
            for size, accuracy in ((2, 96.0), (3, 94.0))
        ],
    )
    write(
        tables,
        "e6_replacement",
        [
            {
                "approach": "pan_rajan",
                "dataset": "cifar10",
                "weaker": "resnet32",
                "stronger": "resnet20",
                "swapped_class": c,
                "top1_change_pp": change,
                "published_mean_top1_change_pp": 1.1,
                **source,
            }
            for c, change in ((0, -0.5), (1, -1.5))
        ],
    )
    write(
        tables,
        "pan_rajan_decomposition",
        [
            {
                "model": "resnet20",
                "dataset": "cifar10",
                "top1_loss_pp": 0.9,
                "published_model_top1": 89.0,
                "published_composed_top1": 88.5,
                **source,
            }
        ],
    )
    claim = "gradsplitter modules keep fewer kernels than cnnsplitter's, at no more accuracy loss"
    write(
        tables,
        "e2_orderings",
        [
            {
                "model": model,
                "dataset": dataset,
                "claim": claim,
                "fewer_pct": fewer,
                "published_fewer_pct": 19.88,
                "source": "TOSEM2023 abstract",
            }
            for model, dataset, fewer in (
                ("simcnn", "cifar10", 10.0),
                ("rescnn", "svhn", 20.0),
                ("simcnn", "digits", 90.0),
            )
        ],
    )
    card = scorecard(tables, PAPER_CONFIG).set_index(["experiment", "approach"])
    ordering = card.loc[("E2", "gradsplitter")]  # the digits model is not the paper's
    assert ordering.ours == 15.0 and ordering.published == 19.88
    assert ordering.verdict.startswith("within tolerance (±5)")
    e1 = card.loc[("E1", "st")]
    assert e1["model/dataset"] == "vgg16/cifar10" and e1["Δ"] == pytest.approx(-0.62)
    e4 = card.loc[("E4", "gradsplitter")]  # the digits pair is not the paper's
    assert e4.ours == -2.0 and e4["model/dataset"] == "cifar10_x_svhn_simcnn (composed)"
    assert e4.verdict == "within tolerance (same sign, ±3)"
    e5 = card.loc[("E5", "moda")]
    assert e5.ours == 95.0 and e5.metric == "reuse accuracy (%, union accuracy)"
    e6 = card.loc[("E6", "pan_rajan")]
    assert e6.ours == -1.0 and e6.verdict.startswith("outside tolerance (same sign, ±3)")
    pan = card.loc[("E2", "pan_rajan")]
    assert pan.published == pytest.approx(0.5) and pan.verdict == "within tolerance (±1)"
