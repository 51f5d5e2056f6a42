from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from dnnmod.errors import ArtifactError
from dnnmod.models import ARCHITECTURES, build_model
from dnnmod.modules.extract import (
    FusedModules,
    count_flops,
    count_parameters,
    extract_module,
    pad_and_extract,
)
from dnnmod.modules.masking import masked_logits
from dnnmod.modules.structure import ModelStructure, trace_structure


def randomise_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BatchNorm statistics and affine parameters, so a norm's shift is far from zero
    and a leak of dropped channels through it would show."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.normal_(0.0, 0.5, generator=generator)
                module.running_var.uniform_(0.5, 2.0, generator=generator)
                module.weight.normal_(1.0, 0.3, generator=generator)
                module.bias.normal_(0.0, 0.5, generator=generator)
    return model.eval()


def random_keep(structure: ModelStructure, seed: int) -> dict[str, torch.Tensor]:
    """Per group, each channel kept with a probability drawn from [0.3, 0.7]; never empty."""
    generator = torch.Generator().manual_seed(seed)
    keep = {}
    for group in structure.groups:
        rate = torch.empty(1).uniform_(0.3, 0.7, generator=generator)
        kept = torch.rand(group.size, generator=generator) < rate
        kept[torch.randint(group.size, (1,), generator=generator)] = True
        keep[group.name] = kept
    return keep


def masked_outputs(model, structure, keeps, x) -> torch.Tensor:
    """(len(keeps), batch, N): each module's outputs as the masked base model."""
    masks = {group.name: torch.stack([keep[group.name] for keep in keeps]).float()
             for group in structure.groups}
    with torch.no_grad():
        return masked_logits(model, structure, masks, x)


def assert_close_to(actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = expected.abs().max().item()
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max().item() <= 1e-4 * max(scale, 1e-3)


def zoo_model(arch: str, **options) -> nn.Module:
    torch.manual_seed(0)
    return randomise_norms(build_model(arch, 10, 0.25, **options))


MODELS = {
    **{arch: (lambda arch=arch: zoo_model(arch)) for arch in ARCHITECTURES},
    "resnet20_no_bn": lambda: zoo_model("resnet20", batch_norm=False),
    "torchvision_resnet18": lambda: randomise_norms(torchvision.models.resnet18(num_classes=10)),
    "torchvision_mobilenet_v2": lambda: randomise_norms(
        torchvision.models.mobilenet_v2(num_classes=10)),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_extracted_module_equals_masked_model(name):
    model = MODELS[name]()
    structure = trace_structure(model)
    keep = random_keep(structure, seed=1)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    module = extract_module(model, structure, keep)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert_close_to(module(x), masked_outputs(model, structure, [keep], x)[0])
    assert not module.training
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[key], after[key]) for key in before)
    assert count_parameters(module) < count_parameters(model)
    assert count_flops(module, structure.input_shape) < count_flops(model, structure.input_shape)


@pytest.mark.parametrize("arch", ["simcnn", "incecnn", "resnet20", "mobilenet"])
def test_fused_modules_equal_masked_modules(arch):
    model = zoo_model(arch)
    structure = trace_structure(model)
    keeps = [random_keep(structure, seed) for seed in range(10)]
    x = torch.randn(2, 3, 32, 32)
    expected = masked_outputs(model, structure, keeps, x)
    modules = pad_and_extract(model, structure, keeps)
    shapes = {tuple((k, tuple(v.shape)) for k, v in m.state_dict().items()) for m in modules}
    assert len(shapes) == 1
    fused = FusedModules(modules)
    with torch.no_grad():
        assert_close_to(fused(x), expected)
        for index, module in enumerate(modules):
            assert_close_to(module(x), expected[index])
    subset = [2, 5, 7]
    fused_subset = FusedModules(pad_and_extract(model, structure, [keeps[i] for i in subset]))
    with torch.no_grad():
        assert_close_to(fused_subset(x), expected[subset])


def test_fused_modules_are_inference_only():
    model = zoo_model("simple_simcnn")
    structure = trace_structure(model)
    fused = FusedModules(pad_and_extract(model, structure, [random_keep(structure, 0)]))
    with pytest.raises(RuntimeError):
        fused.train()
    fused.eval()


def test_fused_modules_reject_different_shapes():
    model = zoo_model("simple_simcnn")
    structure = trace_structure(model)
    modules = [extract_module(model, structure, random_keep(structure, seed)) for seed in (0, 1)]
    with pytest.raises(ArtifactError):
        FusedModules(modules)


def test_keeping_everything_reproduces_the_base_model():
    model = zoo_model("rescnn")
    structure = trace_structure(model)
    keep = {group.name: torch.ones(group.size, dtype=torch.bool) for group in structure.groups}
    module = extract_module(model, structure, keep)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close_to(module(x), model(x))
    assert count_parameters(module) == count_parameters(model)


def test_empty_group_raises():
    model = zoo_model("simple_simcnn")
    structure = trace_structure(model)
    keep = random_keep(structure, 0)
    empty = structure.groups[1].name
    keep[empty] = torch.zeros_like(keep[empty])
    with pytest.raises(ArtifactError, match=empty):
        extract_module(model, structure, keep)


def test_wrong_keep_vectors_raise():
    model = zoo_model("simple_simcnn")
    structure = trace_structure(model)
    keep = random_keep(structure, 0)
    first = structure.groups[0].name
    with pytest.raises(ArtifactError):
        extract_module(model, structure, {**keep, first: torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ArtifactError):
        extract_module(model, structure, {**keep, "no.such.group": keep[first]})
    with pytest.raises(ArtifactError):
        extract_module(model, structure, {k: v for k, v in keep.items() if k != first})
