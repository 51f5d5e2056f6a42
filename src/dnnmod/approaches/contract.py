"""The approach contract as checks that report, one per requirement: what
``dnnmod check-approach`` runs against a third-party approach and tests/test_approach_contract.py
against every registered one (see :mod:`dnnmod.approaches.base` for the contract in words).

The checks that run the approach do so on a :class:`Bench`: a simcnn at width 1/16 trained for
one epoch on a few hundred of the bundled digits, per training kind the approach decomposes,
saved and reloaded as the command line does. The approach runs with its
:attr:`~dnnmod.approaches.base.Approach.contract_hyperparameters`, the smallest settings that
still exercise its algorithm.
"""

from __future__ import annotations

import contextlib
import importlib
import tempfile
import traceback
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import dnnmod.resumable
from dnnmod.approaches.base import Approach
from dnnmod.errors import ConfigError, DnnmodError
from dnnmod.modules.moduleset import REQUIRED_PROVENANCE, ModuleSet

#: images of each split the bench's base models train and are decomposed on
BENCH_IMAGES = {"train": 320, "val": 160, "test": 160}
BENCH_SEED = 0


@dataclass(frozen=True)
class Outcome:
    """One requirement's result: ``passed`` None where it does not apply to this approach."""

    requirement: str
    passed: bool | None
    detail: str = ""

    def line(self) -> str:
        status = {True: "passed", False: "FAILED", None: "n/a"}[self.passed]
        return f"{status:7} {self.requirement}" + (f": {self.detail}" if self.detail else "")


class Interrupted(Exception):
    """Stands for a job killed right after its first checkpoint was written."""


@contextlib.contextmanager
def interrupted_after_first_checkpoint() -> Iterator[None]:
    """While open, the first checkpoint a :class:`~dnnmod.resumable.ResumableLoop` writes
    raises :class:`Interrupted` once it is on disk."""
    save = dnnmod.resumable.save_checkpoint

    def save_then_die(path, checkpoint):
        save(path, checkpoint)
        if checkpoint["step"] == 0:
            raise Interrupted

    dnnmod.resumable.save_checkpoint = save_then_die
    try:
        yield
    finally:
        dnnmod.resumable.save_checkpoint = save


@dataclass
class Bench:
    """The data and the base models the contract runs an approach on; bases are trained per
    training kind on first use, and referenced module sets are run once per approach."""

    data: Any  # DatasetSplits
    directory: Path
    _bases: dict[str, tuple[torch.nn.Module, dict[str, Any]]] = field(default_factory=dict)
    _references: dict[tuple[str, str], ModuleSet] = field(default_factory=dict)

    @classmethod
    def from_digits(cls, directory: Path) -> Bench:
        """A bench over the bundled digits, prepared under ``directory``."""
        from dnnmod.data import DatasetSplits, load_dataset, make_splits, prepare

        prepare("digits", directory)
        make_splits(directory, "digits", seed=BENCH_SEED)
        digits = load_dataset(directory, "digits", seed=BENCH_SEED)
        return cls(small_splits(digits, DatasetSplits), directory)

    def base(self, kind: str) -> tuple[torch.nn.Module, dict[str, Any]]:
        """A tiny simcnn trained one epoch with training kind ``kind``: (model, metadata)."""
        if kind not in self._bases:
            from dnnmod.models import build_model
            from dnnmod.training.model_io import load_model, save_model
            from dnnmod.training.objectives import get_objective
            from dnnmod.training.train import Recipe, train

            torch.manual_seed(BENCH_SEED)
            model = build_model("simcnn", self.data.num_classes, width=0.0625)
            objective = get_objective(kind)
            result = train(model, self.data, Recipe(epochs=1, batch_size=64, lr=0.05),
                           seed=BENCH_SEED, objective=objective)
            path = self.directory / f"base_{kind}" / "model.safetensors"
            path.parent.mkdir(parents=True, exist_ok=True)
            save_model(path, result.model, base_meta(self.data, objective))
            self._bases[kind] = load_model(path)
        return self._bases[kind]

    def run(self, approach: Approach, overrides: Mapping[str, Any], *,
            checkpoint: Path | None = None) -> ModuleSet:
        """``approach`` run on the base of its training kind, the module sets it reads given."""
        from dnnmod.approaches import get_approach, run_approach

        hyperparameters = approach.resolve(overrides)
        model, meta = self.base(approach.training_for(hyperparameters))
        references = {}
        for name in approach.references(hyperparameters):
            key = (name, meta["weights_sha256"])
            if key not in self._references:
                reference = get_approach(name)
                self._references[key] = self.run(reference, reference.contract_hyperparameters)
            references[name] = self._references[key]
        return run_approach(approach, model, meta, self.data, overrides, seed=BENCH_SEED,
                            checkpoint=checkpoint, progress=False, references=references)


