"""Registries filled from entry points: dnnmod's own approaches, training objectives, models,
datasets and combination rules, and those of any other installed package.

Each registry reads one entry-point group (:data:`GROUPS`). dnnmod declares its built-ins in
its own pyproject.toml; a plug-in package declares its own the same way, e.g.::

    [project.entry-points."dnnmod.approaches"]
    mean_activation = "dnnmod_mean_activation:MeanActivation"

A name is known from the installed metadata alone; its object is imported the first time it
is looked up, so listing names (``dnnmod --help``, the config checks' name tests) imports
neither torch nor any plug-in. A name that two distributions claim, an entry point that fails
to import, or one whose object is not what its group holds is a :class:`PluginError` naming
the distribution and the entry point.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any, Generic, TypeVar

from dnnmod.errors import DnnmodError, UnknownNameError

#: entry-point group of each registry
GROUPS = {
    "approaches": "dnnmod.approaches",
    "objectives": "dnnmod.objectives",
    "models": "dnnmod.models",
    "datasets": "dnnmod.datasets",
    "combination_rules": "dnnmod.combination_rules",
}

#: where each group's registry lives (module:attribute), imported on demand by :func:`registry`
REGISTRIES = {
    "approaches": "dnnmod.approaches:APPROACHES",
    "objectives": "dnnmod.training.objectives:OBJECTIVES",
    "models": "dnnmod.models:ARCHITECTURES",
    "datasets": "dnnmod.data.registry:DATASETS",
    "combination_rules": "dnnmod.modules.combination:COMBINATIONS",
}

#: the distribution whose entry points are the built-ins
OWN_DISTRIBUTION = "dnnmod"

T = TypeVar("T")

_REGISTRIES: list[Registry] = []  # every registry made, for refresh_all()


class PluginError(DnnmodError):
    """An entry point that clashes with another, fails to import, or holds the wrong object."""


def describe(entry_point: importlib.metadata.EntryPoint) -> str:
    """``'name = module:attr' (group, distribution D)``: where an entry point comes from."""
    distribution = entry_point.dist.name if entry_point.dist is not None else "unknown"
    return (f"entry point {entry_point.name!r} = {entry_point.value!r} "
            f"({entry_point.group}, distribution {distribution!r})")


def registry(kind: str) -> Registry:
    """The registry of ``kind`` (a key of :data:`GROUPS`)."""
    module, _, attribute = REGISTRIES[kind].partition(":")
    return getattr(importlib.import_module(module), attribute)


def listing(kind: str) -> list[str]:
    """The names of ``kind``, sorted; a plug-in's followed by its distribution in brackets."""
    names = registry(kind)
    return [name if names.source(name) == OWN_DISTRIBUTION else f"{name} ({names.source(name)})"
            for name in sorted(names)]


def refresh_all() -> None:
    """Every registry reads the installed metadata again: after a package was installed into
    (or removed from) this process's path, as tests/test_plugin_example.py does."""
    importlib.invalidate_caches()
    for registry in _REGISTRIES:
        registry.refresh()


