"""E4's headline is the papers' kind of new task, a class of one dataset x a class of another:
the report's reading leads with those pairs and gives pairs within one dataset after them."""

from __future__ import annotations

import pandas as pd

from dnnmod.report.scorecard import reading


def write_e4(tables, rows) -> None:
    tables.mkdir(parents=True, exist_ok=True)
    columns = ["setting", "kind", "approach", "pair", "accuracy_difference_pp"]
    pd.DataFrame(rows, columns=columns).to_csv(tables / "e4_new_tasks.csv", index=False)


def test_the_reading_leads_with_the_cross_dataset_pairs(tmp_path):
    write_e4(
        tmp_path,
        [
            ("a_x_b", "inter", "gradsplitter", "0+0", -1.0),
            ("a_x_b", "inter", "gradsplitter", "1+1", 1.0),
            ("a_x_b", "inter", "random", "0+0", -40.0),
            ("a_x_b", "inter", "random", "1+1", -30.0),
            ("a_x_b", "inter", "gradsplitter", "mean", 0.0),
            # Within one dataset random kernels do as well: they must not make the headline.
            ("a_intra", "intra", "random", "2+3", 2.0),
            ("a_intra", "intra", "gradsplitter", "2+3", 0.5),
        ],
    )
    text = reading(tmp_path, "e4")
    across, within = text.split(" Best against training from scratch within one dataset: ")
    assert across == (
        "Best against training from scratch across datasets: gradsplitter "
        "(+0.00 pp on average); composed models matched or beat the "
        "from-scratch model on 25 % of 4 pair tasks."
    )
    assert within == (
        "random (+2.00 pp on average); composed models matched or beat the "
        "from-scratch model on 100 % of 2 pair tasks."
    )


def test_a_study_with_one_kind_reads_that_kind_only(tmp_path):
    write_e4(tmp_path, [("a_intra", "intra", "moda", "2+3", -0.5)])
    assert reading(tmp_path, "e4").startswith(
        "Best against training from scratch within one dataset: moda (-0.50 pp"
    )
    assert "across datasets" not in reading(tmp_path, "e4")
