"""Composed models: modules of one or several module sets run as one network.

The modules of a module set are physically extracted, padded to a common shape and fused
(:class:`~dnnmod.modules.extract.FusedModules`), so one call runs all of them; the set's head
turns their logits into module scores, and a registered combination rule
(:mod:`dnnmod.modules.combination`) turns the scores into a prediction.

Two ways to build one:

- ``ComposedModel(model, modules, classes)``: modules of one module set (all, or those of a
  sub-task T), on normalised inputs as the base model takes them. Output positions follow T's
  order and predictions are base-model class indices.
- ``ComposedModel.from_parts(parts)``: a new task from parts, each the module of one class of
  one module set, drawn from different base models and datasets. Parts of one (model, module
  set) run fused; the scores of all parts are concatenated in part order, and the predicted
  class is the winning part's position. Models trained on different datasets normalise their
  inputs differently, so the composed model takes images in [0, 1]
  (:meth:`dnnmod.data.ImageSet.unit_batch`) and each part normalises them with its base
  model's mean/std, recorded in the module set as ``base["normalization"]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from dnnmod.errors import ArtifactError, ConfigError
from dnnmod.modules.combination import combine_scores, get_combination
from dnnmod.modules.extract import FusedModules, pad_and_extract
from dnnmod.modules.moduleset import ModuleSet


@dataclass(frozen=True)
class ComposedPart:
    """The module of ``modules`` that recognises base-model class ``class_index``, run on
    ``model``, the base model the module set was cut from."""

    model: nn.Module
    modules: ModuleSet
    class_index: int


class FusedModuleSet(nn.Module):
    """The modules of one module set, fused, with the set's head: (batch, M) scores. With
    ``normalization`` ({"mean": [...], "std": [...]}) it takes images in [0, 1] and normalises
    them as its base model was trained; without, it takes normalised images."""

    def __init__(self, model: nn.Module, modules: ModuleSet,
                 normalization: Mapping[str, Sequence[float]] | None = None) -> None:
        super().__init__()
        keeps = [modules.module_masks(position) for position in range(len(modules))]
        self.backbones = FusedModules(pad_and_extract(model.eval(), modules.structure, keeps))
        self.head = modules.head.eval()
        for key in ("mean", "std"):
            value = None if normalization is None else \
                torch.tensor(normalization[key], dtype=torch.float32).view(1, -1, 1, 1)
            self.register_buffer(key, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mean is not None:
            x = (x - self.mean) / self.std
        return self.head(self.backbones(x))


class ComposedModel(nn.Module):
    """``modules`` restricted to ``classes`` (base-model indices; default: all) fused into one
    network on ``model``'s weights. ``forward`` returns module scores, (batch, |classes|), and
    ``predict`` base-model class indices by the module set's combination rule.

    :meth:`from_parts` composes modules of several module sets and base models instead.
    """

    def __init__(self, model: nn.Module, modules: ModuleSet,
                 classes: Sequence[int] | None = None) -> None:
        super().__init__()
        chosen = modules.subset(classes) if classes is not None else modules
        self._assemble([FusedModuleSet(model, chosen)], range(len(chosen)), chosen.classes,
                       chosen.combination)

    @classmethod
    def from_parts(cls, parts: Sequence[ComposedPart],
                   combination: str = "argmax") -> ComposedModel:
        """A classifier over ``len(parts)`` classes, class i being ``parts[i]``'s.

        It takes images in [0, 1]; each part normalises them with its base model's
        ``normalization``. Parts with the same model and module-set objects run fused in one
        network. ``forward`` returns the parts' scores in part order, ``predict`` the part
        positions chosen by the combination rule ``combination``.
        """
        if not parts:
            raise ConfigError("a composed model needs at least one part")
        get_combination(combination)
        shapes = {tuple(part.modules.structure.input_shape[1:]) for part in parts}
        if len(shapes) > 1:
            raise ArtifactError(f"composed parts take inputs of different shapes {sorted(shapes)}")
        by_module_set: dict[tuple[int, int], list[int]] = {}
        for position, part in enumerate(parts):
            by_module_set.setdefault((id(part.model), id(part.modules)), []).append(position)
        groups = []
        for positions in by_module_set.values():
            first = parts[positions[0]]
            chosen = first.modules.subset([parts[p].class_index for p in positions])
            groups.append(FusedModuleSet(first.model, chosen, normalization_of(first.modules)))
        # The constructor composes one module set; this is the general case it specialises.
        composed = cls.__new__(cls)
        nn.Module.__init__(composed)
        composed._assemble(groups, [p for positions in by_module_set.values() for p in positions],
                           range(len(parts)), combination)
        return composed

    def _assemble(self, groups: Sequence[FusedModuleSet], positions: Sequence[int],
                  classes: Sequence[int], combination: str) -> None:
        """``groups``' scores, concatenated, hold the scores of ``positions`` in that order."""
        self.groups = nn.ModuleList(groups)
        self.register_buffer("order", torch.argsort(torch.tensor(list(positions))))
        self.register_buffer("classes", torch.tensor(list(classes)))
        self.combination = combination

    def train(self, mode: bool = True) -> ComposedModel:
        if mode:
            raise RuntimeError("a composed model runs in eval mode only")
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([group(x) for group in self.groups], dim=1)[:, self.order]

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted classes: base-model class indices, or part positions (from_parts)."""
        return combine_scores(self.combination, self(x), self.classes)


def normalization_of(modules: ModuleSet) -> Mapping[str, Sequence[float]]:
    normalization = modules.base.get("normalization")
    if not normalization or not {"mean", "std"} <= set(normalization):
        raise ArtifactError(
            f"the {modules.approach} modules of {modules.base.get('arch')} on "
            f"{modules.base.get('dataset')} record no input normalisation of their base model "
            "(base['normalization'] = {'mean': [...], 'std': [...]}); composing parts of "
            "different models normalises each part's input with its own base model's "
            "statistics")
    return normalization
