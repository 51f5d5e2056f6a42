"""Approach behaviour beyond the contract (which tests/test_approach_contract.py checks for
every registered approach through dnnmod.approaches.contract), and the tiny base models and
runs other approach tests share."""

from __future__ import annotations

import pytest

from dnnmod.approaches import get_approach, run_approach
from dnnmod.approaches.contract import Bench
from dnnmod.errors import ArtifactError, DnnmodError
from dnnmod.modules.moduleset import ModuleSet


@pytest.fixture(scope="module")
def trained_bases(small_digits, tmp_path_factory):
    """Training kind → (model, metadata) of the contract's tiny simcnn trained 1 epoch with
    that kind's objective, saved and reloaded as the CLI does; built on first use."""
    return Bench(small_digits, tmp_path_factory.mktemp("bases")).base


@pytest.fixture(scope="module")
def base(trained_bases):
    """The standard-trained base model."""
    return trained_bases("st")


_REFERENCES: dict[tuple[str, str], ModuleSet] = {}


def _reference(name: str, base, data) -> ModuleSet:
    """A module set another approach reads, run once per base model."""
    key = (name, base[1]["weights_sha256"])
    if key not in _REFERENCES:
        _REFERENCES[key] = _run(name, base, data)
    return _REFERENCES[key]


def _run(name: str, base, data, **kwargs) -> ModuleSet:
    """Approach ``name`` with its contract hyperparameters on ``base``."""
    model, meta = base
    approach = get_approach(name)
    overrides = approach.contract_hyperparameters
    references = {reference: _reference(reference, base, data)
                  for reference in approach.references(approach.resolve(overrides))}
    return run_approach(name, model, meta, data, overrides, seed=0, references=references,
                        progress=False, **kwargs)


def test_a_missing_provenance_key_is_a_clear_error(base, small_digits, monkeypatch):
    model, meta = base
    random = get_approach("random_gradsplitter")
    produce = type(random).modularize

    def forgetful(self, *args, **kwargs):
        modules = produce(self, *args, **kwargs)
        del modules.provenance["seed"]
        return modules

    monkeypatch.setattr(type(random), "modularize", forgetful)
    with pytest.raises(DnnmodError, match=r"provenance lacks \['seed'\]"):
        run_approach("random_gradsplitter", model, meta, small_digits, {}, seed=0,
                     references={"gradsplitter": _reference("gradsplitter", base, small_digits)})


def test_a_module_file_without_provenance_keys_is_refused(base, small_digits, tmp_path):
    import json

    path = tmp_path / "modules.safetensors"
    _run("gradsplitter", base, small_digits).save(path)
    record = json.loads(path.with_suffix(".json").read_text())
    del record["provenance"]["wall_seconds"]
    path.with_suffix(".json").write_text(json.dumps(record))
    with pytest.raises(ArtifactError, match=r"provenance lacks \['wall_seconds'\]"):
        ModuleSet.load(path)
