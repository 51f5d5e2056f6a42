"""The one batched inference path: a model, or M masked modules of it, over a set of images.

Every pass over an image set goes through :func:`batches`, which cuts the set into chunks that
fit a memory budget, and :func:`run`, which sends each chunk through the model (optionally as
M masked modules, optionally through the modules' head) and concatenates the outputs.
Masked passes repeat each image once per module, so they are chunked over images *and*
modules: P = 100 candidate masks on a full-width VGG16 never send 256·P images through one
pass. Gradients are off unless asked for.

Chunk sizes (measured with benchmarks/composed_inference.py on a 2-core CPU): a repeated batch
beyond about 320 images runs slower than one module at a time there (memory-bound), so a CPU
pass holds at most 320 repeated images (512 for a plain pass); a GPU takes 256 images per
module, as many modules at once as the activation memory budget allows. With a
:class:`~dnnmod.modules.masking.KeptChannelPass`, modules run one at a time as their
kept-channel sub-networks, in plain-pass chunks of images (:func:`kept_channel_pass` builds
it where it pays).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from dnnmod.modules.grouped_pass import GroupedKeptPass
from dnnmod.modules.masking import KeptChannelPass, check_masks, masked_logits
from dnnmod.modules.structure import ModelStructure, eval_mode, probe

log = logging.getLogger(__name__)

CPU_MASKED_IMAGES = 320
CPU_PLAIN_IMAGES = 512
CUDA_IMAGES_PER_MODULE = 256
#: activation memory one pass may use, by device type (bytes); CUDA: also <= half the free memory
MEMORY_BUDGET = {"cpu": 2 << 30, "cuda": 8 << 30}


@dataclass(frozen=True)
class PassPlan:
    """How many modules and images one pass takes."""

    modules: int
    images: int


def activation_bytes_per_image(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Bytes of activations one image keeps alive in an inference pass, estimated by a probe:
    three times the largest output of any layer (its input, its output and one skip tensor)."""
    largest = 0

    def record(_module, _inputs, output) -> None:
        nonlocal largest
        if isinstance(output, torch.Tensor):
            largest = max(largest, output[:1].numel() * output.element_size())

    leaves = [m for m in model.modules() if not list(m.children())]
    probe(model, input_shape, [leaf.register_forward_hook(record) for leaf in leaves])
    return 3 * largest


