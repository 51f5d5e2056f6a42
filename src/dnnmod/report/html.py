"""The study report: one self-contained HTML file built from ``results/<study>/``.

It picks up every table and figure the study has written, whatever experiment wrote them:
``tables/<name>.csv`` (with the ``<name>.md`` rendering ``write_table`` made and links to the
CSV and LaTeX beside it) and ``figures/<name>.png`` (embedded, a link to the PDF), each with
the caption the rule gives Snakemake's ``report(...)``: ``<captions>/<name>.rst`` (for a
figure, ``<name>_figure.rst`` first), grouped by experiment (``e<N>_`` prefix). It adds the
configuration, the environment that built it (package versions, devices) and the wall time
and device of every job from the ``benchmark:`` files. Nothing is recomputed: it reads files
only, so it rebuilds from pulled results.
"""

from __future__ import annotations

import base64
import html
import platform
import re
from importlib import metadata
from pathlib import Path

import pandas as pd
import yaml

from dnnmod.artifacts import atomic_write
from dnnmod.deviations import deviation_table
from dnnmod.errors import ArtifactError
from dnnmod.report.cost import measured_jobs
from dnnmod.report.scorecard import controls_card, reading, scorecard
from dnnmod.report.tables import without_empty_columns

# The experiments of the study (study.md), by file-name prefix.
EXPERIMENTS = {
    "e1": "E1 Base models", "e2": "E2 Modularization effectiveness",
    "e3": "E3 Patching weak models", "e4": "E4 New-task composition",
    "e5": "E5 Sub-task reuse", "e6": "E6 Replacement", "e7": "E7 Sensitivity and ablations",
    "e8": "E8 Cost: time, energy and CO2e",
}
OTHER = "Other results"
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
nav ul { columns: 2; } table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 85%; }
th, td { border-bottom: 1px solid #ccc; padding: 2px 8px; text-align: right; }
th { border-bottom: 2px solid #444; } td:first-child, th:first-child { text-align: left; }
.scroll { overflow-x: auto; } .caption { color: #444; } figure img { max-width: 100%; }
article, figure { border-left: 4px solid #ddd; padding-left: 1em; margin: 1.5em 0; }
table.text td, table.scorecard td { text-align: left; vertical-align: top; }
table.scorecard td:nth-child(n+5):nth-child(-n+7) { text-align: right; }
.reading { font-size: 105%; background: #f4f8ff; padding: 0.5em; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; } .files { font-size: 85%; }
"""


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def category_of(name: str) -> str:
    prefix = name.split("_", 1)[0].lower()
    return EXPERIMENTS.get(prefix, OTHER)


def caption_html(captions: Path | None, *names: str) -> str:
    """The rule's reStructuredText caption, the first of ``<name>.rst`` found, as HTML ("" when
    the rule has none)."""
    path = next((captions / f"{name}.rst" for name in names
                 if captions and (captions / f"{name}.rst").is_file()), None)
    if path is None:
        return ""
    from docutils.core import publish_parts

    parts = publish_parts(path.read_text(), writer="html5",
                          settings_overrides={"report_level": 5, "halt_level": 5})
    return f'<div class="caption">{parts["body"]}</div>'


def markdown_tables_html(markdown: str) -> str:
    """``write_table``'s Markdown (headings, paragraphs, pipe tables) as HTML."""
    out, rows = [], []

    def flush_table() -> None:
        if not rows:
            return
        header, body = rows[0], rows[2:]  # rows[1] is the alignment line
        out.append('<div class="scroll"><table><thead><tr>'
                   + "".join(f"<th>{html.escape(cell)}</th>" for cell in header)
                   + "</tr></thead><tbody>"
                   + "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row)
                             + "</tr>" for row in body)
                   + "</tbody></table></div>")
        rows.clear()

    for line in markdown.splitlines():
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
            continue
        flush_table()
        if line.startswith("# "):
            continue  # the title is the section heading
        if line.startswith("## "):
            out.append(f"<h4>{html.escape(line[3:])}</h4>")
        elif line.strip():
            out.append(f"<p>{html.escape(line)}</p>")
    flush_table()
    return "\n".join(out)


def table_title(markdown: str, name: str) -> str:
    first = markdown.splitlines()[0] if markdown else ""
    return first[2:] if first.startswith("# ") else name


def _table_article(path: Path, captions: Path | None) -> str:
    markdown_path = path.with_suffix(".md")
    if markdown_path.is_file():
        markdown = markdown_path.read_text()
        body = markdown_tables_html(markdown)
    else:  # a table written without write_table: the CSV as it is
        markdown = ""
        table = without_empty_columns(pd.read_csv(path))
        body = f'<div class="scroll">{table.to_html(index=False, na_rep="")}</div>'
    links = " · ".join(f'<a href="tables/{html.escape(p.name)}">{p.suffix[1:]}</a>'
                       for p in sorted(path.parent.glob(f"{path.stem}.*"))
                       + sorted(path.parent.glob(f"{path.stem}_summary.csv")))
    return (f'<article class="table" id="table-{_slug(path.stem)}">'
            f"<h3>{html.escape(table_title(markdown, path.stem))} "
            f"<small>({html.escape(path.name)})</small></h3>"
            f'{caption_html(captions, path.stem)}{body}<p class="files">files: {links}</p>'
            "</article>")


def _figure(path: Path, captions: Path | None) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    pdf = path.with_suffix(".pdf")
    link = (f' <a href="figures/{html.escape(pdf.name)}">pdf</a>' if pdf.is_file() else "")
    return (f'<figure id="figure-{_slug(path.stem)}">'
            f'<img src="data:image/png;base64,{data}" alt="{html.escape(path.stem)}">'
            f"<figcaption><strong>{html.escape(path.name)}</strong>{link}"
            f"{caption_html(captions, f'{path.stem}_figure', path.stem)}</figcaption></figure>")


def job_table(results: Path) -> pd.DataFrame:
    """Wall time, CPU time, peak memory and device of every benchmarked job."""
    rows = [{"step": relative.parts[0], "job": "/".join(relative.parts[1:]),
             "wall seconds": usage["wall_seconds"], "CPU seconds": usage["cpu_seconds"],
             "peak RSS (MB)": usage["max_rss_mb"], "device": device}
            for relative, usage, device in measured_jobs(results)]
    return pd.DataFrame(rows, columns=["step", "job", "wall seconds", "CPU seconds",
                                       "peak RSS (MB)", "device"])


def environment() -> dict[str, str]:
    """Python, platform, devices and the versions of dnnmod's dependencies, as installed."""
    info = {"python": platform.python_version(), "platform": platform.platform(),
            "processor": _cpu_model()}
    try:
        import torch

        info["torch CUDA"] = (", ".join(torch.cuda.get_device_name(i)
                                        for i in range(torch.cuda.device_count()))
                              if torch.cuda.is_available() else "no GPU visible")
    except ImportError:
        info["torch CUDA"] = "torch not installed"
    names = ["dnnmod"] + [re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0]
                          for requirement in metadata.requires("dnnmod") or []
                          if "extra ==" not in requirement]
    for name in names:
        try:
            info[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            info[name] = "not installed"
    return info


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def scorecard_html(tables: Path, config: dict) -> str:
    """The reproduction scorecard (dnnmod.report.scorecard) as a table, or why it is empty."""
    card = scorecard(tables, config)
    if card.empty:
        text = ("<p>No published headline can be set against this study: none of its results "
                "is on a paper's model, dataset and protocol (the paper-scale config, "
                "config/config.yaml, reproduces them).</p>")
    else:
        within = card.verdict.str.startswith("within").sum()
        table = card.to_html(index=False, float_format="%.2f", classes="scorecard")
        text = (f"<p>{within} of {len(card)} published headlines reproduced within tolerance "
                "(accuracy and accuracy loss ±1 pp; KRR, module size and relative reductions "
                "±5 pp; gains: the same sign and ±3 pp). Δ = ours − published.</p>"
                f'<div class="scroll">{table}</div>')
    return text + controls_html(tables)


def controls_html(tables: Path) -> str:
    """Each approach against its random control (dnnmod.report.scorecard.controls_card), ""
    when the study cut no control."""
    card = controls_card(tables)
    if card.empty:
        return ""
    above = card.verdict.str.startswith("above").sum()
    table = card.to_html(index=False, float_format="%.2f", classes="scorecard")
    return ("<h3>Against the random controls</h3>"
            f"<p>{above} of {len(card)} comparisons find the approach above its random control "
            "(random_&lt;approach&gt;: as many kernels per class and layer as its modules keep, "
            "drawn at random from the same model). margin &gt; 0: the approach loses less or "
            "gains more than its control. No paper reports one.</p>"
            f'<div class="scroll">{table}</div>')


def deviations_html(config: dict) -> str:
    """The study's settings that differ from the papers, with the config's reasons."""
    rows = pd.DataFrame(deviation_table(config),
                        columns=["setting", "paper", "ours", "why", "source"])
    if rows.empty:
        return "<p>Every setting the papers fix is set to the papers' value.</p>"
    unexplained = (rows.why == "no reason stated").sum()
    return (f"<p>{len(rows)} settings differ from the papers' (reference: "
            "src/dnnmod/reference/paper_settings.yaml), each with the reason the config gives "
            f"under <code>deviations:</code>{f'; {unexplained} without one' if unexplained else ''}"
            ". A setting left at dnnmod's default is listed when the config says why it "
            "differs; tests/test_deviations.py checks the paper-scale study's defaults.</p>"
            f'<div class="scroll">{rows.to_html(index=False, classes="text")}</div>')


def reading_html(tables: Path, category: str) -> str:
    """The generated reading that opens an experiment's section ("" for none)."""
    prefix = next((key for key, title in EXPERIMENTS.items() if title == category), None)
    text = reading(tables, prefix) if prefix else ""
    return f'<p class="reading">{html.escape(text)}</p>' if text else ""


def build_report(results: Path, out: Path, config: dict, captions: Path | None = None) -> dict:
    """Write the HTML report of the study in ``results``; returns what it holds (names of
    tables and figures), for logging and tests."""
    results = Path(results)
    tables = sorted(p for p in (results / "tables").glob("*.csv")
                    if not p.stem.endswith("_summary"))
    figures = sorted((results / "figures").glob("*.png"))
    if not tables and not figures:
        raise ArtifactError(f"{results}: no tables/*.csv and no figures/*.png; run the study "
                            "first (or dvc pull its results)")
    sections: dict[str, list[str]] = {}
    for path in tables:
        sections.setdefault(category_of(path.stem), []).append(_table_article(path, captions))
    for path in figures:
        sections.setdefault(category_of(path.stem), []).append(_figure(path, captions))
    order = [*EXPERIMENTS.values(), OTHER]
    study = config.get("study", results.name)
    jobs = job_table(results)
    first = [("Reproduction scorecard", scorecard_html(results / "tables", config)),
             ("Deviations from the papers", deviations_html(config))]
    extra = [("Wall time and device of every job",
              f"<p>{len(jobs)} jobs, {jobs['wall seconds'].sum():.1f} s in all, from the "
              "rules' <code>benchmark:</code> files; the device from each job's log.</p>"
              f'<div class="scroll">{jobs.to_html(index=False, float_format="%.2f")}</div>'),
             ("Environment", "<p>Where this report was built.</p>"
              + pd.DataFrame(environment().items(), columns=["what", "version or value"]
                             ).to_html(index=False)),
             ("Configuration", "<pre>" + html.escape(yaml.safe_dump(config, sort_keys=False))
              + "</pre>")]
    headings = ([title for title, _ in first] + [c for c in order if c in sections]
                + [title for title, _ in extra])
    body = [f"<h1>dnnmod study report: {html.escape(study)}</h1>",
            "<nav><ul>" + "".join(f'<li><a href="#{_slug(h)}">{html.escape(h)}</a></li>'
                                  for h in headings) + "</ul></nav>"]
    body += [f'<section id="{_slug(t)}"><h2>{html.escape(t)}</h2>{content}</section>'
             for t, content in first]
    body += [f'<section id="{_slug(c)}"><h2>{html.escape(c)}</h2>'
             f'{reading_html(results / "tables", c)}{"".join(sections[c])}</section>'
             for c in order if c in sections]
    body += [f'<section id="{_slug(t)}"><h2>{html.escape(t)}</h2>{content}</section>'
             for t, content in extra]
    document = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                f"<title>dnnmod study report: {html.escape(study)}</title>"
                f"<style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
    with atomic_write(out) as tmp:
        tmp.write_text(document)
    return {"tables": [p.stem for p in tables], "figures": [p.stem for p in figures],
            "jobs": len(jobs)}