def small_splits(data, splits_type):
    """The first :data:`BENCH_IMAGES` of each split of ``data``."""
    return splits_type(**{split: getattr(data, split).take(range(count))
                          for split, count in BENCH_IMAGES.items()}, meta=data.meta)


def base_meta(data, objective) -> dict[str, Any]:
    """The metadata a base model of the bench is saved with, as ``dnnmod train`` writes it."""
    return {"arch": "simcnn", "model": "simcnn", "dataset": "digits",
            "num_classes": data.num_classes, "width": 0.0625, "options": {},
            "training": objective.name, "objective": objective.hyperparameters,
            "normalization": {"mean": data.train.mean.tolist(), "std": data.train.std.tolist()},
            "seed": BENCH_SEED, "input_shape": list(data.test.images.shape[1:]),
            "metrics": {"test_accuracy": 0.0}, "wall_seconds": 0.0}


def same_modules(a: ModuleSet, b: ModuleSet) -> bool:
    """Same classes, masks and head weights."""
    return (a.classes == b.classes and set(a.masks) == set(b.masks)
            and all(torch.equal(a.masks[n], b.masks[n]) for n in a.masks)
            and all(torch.equal(t, b.head.state_dict()[n])
                    for n, t in a.head.state_dict().items()))


def _expect_config_error(call: Callable[[], Any], naming: str) -> tuple[bool, str]:
    try:
        call()
    except ConfigError as err:
        if naming in str(err):
            return True, ""
        return False, f"the ConfigError reads {str(err)!r}, which does not say {naming!r}"
    except Exception as err:  # the requirement is about which error
        return False, f"raised {type(err).__name__} instead of ConfigError: {err}"
    return False, "no error"


def check_settings(approach: Approach) -> list[Outcome]:
    """The requirements on an approach's hyperparameters (nothing runs)."""
    from dnnmod.training.objectives import OBJECTIVES

    name = approach.name
    outcomes = []
    try:
        resolved = approach.resolve({})
        passed = resolved == dict(approach.defaults)
        outcomes.append(Outcome("resolve({}) gives the reference hyperparameters", passed,
                                "" if passed else f"got {resolved}, defaults {approach.defaults}"))
    except Exception as err:  # reported, not raised
        outcomes.append(Outcome("resolve({}) gives the reference hyperparameters", False,
                                f"{type(err).__name__}: {err}"))
        resolved = None
    outcomes.append(Outcome(
        "an unknown key is a ConfigError naming it",
        *_expect_config_error(lambda: approach.resolve({"nope": 1}),
                              f"approaches.{name}: unknown keys ['nope']")))
    typed = next(((key, value) for key, value in approach.defaults.items()
                  if value is not None), None)
    if typed is None:
        outcomes.append(Outcome("a value of the wrong type is a ConfigError naming it", None,
                                "no hyperparameter with a default to contradict"))
    else:
        key, default = typed
        wrong = 1 if isinstance(default, str) else "1"
        outcomes.append(Outcome(
            "a value of the wrong type is a ConfigError naming it",
            *_expect_config_error(lambda: approach.resolve({key: wrong}),
                                  f"approaches.{name}.{key}: expected")))
    try:
        small = approach.resolve(approach.contract_hyperparameters)
        passed = set(small) == set(approach.defaults)
        outcomes.append(Outcome("its contract_hyperparameters resolve", passed,
                                "" if passed else f"keys {sorted(small)}"))
    except Exception as err:
        outcomes.append(Outcome("its contract_hyperparameters resolve", False,
                                f"{type(err).__name__}: {err}"))
    if resolved is not None:
        kind = approach.training_for(resolved)
        outcomes.append(Outcome("its training kind is registered", kind in OBJECTIVES,
                                f"{kind!r}" + ("" if kind in OBJECTIVES else
                                               f"; registered: {sorted(OBJECTIVES)}")))
    return outcomes