class Registry(MutableMapping[str, T], Generic[T]):
    """Name → object of one entry-point group, loaded on first look-up.

    ``adapt(name, loaded)`` turns what an entry point loads into the registry's value (an
    approach class into its instance, say) and raises ValueError saying what is wrong with
    it. Objects can also be set in-process (``registry[name] = value``, :meth:`register`):
    tests do, and a study's Snakefile may.
    """

    def __init__(self, group: str, kind: str, adapt: Callable[[str, Any], T]) -> None:
        self.group, self.kind, self._adapt = group, kind, adapt
        self._entry_points: dict[str, importlib.metadata.EntryPoint] | None = None
        self._loaded: dict[str, T] = {}  # from entry points (or derived from them)
        self._set: dict[str, T] = {}  # set in-process
        self._removed: set[str] = set()  # entry points deleted in-process
        _REGISTRIES.append(self)

    def entry_points(self) -> dict[str, importlib.metadata.EntryPoint]:
        """Name → entry point of the group, read from the installed metadata once."""
        if self._entry_points is None:
            found: dict[str, importlib.metadata.EntryPoint] = {}
            for entry_point in importlib.metadata.entry_points(group=self.group):
                if entry_point.name in found:
                    raise PluginError(f"{self.kind} {entry_point.name!r} is claimed twice: "
                                      f"{describe(found[entry_point.name])} and "
                                      f"{describe(entry_point)}; uninstall one of them")
                found[entry_point.name] = entry_point
            if not any(entry_point.dist is not None
                       and entry_point.dist.name == OWN_DISTRIBUTION
                       for entry_point in found.values()):
                raise PluginError(f"the installed {OWN_DISTRIBUTION} declares no {self.group} "
                                  "entry points: its metadata predates them; reinstall it "
                                  "(pip install -e .)")
            self._entry_points = found
        return self._entry_points

    def refresh(self) -> None:
        """Read the installed metadata again (a package was installed or removed in this
        process); what was loaded from an entry point that remains is kept."""
        self._entry_points = None
        self._loaded = {name: value for name, value in self._loaded.items()
                        if name in self.entry_points()}

    def _names(self) -> list[str]:
        names = dict.fromkeys(name for name in self.entry_points() if name not in self._removed)
        names.update(dict.fromkeys(self._set))
        return list(names)

    def __contains__(self, name: object) -> bool:
        return name in self._set or (name in self.entry_points() and name not in self._removed)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    def __getitem__(self, name: str) -> T:
        if name in self._set:
            return self._set[name]
        if name not in self:
            raise UnknownNameError(self.kind, name, self._names())
        if name not in self._loaded:
            self._loaded[name] = self._load(self.entry_points()[name])
        return self._loaded[name]

    def _load(self, entry_point: importlib.metadata.EntryPoint) -> T:
        try:
            loaded = entry_point.load()
        except Exception as err:
            raise PluginError(f"{describe(entry_point)} failed to import: "
                              f"{type(err).__name__}: {err}") from err
        try:
            return self._adapt(entry_point.name, loaded)
        except ValueError as err:
            raise PluginError(f"{describe(entry_point)}: {err}") from err

    def __setitem__(self, name: str, value: T) -> None:
        self._set[name] = value
        self._removed.discard(name)

    def __delitem__(self, name: str) -> None:
        if name not in self:
            raise KeyError(name)
        self._set.pop(name, None)
        if name in self.entry_points():
            self._removed.add(name)

    def register(self, name: str, value: T) -> T:
        """Add ``value`` as ``name`` in this process; PluginError if the name is taken."""
        if name in self:
            where = ("an in-process registration" if name in self._set
                     else describe(self.entry_points()[name]))
            raise PluginError(f"{self.kind} {name!r} is registered twice: by {where} and "
                              "in-process")
        self[name] = value
        return value

    def source(self, name: str) -> str:
        """The distribution that provides ``name`` (``in-process`` for one set at run time)."""
        if name in self._set:
            return "in-process"
        entry_point = self.entry_points()[name]
        return entry_point.dist.name if entry_point.dist is not None else "unknown"


def named_subclass(base: type) -> Callable[[str, Any], type]:
    """An ``adapt`` for groups of classes: a subclass of ``base`` whose ``name`` is the entry
    point's."""

    def check(name: str, loaded: Any) -> type:
        if not (isinstance(loaded, type) and issubclass(loaded, base)):
            raise ValueError(f"{loaded!r} is not a subclass of {base.__module__}."
                             f"{base.__qualname__}")
        if getattr(loaded, "name", None) != name:
            raise ValueError(f"{loaded.__qualname__}.name is {getattr(loaded, 'name', None)!r}, "
                             f"not the entry point's name {name!r}")
        return loaded

    return check


def callable_object(name: str, loaded: Any) -> Callable[..., Any]:
    """An ``adapt`` for groups of functions (model builders, combination rules)."""
    if not callable(loaded):
        raise ValueError(f"{loaded!r} is not callable")
    return loaded
