"""Whether two runs of a study computed the same things: every trained model and module set
byte for byte, module-set records and tables without what a rerun may change (wall times,
the device's name). For a restructuring that must not change behaviour: run the study at the
commit before and after, from the same config, on one machine, and compare the two trees.

    python benchmarks/compare_runs.py BEFORE_TREE AFTER_TREE [--study demo]

Prints one line per file (sha256 prefixes, before and after) and a summary; exit status 1 if
anything differs or is missing after.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import pandas as pd

#: record entries and table columns a rerun of the same computation may change
VOLATILE_ENTRIES = {"wall_seconds", "device"}
BYTE_EXACT = ("model.safetensors", "modules.safetensors")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def without_volatile(value):
    if isinstance(value, dict):
        return {k: without_volatile(v) for k, v in value.items() if k not in VOLATILE_ENTRIES}
    if isinstance(value, list):
        return [without_volatile(v) for v in value]
    return value


def stable_digest(path: Path) -> str:
    """sha256 of the file, or of its content less its volatile entries/columns."""
    if path.name in BYTE_EXACT:
        return sha256(path.read_bytes())
    if path.suffix == ".json":
        record = without_volatile(json.loads(path.read_text()))
        return sha256(json.dumps(record, sort_keys=True).encode())
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    kept = [c for c in table.columns if "seconds" not in c and c not in VOLATILE_ENTRIES]
    return sha256(table[kept].to_csv(index=False).encode())


def compared_files(results: Path) -> list[Path]:
    """Models, module sets and their records, and the tables, relative to ``results``."""
    wanted = [p for p in results.rglob("*")
              if p.name in BYTE_EXACT or p.name == "modules.json"
              or (p.suffix == ".csv" and p.parent.name == "tables")]
    return sorted(p.relative_to(results) for p in wanted)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--study", default="demo")
    parser.add_argument("--skip-table", action="append", default=["e8_cost.csv",
                                                                  "e8_cost_summary.csv",
                                                                  "e8_scenarios.csv"],
                        help="a table of measured times to leave out (default: E8's)")
    args = parser.parse_args(argv)
    before, after = (tree / "results" / args.study for tree in (args.before, args.after))
    counts = {"same": 0, "DIFFER": 0, "MISSING": 0}
    for relative in compared_files(before):
        if relative.name in args.skip_table:
            continue
        if not (after / relative).exists():
            status, digests = "MISSING", (stable_digest(before / relative), "-" * 64)
        else:
            digests = (stable_digest(before / relative), stable_digest(after / relative))
            status = "same" if digests[0] == digests[1] else "DIFFER"
        counts[status] += 1
        print(f"{status:7} {digests[0][:16]} {digests[1][:16]} {relative}")
    print(f"{counts['same']} equal, {counts['DIFFER']} differ, {counts['MISSING']} missing "
          f"after (records without {sorted(VOLATILE_ENTRIES)}, tables without *seconds* and "
          f"device columns; left out: {', '.join(args.skip_table)})")
    return 0 if counts["same"] and not (counts["DIFFER"] or counts["MISSING"]) else 1


if __name__ == "__main__":
    sys.exit(main())
