"""What a reader of the report's tables sees: no column that is empty in every row, and a
spread (± std) only where there is more than one seed to have one."""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd
from docutils.core import publish_parts

from dnnmod.report.html import build_report
from dnnmod.report.tables import write_table


def e2_rows(seeds: list[int]) -> pd.DataFrame:
    rows = [
        {
            "approach": approach,
            "model": "simcnn",
            "dataset": "digits",
            "seed": seed,
            "krr": krr + 0.02 * seed,
            "union_loss_pp": union,
            "published_krr": None,
        }
        for seed in seeds
        for approach, krr, union in (("gradsplitter", 0.7, None), ("moda", 0.4, None))
    ]
    return pd.DataFrame(rows)


def test_renderings_drop_columns_empty_in_every_row_and_the_csv_keeps_them(tmp_path):
    write_table(
        e2_rows([0]), tmp_path / "e2.csv", "E2", ["model", "approach"], ["krr", "union_loss_pp"]
    )
    markdown = (tmp_path / "e2.md").read_text()
    latex = (tmp_path / "e2.tex").read_text()
    assert "union_loss_pp" not in markdown and "published" not in markdown
    assert "union\\_loss\\_pp" not in latex and "Δ" not in markdown
    assert "krr" in markdown
    csv = pd.read_csv(tmp_path / "e2.csv")
    assert {"union_loss_pp", "published_krr", "krr_minus_published"} <= set(csv.columns)
    summary = pd.read_csv(tmp_path / "e2_summary.csv")
    assert {"union_loss_pp_mean", "published_krr"} <= set(summary.columns)


def test_a_single_seed_has_no_spread_and_several_seeds_do(tmp_path):
    write_table(e2_rows([0]), tmp_path / "one.csv", "E2", ["model", "approach"], ["krr"])
    one = (tmp_path / "one.md").read_text()
    assert "±" not in one and " 0.70 |" in one and " 0.40 |" in one
    write_table(e2_rows([0, 1]), tmp_path / "two.csv", "E2", ["model", "approach"], ["krr"])
    two = (tmp_path / "two.md").read_text()
    assert "0.71 ± 0.01" in two and "0.41 ± 0.01" in two


def test_a_csv_without_rendering_shows_in_the_report_without_its_empty_columns(tmp_path):
    results = tmp_path / "results/tiny"
    (results / "tables").mkdir(parents=True)
    pd.DataFrame({"model": ["simcnn"], "krr": [0.5], "never_measured": [None]}).to_csv(
        results / "tables/e9_extra.csv", index=False
    )
    build_report(results, tmp_path / "report.html", {"study": "tiny"})
    page = (tmp_path / "report.html").read_text()
    assert "<th>krr</th>" in page and "never_measured" not in page


def test_every_caption_is_valid_restructured_text():
    """Snakemake's report renders the captions as reStructuredText: ``|T|`` there is an
    undefined substitution (its ``Undefined substitution referenced: "T"``)."""
    captions = sorted((Path(__file__).resolve().parents[1] / "workflow/report").glob("*.rst"))
    assert captions
    for caption in captions:
        warnings = io.StringIO()
        publish_parts(
            caption.read_text(), writer="html5", settings_overrides={"warning_stream": warnings}
        )
        assert not warnings.getvalue(), f"{caption.name}: {warnings.getvalue()}"
