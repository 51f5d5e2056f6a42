"""E3's random control names the approach whose kernel counts it matches, in its records and
in every row of the E3 table, per-target and average alike."""

from __future__ import annotations

import json

import pandas as pd

from dnnmod.report.patching import METRICS, write_patching_table


def record(approach: str, **extra) -> dict:
    return {
        "protocol": "minmax",
        "setting": "half",
        "approach": approach,
        "model": "simcnn",
        "arch": "simcnn",
        "dataset": "digits_0_4",
        "source_dataset": "digits",
        "training": "st",
        "seed": 0,
        **extra,
        "rows": [
            {
                "weak_type": "simple",
                "target_class": tc,
                "target_name": str(tc),
                "weak_model": "simple_simcnn",
                "weak_train_accuracy": 90.0,
                "weak_test_accuracy": 70.0,
                **{
                    f"{stage}_{metric}": 50.0 + tc
                    for stage in ("weak", "patched")
                    for metric in METRICS
                },
            }
            for tc in (1, 2)
        ],
    }


def test_the_random_rows_name_the_approach_they_control(tmp_path):
    paths = []
    for name, data in (
        ("gradsplitter", record("gradsplitter")),
        ("random_gradsplitter", record("random_gradsplitter", control_of="gradsplitter")),
    ):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(data))
    csv = tmp_path / "e3.csv"
    write_patching_table(paths, csv, tmp_path / "e3.json")
    table = pd.read_csv(csv, keep_default_na=False)
    controls = table[table.approach == "random_gradsplitter"]
    assert sorted(controls.target) == ["1", "2", "average"]
    assert set(controls.control_of) == {"gradsplitter"}
    assert set(table[table.approach == "gradsplitter"].control_of) == {""}
    assert "control_of" in (tmp_path / "e3.md").read_text()
