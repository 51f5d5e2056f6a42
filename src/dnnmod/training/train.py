"""Training a base model, standard or modular, resumable, deterministic on the CPU.

The loop reads top to bottom: data tensors live on the device for the whole run, every epoch
draws its shuffling and augmentation from a generator seeded by (seed, epoch) so that a resumed
run replays exactly the epochs an uninterrupted run would, and a checkpoint holding everything
needed to resume (weights, optimizer, schedule, scaler, history, best weights) is written
atomically after every epoch (:class:`~dnnmod.resumable.ResumableLoop`). What is minimised is
the training kind's :class:`~dnnmod.training.objectives.Objective`: cross-entropy for standard
training, extra terms over captured activations for modular training.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import MISSING, asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dnnmod.artifacts import config_hash
from dnnmod.errors import ConfigError, TrainingDivergedError
from dnnmod.hyperparameters import resolve
from dnnmod.modules.inference import accuracy
from dnnmod.resumable import ResumableLoop, epoch_generator
from dnnmod.training.objectives import Objective, StandardTraining

log = logging.getLogger(__name__)

AUGMENTATIONS = ("crop", "flip")


@dataclass(frozen=True)
class Recipe:
    """How to train: the papers' recipes are instances of this, written in config files.

    ``selection`` picks the final weights: ``last`` epoch, or ``best_val`` (highest validation
    accuracy). ``patience``, when set, stops training after that many epochs without a new best
    validation accuracy, whatever the selection.
    """

    epochs: int
    batch_size: int
    lr: float
    optimizer: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "cosine"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    augmentation: tuple[str, ...] = ()
    selection: str = "last"
    patience: int | None = None

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Recipe:
        """A recipe from config values; unknown or missing keys and values of the wrong type
        are a ConfigError naming them."""
        fields = cls.__dataclass_fields__
        required = [name for name, f in fields.items() if f.default is MISSING]
        missing = [name for name in required if name not in values]
        if missing:
            raise ConfigError(f"recipe: missing keys {missing}")
        # The types of the fields, as example values (required fields have no default).
        examples = {name: f.default for name, f in fields.items() if f.default is not MISSING}
        # None: checked below (lists) or any value allowed by validate (patience).
        examples |= {"epochs": 1, "batch_size": 1, "lr": 0.1, "milestones": None,
                     "augmentation": None}
        resolve("recipe", examples, values)
        patience = values.get("patience")
        if patience is not None and (isinstance(patience, bool) or not isinstance(patience, int)):
            raise ConfigError(f"recipe.patience: expected int or null, got {patience!r}")
        for key, kind in (("milestones", int), ("augmentation", str)):
            entries = values.get(key, ())
            if not isinstance(entries, list | tuple) or not all(
                    isinstance(entry, kind) and not isinstance(entry, bool) for entry in entries):
                raise ConfigError(f"recipe.{key}: expected a list of {kind.__name__}, got "
                                  f"{entries!r}")
        values = {**values, **{key: tuple(values[key]) for key in ("milestones", "augmentation")
                               if key in values}}
        recipe = cls(**values)
        recipe.validate()
        return recipe

    def validate(self) -> None:
        checks = [
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.lr > 0, "lr must be > 0"),
            (self.optimizer in ("sgd", "adam"), "optimizer must be 'sgd' or 'adam'"),
            (self.schedule in ("cosine", "step", "constant"),
             "schedule must be 'cosine', 'step' or 'constant'"),
            (set(self.augmentation) <= set(AUGMENTATIONS),
             f"augmentation entries must be among {AUGMENTATIONS}"),
            (self.selection in ("last", "best_val"), "selection must be 'last' or 'best_val'"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"recipe: {message} (got {asdict(self)})")

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["milestones"] = list(self.milestones)
        values["augmentation"] = list(self.augmentation)
        return values


@dataclass
class EpochRecord:
    epoch: int
    lr: float
    train_loss: float
    train_accuracy: float
    val_accuracy: float
    seconds: float
    losses: dict[str, float] = field(default_factory=dict)  # the objective's named parts


@dataclass
class TrainResult:
    model: nn.Module
    selected_epoch: int
    config_hash: str  # of run config + recipe + seed: identifies the run, keys its checkpoint
    history: list[EpochRecord] = field(default_factory=list)
    wall_seconds: float = 0.0


def augment(x: torch.Tensor, augmentation: Sequence[str],
            generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Random crop (zero padding, per-sample offsets) and horizontal flip, on the batch's device."""
    batch, _, height, width = x.shape
    if "crop" in augmentation:
        padded = nn.functional.pad(x, (padding,) * 4)
        dy = torch.randint(0, 2 * padding + 1, (batch,), generator=generator).to(x.device)
        dx = torch.randint(0, 2 * padding + 1, (batch,), generator=generator).to(x.device)
        rows = (dy[:, None] + torch.arange(height, device=x.device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(width, device=x.device))[:, None, None, :]
        samples = torch.arange(batch, device=x.device)[:, None, None, None]
        channels = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        x = padded[samples, channels, rows, cols]
    if "flip" in augmentation:
        flip = (torch.rand(batch, generator=generator) < 0.5).to(x.device)
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x


def _make_optimizer(model: nn.Module, recipe: Recipe, fused: bool = False
                    ) -> torch.optim.Optimizer:
    """The recipe's optimizer over ``model``'s trainable parameters.

    ``fused``: one kernel updates every parameter, and under a GradScaler the optimizer itself
    skips a step with non-finite gradients; otherwise GradScaler reads the check back to the
    host (``found_inf.item()``) every step, a sync. Else the multi-tensor ("foreach") form,
    which CUDA picks by default and which on the CPU computes what the per-parameter loop does,
    bit for bit, in a handful of ops a step rather than a few per parameter.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    implementation = {"fused": True} if fused else {"foreach": True}
    if recipe.optimizer == "adam":
        return torch.optim.Adam(params, lr=recipe.lr, weight_decay=recipe.weight_decay,
                                **implementation)
    return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum,
                           nesterov=recipe.nesterov, weight_decay=recipe.weight_decay,
                           **implementation)


def _make_schedule(optimizer: torch.optim.Optimizer, recipe: Recipe):
    if recipe.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=recipe.epochs)
    if recipe.schedule == "step":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, list(recipe.milestones),
                                                    recipe.gamma)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


@dataclass
class Trainer:
    """What a training run steps: the prepared model, its objective, optimizer and loss scaler.

    Mixed precision (float16 autocast with loss scaling) and channels-last apply on CUDA only.
    """

    model: nn.Module
    objective: Objective
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    memory_format: torch.memory_format
    # Read once here: torch.compile does not trace into GradScaler, so a step without mixed
    # precision calls none of its methods and compiles whole (fullgraph).
    mixed_precision: bool = field(init=False)

    def __post_init__(self) -> None:
        self.mixed_precision = self.scaler.is_enabled()

    @classmethod
    def create(cls, model: nn.Module, recipe: Recipe, objective: Objective, device: str,
               mixed_precision: bool = True) -> Trainer:
        """``objective`` prepares ``model``, which moves to ``device``; the optimizer follows
        ``recipe``. Draws from the global torch generator (the objective's additions)."""
        on_cuda = torch.device(device).type == "cuda"
        memory_format = torch.channels_last if on_cuda else torch.contiguous_format
        model = objective.prepare(model).to(device, memory_format=memory_format)
        return cls(model, objective, _make_optimizer(model, recipe, fused=on_cuda),
                   torch.amp.GradScaler("cuda", enabled=on_cuda and mixed_precision),
                   memory_format)

    def step(self, x: torch.Tensor, y: torch.Tensor, captured: dict[str, Any]
             ) -> tuple[torch.Tensor, dict[str, Any], torch.Tensor]:
        """One optimisation step on batch ``(x, y)``; ``captured`` is the dict the objective's
        :meth:`~dnnmod.training.objectives.Objective.capture` fills. Returns the loss, its
        named parts and the logits, detached."""
        loss, parts, logits = self.backward(x, y, captured)
        if self.mixed_precision:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        return loss, parts, logits

    def backward(self, x: torch.Tensor, y: torch.Tensor, captured: dict[str, Any]
                 ) -> tuple[torch.Tensor, dict[str, Any], torch.Tensor]:
        """A step's forward pass, loss and backward pass: sets the parameters' gradients.

        Without mixed precision it compiles as one graph,
        ``torch.compile(trainer.backward, fullgraph=True)`` with
        ``torch._dynamo.config.trace_autograd_ops``; the optimizer's update cannot join it,
        because ``Optimizer.step`` breaks a compiled graph on purpose (torch/optim/optimizer.py,
        ``_use_grad``).
        """
        x = x.contiguous(memory_format=self.memory_format)
        captured.clear()
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.mixed_precision):
            logits = self.model(x)
            loss, parts = self.objective.loss(logits.float(), y, captured)
        # zero_grad(set_to_none=True) written out: torch.compile does not trace zero_grad.
        for group in self.optimizer.param_groups:
            for parameter in group["params"]:
                parameter.grad = None
        (self.scaler.scale(loss) if self.mixed_precision else loss).backward()
        # Nothing that leaves the step holds the spent autograd graph (which a compiled graph
        # requires), and the captured activations are freed now rather than at the next step.
        captured.clear()
        return loss.detach(), parts, logits.detach()


class EpochSums:
    """An epoch's training loss, its named parts and correct count, summed over its steps.

    The sums stay on the device and are read once, by :meth:`means`: reading them every step
    would make the CPU wait for the GPU before it queues the next step's kernels. A step's loss
    and parts are stacked into one vector and added as one, whatever the number of parts.
    """

    def __init__(self) -> None:
        # Parts' names of a step → the vector sums of the steps with those names; an objective
        # may leave a part out of some steps.
        self.sums: dict[tuple[str, ...], torch.Tensor] = {}
        self.correct: torch.Tensor | int = 0
        self.seen = 0

    def add(self, loss: torch.Tensor, parts: dict[str, Any], logits: torch.Tensor,
            labels: torch.Tensor) -> None:
        """Add one step: its loss, its parts (0-dim tensors or floats), its logits, its labels."""
        names = tuple(parts)
        values = torch.stack([loss.detach(), *(
            value.detach() if torch.is_tensor(value)
            else torch.tensor(value, dtype=torch.float64, device=loss.device)
            for value in parts.values())]).double() * len(labels)
        self.sums[names] = self.sums[names] + values if names in self.sums else values
        self.correct = self.correct + (logits.argmax(1) == labels).sum()
        self.seen += len(labels)

    def means(self) -> tuple[float, float, dict[str, float]]:
        """Mean loss per sample, accuracy in percent, and each part's mean per sample (a step
        without a part adds 0 to it), read back once."""
        loss, losses = 0.0, {}
        for names, values in self.sums.items():
            values = values.tolist()
            loss += values[0]
            for name, value in zip(names, values[1:], strict=True):
                losses[name] = losses.get(name, 0.0) + value
        return (loss / self.seen, 100.0 * float(self.correct) / self.seen,
                {name: total / self.seen for name, total in losses.items()})


def train(model: nn.Module, data, recipe: Recipe, *, seed: int,
          objective: Objective | None = None, device: str = "cpu",
          checkpoint: Path | None = None, run_config: dict[str, Any] | None = None,
          mixed_precision: bool = True, progress: bool | None = None) -> TrainResult:
    """Train ``model`` on ``data.train`` with ``recipe``, selecting on ``data.val``.

    ``objective`` (default: standard training) first prepares the model (the result's model is
    the prepared one), then supplies the loss of every batch. ``checkpoint`` is rewritten after
    every epoch; if it exists and was written by the same ``run_config`` + recipe + objective +
    seed, training resumes after its last epoch. Mixed precision and channels-last apply on
    CUDA only (:class:`Trainer`).
    """
    objective = objective or StandardTraining()
    fingerprint = config_hash({"run": run_config or {}, "recipe": recipe.to_dict(), "seed": seed,
                               "training": objective.name,
                               "objective": objective.hyperparameters})
    loop = ResumableLoop(checkpoint, fingerprint, recipe.epochs, desc="train",
                         progress=progress)
    torch.manual_seed(seed)
    trainer = Trainer.create(model, recipe, objective, device, mixed_precision)
    model, optimizer, scaler = trainer.model, trainer.optimizer, trainer.scaler
    schedule = _make_schedule(optimizer, recipe)

    history: list[EpochRecord] = []
    best_accuracy, best_epoch, best_state = -math.inf, -1, None
    if loop.state is not None:
        model.load_state_dict(loop.state["model"])
        optimizer.load_state_dict(loop.state["optimizer"])
        schedule.load_state_dict(loop.state["schedule"])
        scaler.load_state_dict(loop.state["scaler"])
        history = [EpochRecord(**record) for record in loop.state["history"]]
        best_accuracy, best_epoch = loop.state["best_accuracy"], loop.state["best_epoch"]
        best_state = loop.state["best_model"]

    train_set = data.train
    for epoch in loop.steps():
        if recipe.patience is not None and epoch - best_epoch > recipe.patience:
            log.info("early stop after epoch %d: no validation gain for %d epochs", epoch,
                     recipe.patience)
            break
        epoch_started = time.monotonic()
        generator = epoch_generator(seed, epoch)
        order = torch.randperm(len(train_set), generator=generator).to(train_set.labels.device)
        model.train()
        sums = EpochSums()
        lr = optimizer.param_groups[0]["lr"]
        with objective.capture(model) as captured:
            for start in range(0, len(order), recipe.batch_size):
                x, y = train_set.float_batch(order[start:start + recipe.batch_size])
                sums.add(*trainer.step(augment(x, recipe.augmentation, generator), y, captured),
                         y)
        train_loss, train_accuracy, losses = sums.means()
        if not math.isfinite(train_loss):
            # A diverged model would otherwise be saved and decomposed at chance accuracy.
            raise TrainingDivergedError(
                f"{objective.name} training diverged: epoch {epoch + 1}/{recipe.epochs} ended "
                f"with mean loss {train_loss} at learning rate {lr:g} (the recipe's lr "
                f"{recipe.lr:g}, batch {recipe.batch_size}); lower the recipe's lr; no model "
                f"was saved")
        schedule.step()
        val_accuracy = accuracy(model, data.val)
        record = EpochRecord(epoch=epoch + 1, lr=lr, train_loss=train_loss,
                             train_accuracy=train_accuracy, val_accuracy=val_accuracy,
                             seconds=time.monotonic() - epoch_started, losses=losses)
        history.append(record)
        if val_accuracy > best_accuracy:
            best_accuracy, best_epoch = val_accuracy, epoch
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in
                          model.state_dict().items()}
        loop.save(epoch, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(), "scaler": scaler.state_dict(),
            "history": [asdict(r) for r in history], "best_accuracy": best_accuracy,
            "best_epoch": best_epoch, "best_model": best_state,
        }, postfix={"loss": f"{record.train_loss:.3f}", "val": f"{val_accuracy:.1f}%"})
        # Logged once saved: a job killed between the two resumes after the epoch it logged.
        log.info("epoch %d/%d loss %.4f (%s) train %.2f%% val %.2f%% (%.1f s)", record.epoch,
                 recipe.epochs, record.train_loss,
                 ", ".join(f"{name} {value:.4f}" for name, value in record.losses.items()),
                 record.train_accuracy, val_accuracy, record.seconds)

    if recipe.selection == "best_val" and best_state is not None:
        model.load_state_dict(best_state)
        selected = best_epoch + 1
    else:
        selected = history[-1].epoch if history else 0
    model.to(memory_format=torch.contiguous_format)
    return TrainResult(model=model, selected_epoch=selected, config_hash=fingerprint,
                       history=history, wall_seconds=loop.wall_seconds)


