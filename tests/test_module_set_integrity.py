"""A module set is one committed unit that fits its model; a malformed one is one line.

Field by field, a module set's JSON and tensors are corrupted; each corruption is refused on
loading with an ArtifactError naming the field, and at the command line with one
``dnnmod: error:`` line and exit status 2. A pair torn by a kill between its two files, or
mixed from two runs, is refused; concurrent writers leave one whole set; a set whose structure
does not fit the given model is refused.
"""

from __future__ import annotations

import json
import multiprocessing
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

from dnnmod.artifacts import save_tensors, sha256_file
from dnnmod.cli import main
from dnnmod.errors import ArtifactError
from dnnmod.models import build_model
from dnnmod.modules import moduleset
from dnnmod.modules.heads import LogitMLPHead
from dnnmod.modules.moduleset import FORMAT_V2, ModuleSet, base_identity
from dnnmod.modules.structure import trace_structure
from dnnmod.training.model_io import load_model, save_model

CLASSES = list(range(10))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """An untrained simcnn saved as a digits model, and its structure."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("base") / "model.safetensors"
    save_model(path, build_model("simcnn", 10, width=0.0625).eval(), {
        "arch": "simcnn", "num_classes": 10, "width": 0.0625, "options": {},
        "dataset": "digits", "seed": 0, "training": "st", "objective": {},
        "input_shape": [3, 32, 32], "normalization": {"mean": [0.5] * 3, "std": [0.25] * 3}})
    model, meta = load_model(path)
    return path, model, meta, trace_structure(model)


def make_set(base, seed: int) -> ModuleSet:
    """Ten modules with seeded random channel masks and a logit-MLP head (head tensors)."""
    _, _, meta, structure = base
    generator = torch.Generator().manual_seed(seed)
    masks = {group.name: torch.rand(10, group.size, generator=generator) < 0.6
             for group in structure.groups}
    for mask in masks.values():
        mask[:, 0] = True  # no module keeps nothing
    torch.manual_seed(seed)
    return ModuleSet(approach="test", classes=CLASSES, masks=masks,
                     head=LogitMLPHead(CLASSES, 10, hidden=4), combination="argmax",
                     base=base_identity(meta), structure=structure,
                     provenance={"approach": "test", "hyperparameters": {}, "seed": seed,
                                 "wall_seconds": 0.0})


def same_set(a: ModuleSet, b: ModuleSet) -> bool:
    return (a.provenance == b.provenance and a.masks.keys() == b.masks.keys()
            and all(torch.equal(a.masks[k], b.masks[k]) for k in a.masks)
            and all(torch.equal(x, y) for x, y in zip(a.head.state_dict().values(),
                                                      b.head.state_dict().values(),
                                                      strict=True)))


@pytest.fixture
def saved(base, tmp_path):
    path = tmp_path / "modules.safetensors"
    make_set(base, 0).save(path)
    return path


def _rewrite_json(path, change) -> None:
    written = json.loads(path.with_suffix(".json").read_text())
    change(written)
    path.with_suffix(".json").write_text(json.dumps(written))


def _rewrite_tensors(path, change) -> None:
    """Change the tensors and commit them in the JSON, as a consistent but malformed pair."""
    tensors = load_file(str(path))
    change(tensors)
    digest = save_tensors(path, tensors)
    _rewrite_json(path, lambda written: written.update(tensors_sha256=digest))


def _first_group(written) -> str:
    return next(iter(written["masks"]))


def _set(dotted: str, value):
    """A JSON change: ``dotted`` (``a.b``; ``masks.<first>``, ``groups.0`` index lists) = value;
    ``value`` DELETE removes the key."""
    def change(written):
        *parents, last = dotted.split(".")
        holder = written
        for part in parents:
            part = _first_group(written) if part == "<first>" else part
            holder = holder[int(part)] if isinstance(holder, list) else holder[part]
        last = _first_group(written) if last == "<first>" else last
        if isinstance(holder, list):
            holder[int(last)] = value
        elif value is DELETE:
            del holder[last]
        else:
            holder[last] = value
    return change


DELETE = object()

#: JSON field → (change, what the one-line error says)
BAD_JSON = {
    "mask shape with a string": (_set("masks.<first>", [10, "x"]), r"masks.*'x' is not of type"),
    "mask shape with a null": (_set("masks.<first>", [10, None]), r"None is not of type"),
    "mask shape of one number": (_set("masks.<first>", [10]), r"masks.*too short"),
    "masks not a mapping": (_set("masks", [1, 2]), r"key 'masks'.*not of type 'object'"),
    "group size in words": (_set("structure.groups.0.size", "eight"),
                            r"structure.groups\[0\].size.*'eight' is not of type 'integer'"),
    "group size zero": (_set("structure.groups.0.size", 0), r"size.*less than the minimum"),
    "group kind unknown": (_set("structure.groups.0.kind", "attention"), r"unknown kind"),
    "group convs not names": (_set("structure.groups.0.convs", [1]), r"convs\[0\]"),
    "group without a name": (_set("structure.groups.0.name", DELETE),
                             r"lacks key 'structure.groups\[0\].name'"),
    "unknown head option": (_set("head.options", {"hiden": 4}), r"unknown keys \['hiden'\]"),
    "head option of another type": (_set("head.options", {"hidden": "4"}),
                                    r"hidden: expected int"),
    "unknown head kind": (_set("head.kind", "attention"), r"unknown module head kind"),
    "unknown combination": (_set("combination", "vote"), r"vote"),
    "class as a string": (_set("classes", ["cat"] + CLASSES[1:]), r"classes\[0\]"),
    "class beyond the model": (_set("classes", CLASSES[:9] + [12]), r"classes \[12\] are beyond"),
    "class twice": (_set("classes", [0] + CLASSES[:9]), r"name a class twice"),
    "num_classes as a string": (_set("base.num_classes", "ten"), r"base.num_classes"),
    "provenance not a mapping": (_set("provenance", "today"), r"key 'provenance'"),
    "provenance without a seed": (_set("provenance.seed", DELETE), r"provenance lacks \['seed'\]"),
    "unknown format": (_set("format", "dnnmod.modules/9"), r"not a dnnmod module set"),
    "hash not a hash": (_set("tensors_sha256", "abc"), r"tensors_sha256.*does not match"),
    "input shape with a string": (_set("structure.input_shape", [1, "3"]), r"input_shape\[1\]"),
}


@pytest.mark.parametrize("case", sorted(BAD_JSON))
def test_a_malformed_json_field_is_named(saved, case):
    change, message = BAD_JSON[case]
    _rewrite_json(saved, change)
    with pytest.raises(ArtifactError, match=message) as raised:
        ModuleSet.load(saved)
    assert "\n" not in str(raised.value)


def _drop_first_mask(tensors):
    del tensors[next(key for key in tensors if key.startswith("mask/"))]


def _retype_first_mask(tensors):
    key = next(key for key in tensors if key.startswith("mask/"))
    tensors[key] = tensors[key].float()


def _cut_first_mask(tensors):
    key = next(key for key in tensors if key.startswith("mask/"))
    tensors[key] = tensors[key][:, :-1]


#: tensors file field → (change, what the one-line error says)
BAD_TENSORS = {
    "a mask missing": (_drop_first_mask, r"mask tensors do not match.*missing"),
    "an unlisted mask": (lambda t: t.update({"mask/nowhere": t["head/b2"].to(torch.uint8)}),
                         r"unlisted \['nowhere'\]"),
    "a mask of floats": (_retype_first_mask, r"packed mask of group .* torch.float32"),
    "a mask cut short": (_cut_first_mask, r"packed mask of group"),
    "a head tensor resized": (lambda t: t.update({"head/w1": t["head/w1"][:, :, :3]}),
                              r"logit_mlp head tensors .* do not fit"),
    "a head tensor missing": (lambda t: t.pop("head/b1"), r"logit_mlp head tensors"),
}


@pytest.mark.parametrize("case", sorted(BAD_TENSORS))
def test_a_malformed_tensor_is_named(saved, case):
    change, message = BAD_TENSORS[case]
    _rewrite_tensors(saved, change)
    with pytest.raises(ArtifactError, match=message):
        ModuleSet.load(saved)


def test_a_file_that_is_not_safetensors_is_named(saved):
    saved.write_bytes(b"\x00" * 100)
    _rewrite_json(saved, lambda written: written.update(tensors_sha256=sha256_file(saved)))
    with pytest.raises(ArtifactError, match="not a readable safetensors file"):
        ModuleSet.load(saved)


def _evaluate(base, modules, data_root, out):
    return ["evaluate-modules", "--modules", str(modules), "--model", str(base[0]),
            "--data-root", str(data_root), "--out", str(out)]


@pytest.mark.parametrize("case", ["mask shape with a string", "mask shape with a null",
                                  "group size in words", "unknown head option",
                                  "class beyond the model"])
def test_the_command_line_shows_one_line_and_exits_2(base, saved, case, data_root, capsys):
    change, message = BAD_JSON[case]
    _rewrite_json(saved, change)
    out = saved.with_name("metrics.json")
    assert main(_evaluate(base, saved, data_root, out)) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("dnnmod: error:")]
    assert len(errors) == 1 and re.search(message, errors[0]), err
    assert "Traceback" not in err and not out.exists()


def _resize_first_group(written, size: int) -> str:
    """The JSON's first group and its mask resized to ``size`` channels (the issue's 7-of-8)."""
    group = written["structure"]["groups"][0]
    group["size"], group["shape"] = size, [size, *group["shape"][1:]]
    written["masks"][group["name"]] = [10, size]
    return group["name"]


def test_a_structure_that_does_not_fit_the_model_is_refused(base, saved, data_root, capsys):
    _, model, meta, structure = base
    size = structure.groups[0].size
    tensors = load_file(str(saved))
    name = structure.groups[0].name
    tensors[f"mask/{name}"] = moduleset.pack_mask(torch.ones(10, size - 1, dtype=torch.bool))
    digest = save_tensors(saved, tensors)

    def resize(written):
        _resize_first_group(written, size - 1)
        written["tensors_sha256"] = digest
    _rewrite_json(saved, resize)
    ModuleSet.load(saved, base=meta)  # the set is whole and consistent in itself
    with pytest.raises(ArtifactError, match=rf"does not fit the given model: group {name}: "
                                            rf"layer .* has {size} outputs, the module set "
                                            rf"{size - 1}"):
        ModuleSet.load(saved, base=meta, model=model)
    out = saved.with_name("metrics.json")
    assert main(_evaluate(base, saved, data_root, out)) == 2
    assert "does not fit the given model" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("layer_key, message", [
    ("norms", r"norm 'nowhere' is absent"), ("convs", r"layer 'nowhere' is absent"),
    ("output_layer", r"output layer 'nowhere' is absent")])
def test_a_layer_the_model_lacks_is_refused(base, saved, layer_key, message):
    _, model, meta, _ = base

    def rename(written):
        structure = written["structure"]
        if layer_key == "output_layer":
            structure["output_layer"] = "nowhere"
        else:
            group = next(g for g in structure["groups"] if g[layer_key])
            group[layer_key][0] = "nowhere"
    _rewrite_json(saved, rename)
    with pytest.raises(ArtifactError, match=message):
        ModuleSet.load(saved, base=meta, model=model)


def test_a_pair_torn_between_its_two_files_is_refused(base, saved, monkeypatch):
    def killed(*_args, **_kwargs):  # the job dies after the tensors' rename, before the JSON's
        raise KeyboardInterrupt
    monkeypatch.setattr(moduleset, "write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        make_set(base, 1).save(saved)
    monkeypatch.undo()
    with pytest.raises(ArtifactError, match=r"a torn or mixed module set.*write it again"):
        ModuleSet.load(saved)


def test_a_pair_mixed_from_two_runs_is_refused(base, saved, tmp_path):
    other = tmp_path / "other" / "modules.safetensors"
    make_set(base, 1).save(other)
    shutil.copy(other, saved)
    with pytest.raises(ArtifactError, match="a torn or mixed module set"):
        ModuleSet.load(saved)


def test_a_set_written_before_sets_named_their_tensors_hash_loads(base, saved):
    _rewrite_json(saved, lambda written: (written.update(format=FORMAT_V2),
                                          written.pop("tensors_sha256")))
    assert same_set(ModuleSet.load(saved, base=base[2], model=base[1]), make_set(base, 0))


def _write_repeatedly(base, seed, path, rounds, start):
    start.wait()
    module_set = make_set(base, seed)
    for _ in range(rounds):
        module_set.save(path)


def _read_repeatedly(path, rounds, start, failures):
    start.wait()
    for _ in range(rounds):
        try:
            ModuleSet.load(path)
        except ArtifactError as err:
            failures.put(str(err))


def test_concurrent_writers_leave_one_whole_set(base, tmp_path):
    path = tmp_path / "modules.safetensors"
    make_set(base, 9).save(path)
    context = multiprocessing.get_context("fork")
    start, failures = context.Barrier(4), context.Queue()
    workers = [context.Process(target=_write_repeatedly, args=(base, seed, path, 25, start))
               for seed in (0, 1, 2)]
    workers.append(context.Process(target=_read_repeatedly, args=(path, 25, start, failures)))
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    assert failures.empty(), failures.get()
    loaded = ModuleSet.load(path)
    assert any(same_set(loaded, make_set(base, seed)) for seed in (0, 1, 2))
    assert not list(tmp_path.glob(".*.tmp"))

