"""E3 with MODA's patching protocol (``protocol: moda``): module replacement through a trained
calibration layer (Ngo et al., ICSE 2026, "module replacement" experiment).

MODA's experiment, as its artifact runs it: a strong model (VGG16 or ResNet18) knows CIFAR-10
classes 0-4; a weak LeNet-5 is trained on classes 5-9 plus one *mixed class*, one of the strong
model's classes mixed into the weak model's task as its last label (10 % of the training images
of each of the six classes). The weak model's output of the mixed class is replaced by the
mixed class's module: the weak model's logits of the other classes and the module's output,
concatenated (mixed class last), feed a linear *calibration layer* (6 inputs -> 6 outputs, the
6x6 layer; weights N(0, 0.01), bias 0) trained with cross-entropy while the weak model and the
module stay frozen; the prediction is the argmax of its outputs. The layer trains on the weak
model's training images for 20 epochs (SGD, lr 0.05, momentum 0.9, Nesterov, cosine schedule,
batch 128, last epoch kept). MODA reports the mixed class's test accuracy (its recall) and the
mean accuracy of the other classes, weak vs replaced.

Here the mixed class is E3's target class (TC): a weak task is its ``others`` classes, then the
TC (:func:`dnnmod.reuse.patching.weak_task_spec`), so the TC is the weak model's last output,
where MODA puts it. Everything but the patch is shared with the min-max protocol: weak tasks,
the three weak types and their training (``train_weak_model``; MODA trains one LeNet-5 with
its own cosine run and modular loss and takes an early checkpoint, our weak types are E3's
rule so that both protocols patch the same weak models), the module's score
(:func:`dnnmod.reuse.patch_scores.module_output`, any approach's module set) and the metrics.
Decisions where the paper is silent, configurable in ``reuse.patching.calibration_layer``:

- the layer trains on the weak task's ``train`` split by default, as MODA's artifact does (the
  images the weak model was trained on); ``split: val`` calibrates on held-out images instead;
- the batch order of each epoch is drawn from the record's seed (as model training does), and
  the initial weights from the same seed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from dnnmod.errors import ConfigError
from dnnmod.hyperparameters import OneOf, Range, resolve
from dnnmod.reuse.patch_scores import compare_predictions, ranking_auc, strong_module_scores

CALIBRATION_SPLITS = ("train", "val")
#: the calibration layer's training (``reuse.patching.calibration_layer``): MODA's artifact
CALIBRATION_LAYER = {"epochs": 20, "lr": 0.05, "batch_size": 128, "split": "train"}
CALIBRATION_LAYER_RANGES = {"epochs": Range(1), "lr": Range(0, low_open=True),
                            "batch_size": Range(1), "split": OneOf(CALIBRATION_SPLITS)}
#: MODA's optimiser for the layer (fixed: the artifact's model-training loop)
MOMENTUM = 0.9
#: standard deviation of the layer's initial weights (MODA's; biases start at 0)
INIT_STD = 0.01


def resolve_calibration_layer(where: str,
                              settings: Mapping[str, Any] | None) -> dict[str, Any]:
    """:data:`CALIBRATION_LAYER` overridden by ``settings``; ConfigError naming a bad key or
    value under ``where``."""
    return resolve(where, CALIBRATION_LAYER, settings, CALIBRATION_LAYER_RANGES)


def calibration_inputs(weak_logits: torch.Tensor, module_scores: torch.Tensor,
                       tc_column: int) -> torch.Tensor:
    """The calibration layer's input per image: the weak model's logits without the TC column,
    then the module's score, (images, classes). With the TC as the weak task's last class, every
    class keeps its column."""
    if weak_logits.shape[0] != module_scores.shape[0]:
        raise ConfigError(f"calibration inputs: {weak_logits.shape[0]} weak-model outputs but "
                          f"{module_scores.shape[0]} module scores")
    keep = [column for column in range(weak_logits.shape[1]) if column != tc_column]
    return torch.cat([weak_logits[:, keep], module_scores[:, None].to(weak_logits)], dim=1)


class CalibrationLayer(nn.Linear):
    """MODA's calibration layer: Linear(classes -> classes), weights N(0, 0.01), bias 0."""

    def __init__(self, classes: int, generator: torch.Generator | None = None) -> None:
        super().__init__(classes, classes)
        with torch.no_grad():
            self.weight.normal_(0.0, INIT_STD, generator=generator)
            self.bias.zero_()