def fine_tune(model: nn.Module, images, recipe: Recipe, *, seed: int, device: str = "cpu",
              cosine_epochs: int | None = None, mixed_precision: bool = True) -> nn.Module:
    """Train every parameter of ``model`` on the ImageSet ``images`` (labels index its outputs)
    for ``recipe.epochs`` epochs with cross-entropy and the recipe's optimizer, schedule and
    augmentation; no validation, no checkpoint, the last epoch kept (E5's union networks).
    ``cosine_epochs``: the cosine schedule's period when it is not the run's length (MwT's
    sub-task fine-tuning anneals over twice its epochs). Eval mode on return."""
    torch.manual_seed(seed)
    trainer = Trainer.create(model, recipe, StandardTraining(), device, mixed_precision)
    schedule = _make_schedule(trainer.optimizer, replace(recipe, epochs=cosine_epochs)
                              if cosine_epochs else recipe)
    for epoch in range(recipe.epochs):
        generator = epoch_generator(seed, epoch)
        order = torch.randperm(len(images), generator=generator).to(images.labels.device)
        trainer.model.train()
        for start in range(0, len(order), recipe.batch_size):
            x, y = images.float_batch(order[start:start + recipe.batch_size])
            if len(y) < 2:  # BatchNorm cannot normalise one image in training mode
                continue
            trainer.step(augment(x, recipe.augmentation, generator), y, {})
        schedule.step()
    return trainer.model.to(memory_format=torch.contiguous_format).eval()
