"""The papers' orderings between approaches, checked on a study's E2 rows.

The papers' central claims are relations, not absolute numbers: GradSplitter keeps fewer
kernels than CNNSplitter at less loss (TOSEM 2023), MwT far fewer still (ICSE 2024), MODA's
modules hold a small share of the weights (ICSE 2026). A reduced study cannot match the
published sizes, but it can show whether the relations hold on its own models. Each check
compares two approaches on the same base model (MwT and MODA: their modular-trained model of
the same name) and dataset, on the seed means, and says whether the relation holds; the
published relative reduction stands beside the measured one where a paper states it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from dnnmod.report.tables import published, published_value, write_table


@dataclass(frozen=True)
class Ordering:
    smaller: str          # the approach whose modules the papers report smaller
    larger: str           # the approach it is compared with
    measure: str          # E2 column compared: krr or module_size
    loss_too: bool        # the claim also has the smaller one lose no more accuracy
    source: str           # where the claim comes from

    @property
    def counted(self) -> str:
        return "kernels" if self.measure == "krr" else "parameters"

    @property
    def claim(self) -> str:
        loss = ", at no more accuracy loss" if self.loss_too else ""
        return f"{self.smaller} modules keep fewer {self.counted} than {self.larger}'s{loss}"

    @property
    def published_metric(self) -> str:
        return f"fewer_{self.counted}_than_{self.larger}_pct"


ORDERINGS = [
    Ordering("gradsplitter", "cnnsplitter", "krr", True, "TOSEM2023 abstract"),
    Ordering("mwt", "cnnsplitter", "krr", True, "ICSE2024-MwT abstract"),
    # MwT's paper compares with CNNSplitter only; with GradSplitter's 19.88 % it implies this.
    Ordering("mwt", "gradsplitter", "krr", False, "implied by ICSE2024-MwT and TOSEM2023"),
    # MODA's modules hold 2.1-9.1 % of VGG16's/ResNet18's weights on CIFAR-10 and SVHN
    # (Table 3), where the splitters' keep most kernels of every layer.
    Ordering("moda", "gradsplitter", "module_size", False, "ICSE2026-MODA Table 3"),
    Ordering("moda", "cnnsplitter", "module_size", False, "ICSE2026-MODA Table 3"),
]

NOTES = (
    "Each row compares two approaches' modules on the same base model and dataset (MwT and "
    "MODA decompose their own modular-trained model of that name), on the means over seeds. "
    "first: the approach the claim says keeps less, second: the one it is compared with "
    "(value: the measure, KRR or module size; loss: accuracy loss in pp). fewer_pct: how much "
    "smaller the first one's measure is, relative to the second's, 100 (1 - first_value / "
    "second_value); the published relative reduction stands beside it where a paper states "
    "one. holds: the first is smaller and, where the claim says so, loses no more accuracy. A "
    "reduced study is not expected to match the published sizes; the orderings are what it "
    "can show.")


def ordering_table(e2: pd.DataFrame) -> pd.DataFrame:
    """One row per ordering and (model, dataset) where the study has both approaches; empty
    (with the columns) where it has none."""
    means = e2.groupby(["approach", "model", "dataset"])[
        ["krr", "module_size", "accuracy_loss_pp"]].mean()
    reference = published()
    rows = []
    for ordering in ORDERINGS:
        for model, dataset in sorted({(m, d) for _, m, d in means.index}):
            if ((ordering.smaller, model, dataset) not in means.index
                    or (ordering.larger, model, dataset) not in means.index):
                continue
            first = means.loc[(ordering.smaller, model, dataset)]
            second = means.loc[(ordering.larger, model, dataset)]
            value, _ = published_value(reference, model="", dataset="",
                                       approach=ordering.smaller,
                                       metric=ordering.published_metric)
            smaller = first[ordering.measure] < second[ordering.measure]
            no_more_loss = first.accuracy_loss_pp <= second.accuracy_loss_pp
            rows.append({
                "model": model, "dataset": dataset, "claim": ordering.claim,
                "measure": ordering.measure,
                "first_value": first[ordering.measure], "first_loss_pp": first.accuracy_loss_pp,
                "second_value": second[ordering.measure],
                "second_loss_pp": second.accuracy_loss_pp,
                "fewer_pct": 100 * (1 - first[ordering.measure] / second[ordering.measure]),
                "published_fewer_pct": value,
                "holds": "yes" if smaller and (no_more_loss or not ordering.loss_too) else "no",
                "source": ordering.source,
            })
    columns = ["model", "dataset", "claim", "measure", "first_value", "first_loss_pp",
               "second_value", "second_loss_pp", "fewer_pct", "published_fewer_pct", "holds",
               "source"]
    return pd.DataFrame(rows, columns=columns)


def write_ordering_report(e2: pd.DataFrame, csv_path: Path) -> None:
    """The ordering checks of the E2 table ``e2`` as CSV, Markdown and LaTeX."""
    write_table(ordering_table(e2), csv_path, title="E2 orderings: the papers' claims checked",
                keys=["model", "dataset", "claim"], values=[], notes=NOTES, summary=False)
