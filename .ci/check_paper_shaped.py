"""After the paper-shaped run: every approach removed something from some model.

A path that runs but keeps every kernel of every model (as GradSplitter did at the shrunk
budget before its mask_travel) exercises none of the code that handles removed kernels:
extraction, the module costs, the reuse of pruned modules. This fails the run on such an
approach, naming it, and prints each approach's smallest KRR.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

DEFAULT = "results/paper_shaped/tables/e2_modularization.csv"
table = Path(sys.argv[1] if len(sys.argv) > 1 else DEFAULT)
rows = pd.read_csv(table)
smallest = rows.groupby("approach")["krr"].min().sort_index()
print(f"smallest KRR per approach ({table}):")
print(smallest.round(3).to_string())
keeps_all = sorted(smallest.index[smallest >= 1.0])
if keeps_all:
    sys.exit(f"error: these approaches kept every kernel of every model: {', '.join(keeps_all)}")
