"""Where a study's settings differ from the papers', and why.

``reference/paper_settings.yaml`` lists the settings the papers and their authors' artifacts
fix, each with the path of dnnmod's value in a study config. A study gives the reason for each
value that differs under ``deviations:`` (setting → reason); :func:`deviation_table` pairs
them into the report's table, and :func:`unexplained` names the differences that have none.
Reads the config only (no torch): the report job renders it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import yaml

from dnnmod.errors import ConfigError

#: stands for a path the study config leaves out (dnnmod's default applies)
ABSENT = object()
#: the ``deviations:`` key whose reason covers every difference not named (a scaled-down
#: study, whose every size differs by design; the paper-scale study names each one)
EVERY_OTHER = "*"
_SELECTOR = re.compile(r"^(?P<key>[^\[\]]+)\[(?P<filters>[^\]]+)\]$")


@dataclass(frozen=True)
class PaperSetting:
    """One setting the papers fix: ``path`` into the study config, or ``ours`` when dnnmod
    builds it in (no config key)."""

    setting: str
    paper: Any
    source: str
    path: str | None = None
    ours: str | None = None
    compare: str = "equal"
    affects: tuple[str, ...] = ()

    def differs(self, ours: Any) -> bool:
        if self.compare == "at_least":
            return not (isinstance(ours, int | float) and ours >= self.paper)
        return _normal(ours) != _normal(self.paper)

    def paper_text(self) -> str:
        prefix = "at least " if self.compare == "at_least" else ""
        return prefix + value_text(self.paper)


def _normal(value: Any) -> Any:
    """Lists and tuples alike, ints equal to floats (YAML's 0 and the config's 0.0)."""
    if isinstance(value, list | tuple):
        return [_normal(item) for item in value]
    if isinstance(value, Mapping):
        return {key: _normal(item) for key, item in value.items()}
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return value


def value_text(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, list | tuple | Mapping):
        return yaml.safe_dump(value, default_flow_style=True, sort_keys=False).strip()
    return str(value).lower() if isinstance(value, bool) else str(value)


@cache
def paper_settings() -> tuple[PaperSetting, ...]:
    """The bundled reference of the papers' settings."""
    with resources.files("dnnmod").joinpath("reference", "paper_settings.yaml").open() as handle:
        entries = yaml.safe_load(handle)
    fields = {field.name for field in dataclasses.fields(PaperSetting)}
    for entry in entries:
        unknown = sorted(set(entry) - fields)
        if unknown or "setting" not in entry:
            raise ConfigError(
                f"reference/paper_settings.yaml: {entry}: unknown keys {unknown} "
                f"or no setting (known: {sorted(fields)})"
            )
    settings = tuple(
        PaperSetting(**{**entry, "affects": tuple(entry.get("affects", ()))}) for entry in entries
    )
    names = [entry.setting for entry in settings]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ConfigError(f"reference/paper_settings.yaml: settings listed twice: {duplicates}")
    return settings


def _models_shared_by_mwt_and_splitters(config: Mapping[str, Any]) -> list[str]:
    """dataset/model pairs that MwT and a splitter both decompose (MwT's comparison)."""
    decomposed: dict[str, set[str]] = {}
    for entry in config.get("modularize", []):
        for model in entry["models"]:
            decomposed.setdefault(entry["approach"], set()).add(f"{entry['dataset']}/{model}")
    splitters = decomposed.get("cnnsplitter", set()) | decomposed.get("gradsplitter", set())
    return sorted(decomposed.get("mwt", set()) & splitters)


def _pan_rajan_resnet_datasets(config: Mapping[str, Any]) -> list[str]:
    """Datasets on which Pan & Rajan decomposes a CIFAR ResNet (their Table 1)."""
    resnets = {
        name
        for name, entry in config.get("models", {}).items()
        if entry.get("arch") in {"resnet20", "resnet32", "resnet56"}
    }
    return sorted(
        {
            entry["dataset"]
            for entry in config.get("modularize", [])
            if entry["approach"] == "pan_rajan" and resnets & set(entry["models"])
        }
    )


def _moda_patching_datasets(config: Mapping[str, Any]) -> list[str]:
    """Strong models' datasets of the settings that patch by MODA's protocol."""
    settings = config.get("reuse", {}).get("patching", {}).get("settings", {})
    return sorted(
        {setting["dataset"] for setting in settings.values() if setting.get("protocol") == "moda"}
    )


def _sampled_cross_dataset_pairs(config: Mapping[str, Any]) -> list[str]:
    """E4 settings across two datasets that compose a sample of their pairs (listed pairs, or
    a ``max_pairs`` cap) instead of every class of one dataset with every class of the
    other."""
    settings = config.get("reuse", {}).get("new_tasks", {}).get("settings", {})
    sampled = []
    for name, setting in settings.items():
        first, second = setting["datasets"]
        if first == second:
            continue
        if setting.get("pairs", "all") != "all":
            sampled.append(f"{name}: {len(setting['pairs'])} listed pairs")
        elif setting.get("max_pairs") is not None:
            sampled.append(f"{name}: {setting['max_pairs']} sampled pairs")
    return sorted(sampled)


