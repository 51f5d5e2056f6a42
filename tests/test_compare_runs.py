"""benchmarks/compare_runs.py: two runs' models and module sets byte for byte, records and
tables without their wall times and device (how issue 32's restructuring was checked)."""

from __future__ import annotations

import json
import runpy
import shutil
from pathlib import Path

import pytest

COMPARE = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_runs.py"


def compare(before: Path, after: Path, capsys) -> tuple[int, str]:
    main = runpy.run_path(str(COMPARE))["main"]
    status = main([str(before), str(after)])
    return status, capsys.readouterr().out


def make_run(tree: Path, wall_seconds: float, modularize_seconds: float) -> Path:
    results = tree / "results" / "demo"
    module_set = results / "modules" / "digits" / "simcnn" / "mwt" / "seed0"
    module_set.mkdir(parents=True)
    (module_set / "modules.safetensors").write_bytes(b"\x00weights")
    (module_set / "modules.json").write_text(json.dumps(
        {"approach": "mwt", "provenance": {"wall_seconds": wall_seconds, "seed": 0,
                                           "device": f"cpu {wall_seconds}"}}))
    (results / "tables").mkdir()
    (results / "tables" / "e2_modularization.csv").write_text(
        f"approach,krr,modularize_seconds,device\nmwt,0.62,{modularize_seconds},cpu\n")
    (results / "tables" / "e8_cost.csv").write_text(f"job,seconds\nx,{wall_seconds}\n")
    return tree


def test_a_rerun_that_differs_only_in_times_is_the_same(tmp_path, capsys):
    before = make_run(tmp_path / "before", 1.5, 10.0)
    after = make_run(tmp_path / "after", 2.5, 12.0)
    status, out = compare(before, after, capsys)
    assert status == 0, out
    assert "3 equal, 0 differ, 0 missing" in out


@pytest.mark.parametrize("change", ["weights", "record", "table", "missing"])
def test_a_changed_result_is_found(tmp_path, capsys, change):
    before = make_run(tmp_path / "before", 1.5, 10.0)
    after = make_run(tmp_path / "after", 1.5, 10.0)
    module_set = after / "results/demo/modules/digits/simcnn/mwt/seed0"
    if change == "weights":
        (module_set / "modules.safetensors").write_bytes(b"\x01weights")
    elif change == "record":
        record = json.loads((module_set / "modules.json").read_text())
        record["provenance"]["seed"] = 1
        (module_set / "modules.json").write_text(json.dumps(record))
    elif change == "table":
        (after / "results/demo/tables/e2_modularization.csv").write_text(
            "approach,krr,modularize_seconds,device\nmwt,0.63,10.0,cpu\n")
    else:
        shutil.rmtree(module_set)
    status, out = compare(before, after, capsys)
    assert status == 1
    assert ("MISSING" if change == "missing" else "DIFFER") in out
