"""What a job pays before it works: each command loads only the libraries its work needs.

Every workflow job is a fresh process, so an import is paid once per job (torch about 2.4 s,
scikit-learn about 2 s, FLOP counting through torch's dispatch, which imports torch._dynamo,
about 1.5 s). ``benchmarks/job_fixed_cost.py`` measures these costs; this checks that they
are not paid where nothing needs them.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

#: the modules behind the table, figure and report commands: pandas and matplotlib, no torch
REPORT_MODULES = ["dnnmod.report.tables", "dnnmod.report.orderings", "dnnmod.report.cost",
                  "dnnmod.report.html", "dnnmod.report.patching", "dnnmod.report.newtask",
                  "dnnmod.report.subtasks", "dnnmod.report.pan_rajan",
                  "dnnmod.report.replacement", "dnnmod.report.sensitivity",
                  "dnnmod.report.curves"]
#: the modules behind training and modularization: torch, no scikit-learn
TRAINING_MODULES = ["dnnmod.training.train", "dnnmod.approaches", "dnnmod.modules.metrics",
                    "dnnmod.reuse.subtasks", "dnnmod.reuse.patching", "dnnmod.reuse.newtask"]


def loaded_after(code: str) -> set[str]:
    """Top-level package names (and torch._dynamo) loaded by ``code`` in a fresh process."""
    probe = (f"import sys\n{code}\nimport json\n"
             "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} | "
             "({'torch._dynamo'} & set(sys.modules)))))")
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True)
    return set(json.loads(run.stdout.splitlines()[-1]))


def test_help_imports_no_torch():
    loaded = loaded_after("from dnnmod.cli import main\n"
                          "try:\n    main(['--help'])\nexcept SystemExit:\n    pass")
    assert "torch" not in loaded and "pandas" not in loaded


@pytest.mark.parametrize("module", REPORT_MODULES)
def test_table_and_figure_jobs_import_no_torch(module):
    assert "torch" not in loaded_after(f"import {module}")


def test_training_and_modularization_import_no_scikit_learn_or_flop_counter():
    loaded = loaded_after("\n".join(f"import {module}" for module in TRAINING_MODULES) + """
from dnnmod.models import build_model
from dnnmod.modules.extract import count_flops
count_flops(build_model('simcnn', 10, 0.0625), (1, 3, 32, 32))""")
    assert "torch" in loaded
    assert not {"sklearn", "scipy", "torch._dynamo"} & loaded