#: ``@name`` paths: measures of the whole config
MEASURES: dict[str, Callable[[Mapping[str, Any]], Any]] = {
    "models_shared_by_mwt_and_splitters": _models_shared_by_mwt_and_splitters,
    "pan_rajan_resnet_datasets": _pan_rajan_resnet_datasets,
    "moda_patching_datasets": _moda_patching_datasets,
    "sampled_cross_dataset_pairs": _sampled_cross_dataset_pairs,
}


def config_value(config: Mapping[str, Any], path: str) -> Any:
    """The value at ``path`` (see reference/paper_settings.yaml), or :data:`ABSENT`."""
    if path.startswith("@"):
        if path[1:] not in MEASURES:
            raise ConfigError(f"{path}: no such measure; known: {sorted(MEASURES)}")
        return MEASURES[path[1:]](config)
    path, _, operation = path.partition("|")
    value: Any = config
    for part in path.split("."):
        match = _SELECTOR.match(part)
        key = match["key"] if match else part
        if not isinstance(value, Mapping) or key not in value:
            return ABSENT
        value = value[key]
        if match:
            wanted = dict(item.split("=", 1) for item in match["filters"].split(","))
            value = next(
                (
                    item
                    for item in value or []
                    if isinstance(item, Mapping)
                    and all(str(item.get(k)) == v for k, v in wanted.items())
                ),
                ABSENT,
            )
            if value is ABSENT:
                return ABSENT
    if operation == "count":
        return len(value)
    if operation == "model":  # a model name: what it builds
        entry = config.get("models", {}).get(value, ABSENT)
        return entry if entry is ABSENT else {"options": {}, **entry}
    if operation:
        raise ConfigError(f"{path}|{operation}: unknown operation; known: count, model")
    return value


def stated_reasons(config: Mapping[str, Any]) -> dict[str, str]:
    """The config's ``deviations:``, checked: every key names a reference setting."""
    reasons = dict(config.get("deviations") or {})
    known = {entry.setting for entry in paper_settings()} | {EVERY_OTHER}
    unknown = sorted(set(reasons) - known)
    if unknown:
        raise ConfigError(f"deviations: {unknown} name no setting of reference/paper_settings.yaml")
    return reasons


def compared_settings(
    config: Mapping[str, Any], default: Callable[[str], Any] | None = None
) -> list[tuple[PaperSetting, Any]]:
    """(setting, our value) for every reference setting; a path the config leaves out takes
    ``default(path)`` when given, else stays :data:`ABSENT`."""
    pairs = []
    for entry in paper_settings():
        if entry.path is None:
            ours = entry.ours
        else:
            ours = config_value(config, entry.path)
            if ours is ABSENT and default is not None:
                ours = default(entry.path)
        pairs.append((entry, ours))
    return pairs


def deviation_table(config: Mapping[str, Any]) -> list[dict[str, str]]:
    """One row per setting where the study differs from the papers: setting, paper value, our
    value, why (the config's reason, or that none is given), the paper's source and the
    experiments it bears on (``affects``: ``e3:moda``-like tags, space-separated). A setting
    the config leaves at dnnmod's default is listed when the config gives a reason for it
    (tests/test_deviations.py checks the defaults of the paper-scale study)."""
    reasons = stated_reasons(config)
    rows = []
    for entry, ours in compared_settings(config):
        if ours is ABSENT:
            # left at dnnmod's default: listed when the config says why it differs (the tests
            # check that it does, for the paper-scale study)
            if entry.setting not in reasons:
                continue
            ours = "dnnmod's default"
        elif entry.path is not None and not entry.differs(ours):
            continue
        rows.append(
            {
                "setting": entry.setting,
                "paper": entry.paper_text(),
                "ours": ours if isinstance(ours, str) else value_text(ours),
                "why": reasons.get(entry.setting, reasons.get(EVERY_OTHER, "no reason stated")),
                "source": entry.source,
                "affects": " ".join(entry.affects),
            }
        )
    return rows


def unexplained(
    config: Mapping[str, Any], default: Callable[[str], Any] | None = None
) -> list[str]:
    """Settings that differ from the papers with no reason in ``deviations:``; built-in
    settings (no config path) always differ, so they always need one."""
    reasons = stated_reasons(config)
    return [
        entry.setting
        for entry, ours in compared_settings(config, default)
        if ours is not ABSENT
        and (entry.path is None or entry.differs(ours))
        and entry.setting not in reasons
        and EVERY_OTHER not in reasons
    ]