def train_calibration_layer(inputs: torch.Tensor, labels: torch.Tensor,
                            settings: Mapping[str, Any], seed: int
                            ) -> tuple[CalibrationLayer, list[dict[str, float]]]:
    """Train a calibration layer on ``inputs`` (:func:`calibration_inputs` of the calibration
    images, frozen) and their ``labels`` with cross-entropy: SGD with Nesterov momentum 0.9
    at ``lr``, cosine schedule over ``epochs``, ``batch_size`` images a step, last epoch kept.
    Returns the layer (eval mode) and each epoch's mean loss and training accuracy (%)."""
    from dnnmod.modules.heads import fit_linear_layer

    settings = resolve_calibration_layer("calibration_layer", settings)
    if inputs.dim() != 2 or len(inputs) != len(labels) or len(labels) == 0:
        raise ConfigError(f"calibration layer: {tuple(inputs.shape)} inputs for {len(labels)} "
                          "labels; it needs one row of class scores per labelled image")
    layer = CalibrationLayer(inputs.shape[1], torch.Generator().manual_seed(seed))
    layer = layer.to(inputs.device)
    optimizer = torch.optim.SGD(layer.parameters(), lr=settings["lr"], momentum=MOMENTUM,
                                nesterov=True)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings["epochs"])
    history = fit_linear_layer(layer, inputs.float(), labels, optimizer,
                               epochs=settings["epochs"], batch_size=settings["batch_size"],
                               seed=seed, schedule=schedule)
    return layer, history


def calibrated_predictions(layer: CalibrationLayer, inputs: torch.Tensor) -> torch.Tensor:
    """The patched model's predictions: argmax of the calibration layer's outputs."""
    with torch.no_grad():
        return layer(inputs.float()).argmax(dim=1)


class ModaPatch:
    """MODA's patch of the weak models of one weak task: the TC module's scores on the
    calibration split and the test split, computed once, and how well they rank the test
    split's TC images (``module_auc``); :meth:`patch` trains one weak model's calibration layer
    and compares weak vs patched on the test images."""

    def __init__(self, strong_model: nn.Module, modules, weak_data,
                 normalization: Mapping[str, Any], tc_column: int,
                 settings: Mapping[str, Any], where: str) -> None:
        self.settings = resolve_calibration_layer("calibration_layer", settings)
        self.calibration = getattr(weak_data, self.settings["split"])
        tc_images = int((self.calibration.labels == tc_column).sum())
        if tc_images == 0:
            raise ConfigError(f"{where}: the calibration layer trains on the weak task's "
                              f"{self.settings['split']} split, which holds no image of the "
                              "target (mixed) class (raise samples_per_class.train)")
        self.test, self.tc_column, self.tc_images = weak_data.test, tc_column, tc_images
        self.calibration_scores, self.test_scores = strong_module_scores(
            strong_model, modules, [self.calibration, self.test], normalization)
        self.module_auc = ranking_auc(self.test_scores, self.test.labels == tc_column)

    def patch(self, weak_model: nn.Module, seed: int) -> tuple[dict[str, float], dict[str, Any]]:
        """(weak vs patched metrics, the calibration record) of one weak model."""
        from dnnmod.modules.inference import run

        inputs = calibration_inputs(run(weak_model, self.calibration), self.calibration_scores,
                                    self.tc_column)
        layer, history = train_calibration_layer(inputs, self.calibration.labels,
                                                 self.settings, seed)
        test_logits = run(weak_model, self.test)
        patched = calibrated_predictions(
            layer, calibration_inputs(test_logits, self.test_scores, self.tc_column))
        metrics = compare_predictions(self.test.labels, test_logits.argmax(dim=1), patched,
                                      self.tc_column)
        record = {"layer": f"linear {inputs.shape[1]}x{inputs.shape[1]}",
                  **self.settings, "images": len(self.calibration),
                  "tc_images": self.tc_images, "seed": seed, "history": history}
        return metrics, record
