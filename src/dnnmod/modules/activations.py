"""Per-class statistics of a model's ReLU activations, computed one way for every approach.

CNNSplitter ranks kernels by ``l1``, Pan & Rajan switch off positions whose ``frequency`` is 0,
MwT and MODA keep units whose ``frequency`` reaches a threshold, and MODA trains on the
activations themselves (:func:`capture_activations`).

Definitions
    *site*: an ``nn.ReLU`` module the forward pass calls, named by its dotted module name. It
    carries the channels of one channel group (conv, or hidden Linear) of
    :mod:`dnnmod.modules.structure`: the group of the most recent grouped layer before it whose
    output has the ReLU's channel count and layout (so the ReLU after a residual addition
    carries the group of the coupled convs). Several sites may carry one group (the
    post-addition ReLUs of a residual stage). Functional ``F.relu`` calls are not sites.

    Statistics are per class (over the images with that label) and per channel of a conv site
    or unit of a Linear site; with ``positions=True``, per (channel, h, w) position of a conv
    site (Pan & Rajan's masks). For an activation ``a`` (post-ReLU, so ``a >= 0``):

    *frequency*: the fraction of the images on which ``a > 0``. Per channel, a conv channel
    counts as active on an image when its spatial mean is > 0, which for non-negative maps
    means: active at any position.

    *mean*: the mean of ``a`` over the images; per channel, of the channel's spatial mean.

    *l1*: the mean over the images of the L1 norm of the channel's map, ``sum_hw |a|``
    (CNNSplitter's kernel importance); always per channel, also with ``positions=True``. Not
    normalised by the number of positions: the importance ranks the kernels of one layer, which
    all have the same positions, so normalising would change no ranking, and the normalised
    value is ``mean`` (``|a| = a``). For a Linear unit, ``l1`` equals ``mean``.

    *reduce* (:meth:`ActivationStatistics.group_view`): how the sites of one group become one
    value per channel: "union" (max over the sites: a channel is as active as at its most active
    site; MwT's residual handling), "intersection" (min: as active as at its least active site;
    MODA's), "first" (the group's first site in forward order) or "mean". MODA's skip-handling
    parameter is exactly this choice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from dnnmod.errors import ConfigError
from dnnmod.modules.inference import batches, plan_pass
from dnnmod.modules.structure import ModelStructure, eval_mode, probe

if TYPE_CHECKING:
    from dnnmod.data.dataset import ImageSet

STATISTICS = ("frequency", "mean", "l1")
REDUCTIONS = ("union", "intersection", "first", "mean")
#: layers whose output channels a ReLU can carry
_PRODUCERS = (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm)


@dataclass(frozen=True, eq=False)
class ActivationStatistics:
    """Per-class activation statistics of every site; see the module docstring.

    Attributes:
        classes: the labels of the leading dimension, in order.
        counts: images per class, (K,) int64.
        sites: site → name of the channel group it carries, in forward order.
        positions: whether conv sites' ``frequency`` and ``mean`` are per position.
        frequency: site → (K, C) tensor, or (K, C, H, W) for a conv site with ``positions``.
        mean: site → tensor shaped as ``frequency``.
        l1: site → (K, C) tensor.

    Tensors are float64 on the CPU.
    """

    classes: tuple[int, ...]
    counts: torch.Tensor
    sites: dict[str, str]
    positions: bool
    frequency: dict[str, torch.Tensor]
    mean: dict[str, torch.Tensor]
    l1: dict[str, torch.Tensor]

    def group_view(self, statistic: str, reduce: str) -> dict[str, torch.Tensor]:
        """Group name → (K, ...) tensor of ``statistic``, its sites combined by ``reduce``.

        There is no default ``reduce``: how residual sites combine is the approach's choice
        (MwT: "union", MODA: "intersection"). Groups no site carries are absent.
        """
        if statistic not in STATISTICS:
            raise ConfigError(f"unknown activation statistic {statistic!r}; "
                              f"known: {', '.join(STATISTICS)}")
        if reduce not in REDUCTIONS:
            raise ConfigError(f"unknown reduction {reduce!r} of a group's activation sites; "
                              f"known: {', '.join(REDUCTIONS)}")
        per_site = getattr(self, statistic)
        sites_of: dict[str, list[str]] = {}
        for site, group in self.sites.items():
            sites_of.setdefault(group, []).append(site)
        view = {}
        for group, sites in sites_of.items():
            tensors = [per_site[site] for site in sites]
            if reduce == "first" or len(tensors) == 1:
                view[group] = tensors[0]
                continue
            shapes = {tuple(tensor.shape) for tensor in tensors}
            if len(shapes) != 1:
                raise ConfigError(
                    f"group {group!r}: its sites {sites} have {statistic} shapes "
                    f"{sorted(shapes)} (feature maps of different sizes); only reduce='first' "
                    f"applies to per-position statistics here")
            stacked = torch.stack(tensors)
            if reduce == "union":
                view[group] = stacked.amax(0)
            elif reduce == "intersection":
                view[group] = stacked.amin(0)
            else:
                view[group] = stacked.mean(0)
        return view


def activation_sites(model: nn.Module, structure: ModelStructure) -> dict[str, str]:
    """Every ReLU module ``model``'s forward pass calls → the channel group it carries.

    One forward pass of a zero input of ``structure.input_shape`` records the call order of
    the ReLUs and of the layers that produce channels (convs, norms, Linears). A ReLU carries
    the group of the most recent producer before it whose output has as many channels and
    dimensions as the ReLU's input, provided that producer belongs to a group; otherwise (e.g.
    a ReLU on the logits, or on a Linear that is in no group) the ReLU is left out. Matching
    the layout as well keeps a hidden-Linear ReLU from taking a conv group of the same width.
    Order: forward order. Parameters and training modes are left as they were.
    """
    model_name = type(model).__name__
    modules = dict(model.named_modules())
    group_of_layer: dict[nn.Module, str] = {}
    for group in structure.groups:
        for layer in (*group.convs, *group.norms):
            if layer not in modules:
                raise ConfigError(f"{model_name} has no layer {layer!r} of channel group "
                                  f"{group.name!r}: the structure describes another model")
            group_of_layer[modules[layer]] = group.name
    names = {module: name for name, module in modules.items()}

    # (module, channels, dimensions) of every producer and ReLU call, in call order
    calls: list[tuple[nn.Module, int, int]] = []

    def record(module: nn.Module, _inputs, output) -> None:
        calls.append((module, output.shape[1], output.dim()))

    probe(model, structure.input_shape, [module.register_forward_hook(record)
                                         for module in model.modules()
                                         if isinstance(module, (nn.ReLU, *_PRODUCERS))])

    relu_calls = [index for index, (module, _, _) in enumerate(calls)
                  if isinstance(module, nn.ReLU)]
    if not relu_calls:
        raise ConfigError(f"{model_name}: the forward pass calls no nn.ReLU module; activation "
                          f"statistics need nn.ReLU modules (functional F.relu calls and other "
                          f"activations, e.g. nn.ReLU6, are not sites)")
    sites: dict[str, str] = {}
    for index in relu_calls:
        relu, channels, dimensions = calls[index]
        if names[relu] in sites:
            raise ConfigError(f"{model_name}: nn.ReLU {names[relu]!r} is called more than once "
                              f"per forward pass; activation statistics need one module per "
                              f"activation")
        producer = next((module for module, out_channels, out_dimensions in reversed(calls[:index])
                         if isinstance(module, _PRODUCERS) and out_channels == channels
                         and out_dimensions == dimensions), None)
        if producer in group_of_layer:
            sites[names[relu]] = group_of_layer[producer]
    if not sites:
        raise ConfigError(f"{model_name}: none of its nn.ReLU modules carries the channels of a "
                          f"channel group, so it has no activation sites")
    return sites


@contextmanager
def capture_activations(model: nn.Module, sites: Iterable[str]
                        ) -> Iterator[dict[str, torch.Tensor]]:
    """A dict site → the site's output in the latest forward pass, while the context is open.

    The outputs are the tensors themselves, with their autograd graph (MODA's losses backpropagate
    through them), not copies.
    """
    captured: dict[str, torch.Tensor] = {}
    with _site_hooks(model, sites, captured.__setitem__):
        yield captured


def activation_statistics(model: nn.Module, structure: ModelStructure, images: ImageSet, *,
                          classes: Sequence[int] | None = None, positions: bool = False,
                          sites: dict[str, str] | None = None, budget: int | None = None
                          ) -> ActivationStatistics:
    """Per-class ``frequency``, ``mean`` and ``l1`` of every site over an ImageSet.

    Args:
        model: the network; it runs in eval mode without gradients, and its modes are
            restored afterwards.
        structure: its channel groups (used to find the sites when ``sites`` is None).
        images: an ImageSet; pass ``images.subset(...)`` or ``images.take(...)`` for a part.
        classes: labels to compute statistics for, in the order of the leading dimension;
            default every label present, ascending. Images of other labels are not run.
        positions: per (channel, h, w) position for conv sites instead of per channel.
        sites: site → group, e.g. a selection of :func:`activation_sites`' result.
        budget: activation memory one pass may use, in bytes (see
            :func:`~dnnmod.modules.inference.plan_pass`); default by device.

    The images go through the model in chunks planned by the inference module; each site's
    output is reduced in a forward hook as soon as it exists and summed per class in float64,
    so memory is bounded by one chunk and no activation outlives its layer's call.
    """
    model_name = type(model).__name__
    if len(images) == 0:
        raise ConfigError(f"{model_name}: activation statistics of an empty image set")
    if sites is None:
        sites = activation_sites(model, structure)
    present = torch.unique(images.labels).tolist()
    if classes is None:
        classes = present
    else:
        classes = [int(label) for label in classes]
        absent = [label for label in classes if label not in present]
        if absent or len(set(classes)) != len(classes):
            raise ConfigError(f"activation statistics of classes {classes}: need distinct labels "
                              f"that have images; labels present: {present}")
        images = images.subset(classes, relabel=False)

    reference = next(model.parameters())
    device = reference.device
    class_index = torch.full((images.num_classes,), -1, dtype=torch.long, device=device)
    class_index[torch.tensor(classes, device=device)] = torch.arange(len(classes), device=device)
    counts = torch.bincount(class_index[images.labels.to(device)], minlength=len(classes))

    sums: dict[tuple[str, str], torch.Tensor] = {}

    def add(statistic: str, site: str, per_image: torch.Tensor) -> None:
        # Per-class sums as one float64 product with the chunk's one-hot class matrix: on a CPU,
        # index_add_ (a scatter) took as long as the forward pass itself (VGG16, 512 images).
        by_class = chunk_one_hot @ per_image.reshape(len(per_image), -1).double()
        by_class = by_class.view(len(classes), *per_image.shape[1:])
        if (statistic, site) in sums:
            sums[statistic, site] += by_class
        else:
            sums[statistic, site] = by_class

    def accumulate(site: str, activation: torch.Tensor) -> None:
        # Sites are ReLU outputs, so |a| = a: the L1 norm is a plain sum, without an abs() copy.
        if activation.dim() != 4:
            add("frequency", site, activation > 0)
            add("mean", site, activation)
            add("l1", site, activation)
            return
        l1 = activation.sum((2, 3))
        add("l1", site, l1)
        if positions:
            add("frequency", site, activation > 0)
            add("mean", site, activation)
        else:
            # max > 0 is "spatial mean > 0" for a >= 0, with no tiny mean rounding to 0
            add("frequency", site, activation.amax((2, 3)) > 0)
            add("mean", site, l1 / (activation.shape[2] * activation.shape[3]))

    # Planned inside the eval-mode context: the planning probe's own mode restoring would
    # otherwise set every submodule to the model's mode.
    with eval_mode(model), torch.no_grad():
        plan = plan_pass(model, (1, *images.images.shape[1:]), None, device, budget)
        # Per-position sums cast one site's output to float64 (twice its size, plus a mask),
        # about as much again as the three activations per image the plan counts: halve it.
        images_per_pass = max(1, plan.images // 2) if positions else plan.images
        with _site_hooks(model, sites, accumulate):
            for x, labels in batches(images, images_per_pass):
                chunk_one_hot = nn.functional.one_hot(  # read by add() in the hooks
                    class_index[labels.to(device)], len(classes)).T.double()
                model(x.to(device=device, dtype=reference.dtype))

    never_called = [site for site in sites if ("l1", site) not in sums]
    if never_called:
        raise ConfigError(f"{model_name}: activation sites {never_called} are not called by "
                          f"the forward pass")

    def per_class(statistic: str) -> dict[str, torch.Tensor]:
        result = {}
        for site in sites:
            total = sums[statistic, site]
            result[site] = (total / counts.view(-1, *[1] * (total.dim() - 1))).cpu()
        return result

    return ActivationStatistics(
        classes=tuple(classes), counts=counts.cpu(), sites=dict(sites), positions=positions,
        frequency=per_class("frequency"), mean=per_class("mean"), l1=per_class("l1"))


@contextmanager
def _site_hooks(model: nn.Module, sites: Iterable[str],
                on_output: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """Calls ``on_output(site, output)`` after each named site module runs."""
    modules = dict(model.named_modules())
    sites = list(sites)
    unknown = [site for site in sites if site not in modules]
    if unknown:
        raise ConfigError(f"{type(model).__name__} has no modules {unknown} to hook as "
                          f"activation sites")

    def hook_for(site: str):
        return lambda _module, _inputs, output: on_output(site, output)

    handles = [modules[site].register_forward_hook(hook_for(site)) for site in sites]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
