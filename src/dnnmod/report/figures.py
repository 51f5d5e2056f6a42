"""Shared figure conventions: one colour and marker per approach in every figure, and every
figure written as PNG and PDF, atomically."""

from __future__ import annotations

from pathlib import Path

from dnnmod.artifacts import atomic_write
from dnnmod.controls import control_of

# Fixed per approach so a reader can follow one approach across figures; unknown names (a new
# approach) cycle through the spare styles in name order.
APPROACH_STYLES = {
    "gradsplitter": ("tab:blue", "o"),
    "cnnsplitter": ("tab:orange", "s"),
    "pan_rajan": ("tab:green", "^"),
    "mwt": ("tab:red", "D"),
    "moda": ("tab:purple", "v"),
    "st": ("black", "*"),
}
_SPARE_STYLES = [("tab:brown", "P"), ("tab:pink", "h"), ("tab:olive", "<"), ("tab:cyan", ">")]


def approach_style(name: str) -> dict[str, str]:
    """``color`` and ``marker`` keyword arguments for one approach's points or lines; a random
    control (``random_<approach>``) takes its approach's colour and a cross."""
    matched = control_of(name)
    if matched is not None:
        return {"color": approach_style(matched)["color"], "marker": "x"}
    if name in APPROACH_STYLES:
        color, marker = APPROACH_STYLES[name]
    else:
        color, marker = _SPARE_STYLES[sum(map(ord, name)) % len(_SPARE_STYLES)]
    return {"color": color, "marker": marker}


def pyplot():
    """matplotlib's pyplot on the non-interactive backend (jobs run without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path: Path) -> None:
    """Write ``figure`` as ``path`` (PNG) and the same name with ``.pdf``, then close it."""
    path = Path(path)
    for target in (path.with_suffix(".png"), path.with_suffix(".pdf")):
        with atomic_write(target) as tmp:
            figure.savefig(tmp, format=target.suffix.lstrip("."))
    pyplot().close(figure)
