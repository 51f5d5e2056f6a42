"""The approach contract, checked for every registered approach on a tiny model."""

from __future__ import annotations

import pytest
import torch
from conftest import Interrupted

import dnnmod.resumable
from dnnmod.approaches import APPROACHES, get_approach, run_approach
from dnnmod.approaches.base import Approach
from dnnmod.errors import ArtifactError, ConfigError, DnnmodError
from dnnmod.models import build_model
from dnnmod.modules.moduleset import REQUIRED_PROVENANCE, ModuleSet
from dnnmod.training.model_io import load_model, save_model
from dnnmod.training.objectives import get_objective
from dnnmod.training.train import Recipe, train

#: hyperparameters small enough for a test; every registered approach needs an entry
SMOKE = {
    "cnnsplitter": {"population": 4, "generations": 2, "parents": 2, "elites": 1,
                    "survivors": [4, 6], "fitness_samples": 40},
    "gradsplitter": {"init_head_epochs": 1, "rounds": 1, "mask_epochs": 1, "head_epochs": 1,
                     "mask_lr": 0.1, "batch_size": 32, "max_train_samples": 96},
    "mwt": {"metric_samples": 8},
    "moda": {},
    "pan_rajan": {},
}
SMOKE |= {f"random_{name}": {} for name in list(SMOKE)}  # the controls have no settings


@pytest.fixture(scope="module")
def trained_bases(small_digits, tmp_path_factory):
    """Training kind → a tiny simcnn trained 1 epoch with that kind's objective and its real
    metadata, saved and reloaded as the CLI does; built on first use."""
    bases = {}

    def base_of(kind: str):
        if kind not in bases:
            torch.manual_seed(0)
            model = build_model("simcnn", small_digits.num_classes, width=0.0625)
            objective = get_objective(kind)
            result = train(model, small_digits, Recipe(epochs=1, batch_size=64, lr=0.05),
                           seed=0, objective=objective)
            path = tmp_path_factory.mktemp(f"base_{kind}") / "model.safetensors"
            save_model(path, result.model, _meta(small_digits, objective))
            bases[kind] = load_model(path)
        return bases[kind]
    return base_of


@pytest.fixture(scope="module")
def base(trained_bases):
    """The standard-trained base model."""
    return trained_bases("st")


def _meta(data, objective=None) -> dict:
    objective = objective or get_objective("st")
    return {"arch": "simcnn", "model": "simcnn", "dataset": "digits",
            "num_classes": data.num_classes, "width": 0.0625, "options": {},
            "training": objective.name, "objective": objective.hyperparameters,
            "normalization": {"mean": data.train.mean.tolist(),
                                               "std": data.train.std.tolist()},
            "seed": 0, "input_shape": list(data.test.images.shape[1:]),
            "metrics": {"test_accuracy": 0.0}, "wall_seconds": 0.0}


_REFERENCES: dict[tuple[str, str], ModuleSet] = {}


def _reference(name: str, base, data) -> ModuleSet:
    """A module set another approach reads, run once per base model."""
    key = (name, base[1]["weights_sha256"])
    if key not in _REFERENCES:
        _REFERENCES[key] = _run(name, base, data)
    return _REFERENCES[key]


def _run(name: str, base, data, **kwargs) -> ModuleSet:
    model, meta = base
    approach = get_approach(name)
    references = {reference: _reference(reference, base, data)
                  for reference in approach.references(approach.resolve(SMOKE[name]))}
    return run_approach(name, model, meta, data, SMOKE[name], seed=0, references=references,
                        progress=False, **kwargs)


def _same(a: ModuleSet, b: ModuleSet) -> bool:
    return (a.classes == b.classes and set(a.masks) == set(b.masks)
            and all(torch.equal(a.masks[n], b.masks[n]) for n in a.masks)
            and all(torch.equal(t, b.head.state_dict()[n])
                    for n, t in a.head.state_dict().items()))


def test_every_approach_has_smoke_hyperparameters():
    assert set(SMOKE) == set(APPROACHES)
    assert all(isinstance(approach, Approach) for approach in APPROACHES.values())


@pytest.mark.parametrize("name", sorted(APPROACHES))
def test_defaults_resolve_and_bad_values_fail(name):
    approach = get_approach(name)
    assert approach.resolve({}) == dict(approach.defaults)
    assert set(approach.resolve(SMOKE[name])) == set(approach.defaults)
    with pytest.raises(ConfigError, match=rf"approaches\.{name}: unknown keys \['nope'\]"):
        approach.resolve({"nope": 1})
    if not approach.defaults:  # a random control has no settings to get wrong
        return
    key, default = next((k, v) for k, v in approach.defaults.items() if v is not None)
    wrong = 1 if isinstance(default, str) else "1"
    with pytest.raises(ConfigError, match=rf"approaches\.{name}\.{key}: expected"):
        approach.resolve({key: wrong})


@pytest.mark.parametrize("name", sorted(APPROACHES))
def test_contract(name, trained_bases, small_digits, tmp_path, interrupt_after_epoch):
    approach = get_approach(name)
    base = trained_bases(approach.training_for(approach.resolve(SMOKE[name])))
    uninterrupted = _run(name, base, small_digits)

    # Provenance: the keys every module set records.
    assert set(REQUIRED_PROVENANCE) <= set(uninterrupted.provenance)
    assert uninterrupted.provenance["approach"] == name
    assert uninterrupted.base["weights_sha256"] == base[1]["weights_sha256"]

    # Resume: killed right after its first checkpoint, a rerun gives the same module set.
    checkpoint = tmp_path / "resume.pt"
    undo = interrupt_after_epoch(dnnmod.resumable, 0)
    try:
        interrupted = _run(name, base, small_digits, checkpoint=checkpoint)
    except Interrupted:
        assert checkpoint.is_file()
        undo.undo()
        interrupted = _run(name, base, small_digits, checkpoint=checkpoint)
    assert _same(interrupted, uninterrupted)

    # Save → load round trip.
    path = tmp_path / "modules.safetensors"
    uninterrupted.save(path)
    loaded = ModuleSet.load(path, base=base[1])
    assert _same(loaded, uninterrupted) and loaded.provenance == uninterrupted.provenance
    x, _ = small_digits.test.float_batch(torch.arange(16))
    assert torch.equal(loaded.scores(base[0], x), uninterrupted.scores(base[0], x))


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