def plan_pass(model: nn.Module, input_shape: tuple[int, ...], modules: int | None,
              device: torch.device | str, budget: int | None = None) -> PassPlan:
    """Modules and images per pass for ``modules`` masked modules (None: a plain pass)."""
    device = torch.device(device)
    if budget is None:
        budget = MEMORY_BUDGET.get(device.type, MEMORY_BUDGET["cpu"])
        if device.type == "cuda":
            budget = min(budget, torch.cuda.mem_get_info(device)[0] // 2)
    per_image = max(1, activation_bytes_per_image(model, input_shape))
    fits = max(1, budget // per_image)  # repeated images the budget holds
    if modules is None:
        cap = CUDA_IMAGES_PER_MODULE if device.type == "cuda" else CPU_PLAIN_IMAGES
        return PassPlan(1, max(1, min(cap, fits)))
    if device.type == "cuda":
        images = min(CUDA_IMAGES_PER_MODULE, fits)
        return PassPlan(max(1, min(modules, fits // images)), images)
    repeated = min(CPU_MASKED_IMAGES, fits)
    chunk = max(1, min(modules, repeated))
    return PassPlan(chunk, max(1, repeated // chunk))


def kept_channel_pass(model: nn.Module, structure: ModelStructure) -> KeptChannelPass | None:
    """The kept-channel pass over the conv groups on a CPU (None elsewhere, or where the
    model does not allow it). Module by module, it beats the batched masked pass there by
    about 1/r², by channels-last convs and by running no mask products: the repeated batch
    is memory-bound there (benchmarks/search_speed.py, cnnsplitter_generation.py). On CUDA
    a whole chunk of modules runs at once as grouped convs over their kept channels
    (:class:`~dnnmod.modules.grouped_pass.GroupedKeptPass`), which fills the device."""
    if next(model.parameters()).device.type != "cpu":
        return None
    kept_pass = KeptChannelPass.build(model, structure,
                                      [group.name for group in structure.conv_groups])
    if kept_pass is None:
        log.info("kept-channel pass unavailable for %s: batched masked pass",
                 type(model).__name__)
    return kept_pass


def batches(images, size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Normalised float images and labels of an ImageSet, ``size`` at a time, in order."""
    for start in range(0, len(images), size):
        index = torch.arange(start, min(start + size, len(images)), device=images.labels.device)
        yield images.float_batch(index)


def run(model: nn.Module, images, *, structure: ModelStructure | None = None,
        masks: Mapping[str, torch.Tensor] | None = None,
        head: Callable[[torch.Tensor], torch.Tensor] | None = None, grad: bool = False,
        budget: int | None = None,
        kept_pass: KeptChannelPass | GroupedKeptPass | None = None) -> torch.Tensor:
    """Outputs of ``model`` on every image of an ImageSet, in eval mode.

    Without ``masks``: the logits, (images, N). With ``masks`` (group name → (M, ...) tensor,
    see :func:`~dnnmod.modules.masking.masked`): every module's logits, (M, images, N), or
    with ``head`` (a :class:`~dnnmod.modules.heads.Head`, or its subset for a module chunk via
    ``head.subset``) the module scores, (images, M). With ``kept_pass`` (built for this model
    and structure), the modules run one at a time as their kept-channel sub-networks.
    """
    reference = next(model.parameters())
    input_shape = (1, *images.images.shape[1:])
    with eval_mode(model), torch.set_grad_enabled(grad):
        if masks is None:
            plan = plan_pass(model, input_shape, None, reference.device, budget)
            return torch.cat([model(x).float() for x, _ in batches(images, plan.images)])
        if structure is None:
            raise ValueError("a masked pass needs the model's structure")
        modules = check_masks(structure, masks)
        if isinstance(kept_pass, KeptChannelPass):  # one module at a time: plain batches
            plan = plan_pass(model, input_shape, None, reference.device, budget)
            masks = {name: mask.to(reference.device) for name, mask in masks.items()}
            # Modules with the same masks have the same logits (in GradSplitter's first phase
            # every module is the whole model): each distinct one runs once.
            distinct, copies = torch.unique(
                torch.cat([mask.reshape(modules, -1) for mask in masks.values()], dim=1),
                dim=0, return_inverse=True)
            firsts = [int((copies == row).nonzero()[0]) for row in range(len(distinct))]
            # Module-outer, so that the pass keeps one module's sliced weights at a time
            # however many modules there are (P candidates of a population, say).
            logits = torch.cat([
                torch.cat([kept_pass.logits({name: mask[module:module + 1]
                                             for name, mask in masks.items()}, x).float()
                           for x, _ in batches(images, plan.images)], dim=1)
                for module in firsts])[copies]
            return head(logits) if head is not None else logits
        plan = plan_pass(model, input_shape, modules, reference.device, budget)
        chunk_modules = plan.modules
        if isinstance(kept_pass, GroupedKeptPass):
            # each module's gathered weights take at most the model's: a quarter of the budget
            weight_budget = (budget or MEMORY_BUDGET.get(reference.device.type,
                                                         MEMORY_BUDGET["cpu"])) // 4
            chunk_modules = max(1, min(chunk_modules,
                                       weight_budget // kept_pass.weight_bytes()))
        per_chunk = []
        for first in range(0, modules, chunk_modules):
            chunk = range(first, min(first + chunk_modules, modules))
            if isinstance(kept_pass, GroupedKeptPass):  # planned on the host, from CPU masks
                forward = kept_pass.prepare({name: mask[chunk.start:chunk.stop]
                                             for name, mask in masks.items()})
            else:
                chunk_masks = {name: mask[chunk.start:chunk.stop].to(reference.device)
                               for name, mask in masks.items()}
                forward = functools.partial(masked_logits, model, structure, chunk_masks)
            logits = torch.cat([forward(x).float() for x, _ in batches(images, plan.images)],
                               dim=1)
            if head is not None:
                chunk_head = head if len(chunk) == modules else head.subset(list(chunk))
                logits = chunk_head(logits)
            per_chunk.append(logits)
        return torch.cat(per_chunk, dim=1 if head is not None else 0)


def accuracy(model: nn.Module, images) -> float:
    """Top-1 accuracy (%) of ``model`` on an ImageSet."""
    return 100.0 * (run(model, images).argmax(1) == images.labels).float().mean().item()