def check_runs(approach: Approach, bench: Bench) -> list[Outcome]:
    """The requirements on what the approach's ``modularize`` returns, run on ``bench``."""
    name, overrides = approach.name, approach.contract_hyperparameters
    provenance = "modularize returns a module set with the required provenance"
    resume = "interrupted after its first checkpoint and run again, it gives the same modules"
    round_trip = "its module set survives save -> load unchanged"
    try:
        modules = bench.run(approach, overrides)
    except Exception as err:  # reported, with where it came from
        detail = f"{type(err).__name__}: {err}"
        if not isinstance(err, DnnmodError):
            detail += " at " + traceback.format_tb(err.__traceback__)[-1].strip().splitlines()[0]
        return [Outcome(provenance, False, detail),
                Outcome(resume, False, "not run: modularize failed"),
                Outcome(round_trip, False, "not run: modularize failed")]
    base = bench.base(approach.training_for(approach.resolve(overrides)))
    problems = []
    missing = sorted(set(REQUIRED_PROVENANCE) - set(modules.provenance))
    if missing:
        problems.append(f"provenance lacks {missing}")
    if modules.provenance.get("approach") != name:
        problems.append(f"provenance names approach {modules.provenance.get('approach')!r}")
    if modules.base.get("weights_sha256") != base[1]["weights_sha256"]:
        problems.append("the module set does not name its base model's weights")
    outcomes = [Outcome(provenance, not problems, "; ".join(problems))]

    with tempfile.TemporaryDirectory(dir=bench.directory) as scratch:
        checkpoint = Path(scratch) / "resume.pt"
        try:
            with interrupted_after_first_checkpoint():
                rerun = bench.run(approach, overrides, checkpoint=checkpoint)
            how = "never checkpoints through dnnmod.resumable: two runs compared"
        except Interrupted:
            rerun = bench.run(approach, overrides, checkpoint=checkpoint)
            how = "killed after checkpoint 0, resumed"
        except Exception as err:
            rerun, how = None, f"{type(err).__name__}: {err}"
        passed = rerun is not None and same_modules(rerun, modules)
        outcomes.append(Outcome(resume, passed, how if passed or rerun is None
                                else f"{how}; the module sets differ"))

        path = Path(scratch) / "modules.safetensors"
        try:
            modules.save(path)
            loaded = ModuleSet.load(path, base=base[1])
            x, _ = bench.data.test.float_batch(torch.arange(16))
            problems = [problem for problem, bad in [
                ("masks or head differ", not same_modules(loaded, modules)),
                ("provenance differs", loaded.provenance != modules.provenance),
                ("scores differ", not torch.equal(loaded.scores(base[0], x),
                                                  modules.scores(base[0], x)))] if bad]
            outcomes.append(Outcome(round_trip, not problems, "; ".join(problems)))
        except Exception as err:
            outcomes.append(Outcome(round_trip, False, f"{type(err).__name__}: {err}"))
    return outcomes


def load_approach_class(target: str) -> Approach:
    """The approach ``PACKAGE.MODULE:CLASS`` names, instantiated; ConfigError if it cannot be
    imported or is not an :class:`Approach` subclass with a name."""
    module_name, _, class_name = target.partition(":")
    if not module_name or not class_name:
        raise ConfigError(f"{target!r}: expected PACKAGE.MODULE:CLASS")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # any import failure is the user's to fix
        raise ConfigError(f"{target}: importing {module_name} failed: "
                          f"{type(err).__name__}: {err}") from err
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Approach)):
        raise ConfigError(f"{target}: {module_name} has no subclass of "
                          f"dnnmod.approaches.base.Approach named {class_name!r}")
    if not isinstance(getattr(cls, "name", None), str):
        raise ConfigError(f"{target}: {class_name} sets no `name` (its identifier in configs)")
    try:
        return cls()
    except TypeError as err:
        raise ConfigError(f"{target}: {class_name}() failed: {err}") from err


def check_approach(approach: Approach, bench: Bench) -> list[Outcome]:
    """Every requirement of the contract, checked on ``approach``."""
    return check_settings(approach) + check_runs(approach, bench)


def check_approach_command(target: str, work_dir: Path | None = None,
                           print_line: Callable[[str], None] = print) -> int:
    """``dnnmod check-approach``: every requirement of the approach ``target`` (a registered
    name or ``PACKAGE.MODULE:CLASS``), one printed line each; 0 if all pass, else 1."""
    from dnnmod.approaches import get_approach

    approach = load_approach_class(target) if ":" in target else get_approach(target)
    with contextlib.ExitStack() as stack:
        if work_dir is None:
            work_dir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        work_dir.mkdir(parents=True, exist_ok=True)
        outcomes = check_approach(approach, Bench.from_digits(work_dir))
    for outcome in outcomes:
        print_line(outcome.line())
    failed = sum(outcome.passed is False for outcome in outcomes)
    print_line(f"{approach.name} ({type(approach).__module__}.{type(approach).__qualname__}): "
               f"{len(outcomes) - failed} of {len(outcomes)} requirements met")
    return 1 if failed else 0
