"""Each approach against its own random control in the report: the controls card beside the
scorecard, and the readings of E2-E5 ("A's F1 gain vs its random control's")."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from dnnmod.report.figures import approach_style
from dnnmod.report.html import scorecard_html
from dnnmod.report.scorecard import controls_card, reading


def write(tables: Path, name: str, rows: list[dict]) -> None:
    tables.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(tables / f"{name}.csv", index=False)


def e3_row(approach: str, target: str, f1: float, weak: str = "simple") -> dict:
    return {
        "protocol": "minmax",
        "setting": "digits_half",
        "dataset": "digits_0_4",
        "model": "simcnn",
        "approach": approach,
        "weak_type": weak,
        "target": target,
        "f1_gain_pp": f1,
    }


@pytest.fixture
def tables(tmp_path):
    tables = tmp_path / "tables"
    write(
        tables,
        "e2_modularization",
        [
            {
                "approach": approach,
                "model": "simcnn",
                "arch": "simcnn",
                "dataset": "digits",
                "seed": 0,
                "accuracy_loss_pp": loss,
                "composed_loss_pp": composed,
                "krr": krr,
            }
            for approach, loss, composed, krr in (
                ("gradsplitter", 0.4, 0.4, 0.7),
                ("random_gradsplitter", 20.0, 20.0, 0.7),
                ("mwt", 0.3, 2.0, 0.6),
                ("random_mwt", 35.0, 35.0, 0.6),
                ("pan_rajan", 0.1, 0.1, 0.95),
            )
        ],
    )  # pan_rajan: no control in this study
    write(
        tables,
        "e3_patching",
        [
            # per-target rows are compared; the average rows would double-count them
            e3_row("gradsplitter", "2", 6.0),
            e3_row("gradsplitter", "2", 4.0, "overfit"),
            e3_row("random_gradsplitter", "2", 1.0),
            e3_row("random_gradsplitter", "2", 3.0, "overfit"),
            e3_row("moda", "2", 1.0),
            e3_row("random_moda", "2", 2.5),
            e3_row("gradsplitter", "average", 99.0),
            e3_row("random_gradsplitter", "average", -99.0),
        ],
    )
    write(
        tables,
        "e4_new_tasks",
        [
            {
                "setting": setting,
                "kind": kind,
                "approach": approach,
                "variant": "composed",
                "pair": pair,
                "accuracy_difference_pp": value,
            }
            for setting, kind, approach, pair, value in (
                ("digits_x_shapes", "inter", "gradsplitter", "0+0", -1.0),
                ("digits_x_shapes", "inter", "gradsplitter", "7+5", -3.0),
                ("digits_x_shapes", "inter", "random_gradsplitter", "0+0", -30.0),
                ("digits_x_shapes", "inter", "random_gradsplitter", "7+5", -20.0),
                ("digits_x_shapes", "inter", "random_gradsplitter", "mean", 50.0),
                ("digits_intra", "intra", "gradsplitter", "3+8", -2.0),
                ("digits_intra", "intra", "random_gradsplitter", "3+8", -1.0),
            )
        ],
    )
    return tables


def test_the_card_sets_each_approach_against_its_own_control(tables):
    card = controls_card(tables).set_index(["experiment", "approach", "where"])
    e2 = card.loc[("E2", "gradsplitter", "model simcnn, dataset digits")]
    assert (e2.approach_value, e2.control_value, e2.margin) == (0.4, 20.0, 19.6)
    assert e2.verdict == "above random_gradsplitter"
    # MwT against its control on the composition both share (its composed column), not
    # against its modular model's own accuracy
    assert card.loc[("E2", "mwt", "model simcnn, dataset digits")].approach_value == 2.0
    assert "pan_rajan" not in card.index.get_level_values("approach")
    assert not card.index.get_level_values("approach").str.startswith("random_").any()

    e3 = card.loc[("E3", "gradsplitter", "protocol minmax, setting digits_half, model simcnn")]
    assert (e3.approach_value, e3.control_value, e3.margin) == (5.0, 2.0, 3.0)
    moda = card.loc[("E3", "moda", "protocol minmax, setting digits_half, model simcnn")]
    assert moda.margin == -1.5 and moda.verdict == "not above random_moda"

    inter = card.loc[
        ("E4", "gradsplitter", "setting digits_x_shapes, kind inter, variant composed")
    ]
    assert (inter.approach_value, inter.control_value, inter.margin) == (-2.0, -25.0, 23.0)
    intra = card.loc[("E4", "gradsplitter", "setting digits_intra, kind intra, variant composed")]
    assert intra.verdict == "not above random_gradsplitter"


def test_the_readings_give_each_approach_beside_its_control(tables):
    e2 = reading(tables, "e2")
    assert "Least accuracy lost: pan_rajan" in e2 and "most: gradsplitter" in e2
    assert (
        "Against its random control (composed accuracy loss (pp), the same kernel counts "
        "drawn at random): gradsplitter +0.40 vs +20.00; mwt +2.00 vs +35.00; 2 of 2 "
        "approaches do better than their control."
    ) in e2
    e3 = reading(tables, "e3")
    assert "Largest mean F1 gain from patching: gradsplitter (+5.00 pp)" in e3
    assert "in 100 % of 3 weak-model/target rows" in e3  # the approaches' rows only
    assert "gradsplitter +5.00 vs +2.00; moda +1.00 vs +2.50; 1 of 2 approaches" in e3
    e4 = reading(tables, "e4")
    # the cross-dataset comparison follows the cross-dataset reading; within one dataset none
    across, within = e4.split("within one dataset")
    assert "gradsplitter -2.00 vs -25.00" in across and "vs" not in within


def test_the_report_shows_the_card_even_without_published_headlines(tables):
    page = scorecard_html(tables, {})
    assert "No published headline can be set against this study" in page
    assert "Against the random controls" in page
    assert "4 of 6 comparisons find the approach above its random control" in page


def test_a_control_is_drawn_in_its_approachs_colour():
    assert approach_style("random_mwt") == {"color": approach_style("mwt")["color"], "marker": "x"}
    assert approach_style("mwt")["marker"] != "x"


def test_e5_sets_union_networks_against_the_controls_union_networks(tmp_path):
    """MwT's sub-task headline is its (fine-tuned) union network: where the controls' union
    networks were built too, each union column gets its own comparison and sentence."""
    rows = [
        {
            "approach": approach,
            "model": "simcnn",
            "dataset": "digits",
            "size": size,
            "accuracy_diff_pp": diff,
            "union_diff_pp": union,
            "finetuned_diff_pp": tuned,
        }
        for approach, diff, union, tuned in (
            ("mwt", -1.0, -2.0, 0.5),
            ("random_mwt", -30.0, -40.0, -5.0),
            ("gradsplitter", -0.5, None, None),
            ("random_gradsplitter", -20.0, None, None),
        )
        for size in (2, 3)
    ]
    write(tmp_path, "e5_subtask_reuse", rows)
    card = controls_card(tmp_path).set_index(["approach", "metric"])
    assert card.loc[("mwt", "union network − model's (pp)")].margin == 38.0
    assert card.loc[("mwt", "fine-tuned union network − model's (pp)")].margin == 5.5
    assert ("gradsplitter", "union network − model's (pp)") not in card.index
    text = reading(tmp_path, "e5")
    assert (
        "(sub-task accuracy − model's (pp), the same kernel counts drawn at random): "
        "gradsplitter -0.50 vs -20.00; mwt -1.00 vs -30.00; 2 of 2" in text
    )
    assert (
        "(fine-tuned union network − model's (pp), the same kernel counts drawn at "
        "random): mwt +0.50 vs -5.00; 1 of 1" in text
    )


def test_e3_sets_the_modules_ranking_beside_the_patch(tmp_path):
    """The module's ROC AUC (target class vs the rest, before calibration) is compared with its
    control's too: a patch's F1 can hide what the module knows."""
    rows = [
        {**e3_row(approach, "2", f1, weak), "module_auc": auc}
        for approach, f1, auc in (("cnnsplitter", -3.0, 1.0), ("random_cnnsplitter", 4.0, 0.9))
        for weak in ("simple", "overfit")
    ]
    write(tmp_path, "e3_patching", rows)
    card = controls_card(tmp_path).set_index("metric")
    f1 = card.loc["F1 gain (pp)"]
    assert f1.verdict == "not above random_cnnsplitter"
    auc = card.loc["module ROC AUC, target class vs the rest"]
    assert (auc.approach_value, auc.control_value) == (1.0, 0.9)
    assert auc.verdict == "above random_cnnsplitter"
    assert "cnnsplitter +1.00 vs +0.90; 1 of 1 approaches" in reading(tmp_path, "e3")
