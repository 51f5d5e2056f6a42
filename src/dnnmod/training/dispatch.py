"""Counting the aten ops a piece of code dispatches, and which of them make the host wait.

On a GPU a small model's training step is bound by kernel launches, and an op whose result the
CPU must read (a scalar read back, a data-dependent output shape) stops the CPU from queuing the
next kernels until the GPU has caught up. Both can be counted on the CPU, because the same aten
ops are dispatched there: :func:`count_dispatched_ops` records every op a call dispatches, with
a ``TorchDispatchMode``, and names the syncing ones.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from dnnmod.training.train import EpochSums, Trainer

_ALWAYS_SYNCING = {torch.ops.aten.is_nonzero.default}
# Tagged as of data-dependent output shape, but only so with a boolean index (an integer index
# gives a shape known from the indices' shapes).
_BOOLEAN_INDEXING = {torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default,
                     torch.ops.aten.index_put_.default, torch.ops.aten._index_put_impl_.default}


def syncing_reason(func: torch._ops.OpOverload, args: tuple, kwargs: dict) -> str | None:
    """Why op ``func`` called with ``args``/``kwargs`` forces a host sync on a device, or None:
    it reads a value back (``item``, ``_local_scalar_dense``, ``is_nonzero``: a Python ``if``
    on a tensor), indexes by a boolean mask, or has an output shape that depends on the data
    (``nonzero``, ``masked_select``, ``unique``, ``repeat_interleave`` without output size)."""
    if func in _BOOLEAN_INDEXING:
        indices, _ = tree_flatten((args[1:], kwargs))
        boolean = any(torch.is_tensor(index) and index.dtype in (torch.bool, torch.uint8)
                      for index in indices)
        return "boolean-mask indexing" if boolean else None
    if func is torch.ops.aten.repeat_interleave.Tensor and kwargs.get("output_size") is not None:
        return None
    if func in _ALWAYS_SYNCING or torch.Tag.data_dependent_output in func.tags:
        return "value read back"
    if torch.Tag.dynamic_output_shape in func.tags:
        return "data-dependent output shape"
    return None


@dataclass
class DispatchCount:
    """The aten ops one call dispatched.

    ``ops``: every op overload by name (``aten.add.Tensor``) and how often it ran; ``views``:
    how many of them were views (no kernel, no memory traffic); ``syncing``: each op that forces
    a host sync, in call order, as ``"name: reason"``.
    """

    ops: Counter = field(default_factory=Counter)
    views: int = 0
    syncing: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    @property
    def kernels(self) -> int:
        """Ops that are no views: on a device each launches at least one kernel (or is a copy
        or fill the allocator cannot skip)."""
        return self.total - self.views


class _OpCounter(TorchDispatchMode):
    def __init__(self, count: DispatchCount) -> None:
        super().__init__()
        self.count = count

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.count.ops[str(func)] += 1
        self.count.views += func.is_view
        reason = syncing_reason(func, args, kwargs)
        if reason is not None:
            self.count.syncing.append(f"{func}: {reason}")
        return func(*args, **kwargs)


def count_dispatched_ops(function: Callable[[], Any]) -> tuple[DispatchCount, Any]:
    """Run ``function()`` recording every aten op it dispatches; returns the count and the
    function's result. Ops that an op's own kernel calls (a composite's parts below the mode)
    are not seen twice: what is counted is what the Python side dispatches, as on a device."""
    count = DispatchCount()
    with _OpCounter(count):
        result = function()
    return count, result


def count_training_step(trainer: Trainer, x: torch.Tensor, y: torch.Tensor) -> DispatchCount:
    """The ops of one training step of ``trainer`` on batch ``(x, y)`` as the training loop
    runs it: forward pass, loss, backward pass, optimizer update and the step's share of the
    epoch sums (:class:`~dnnmod.training.train.EpochSums`). The step counted is the second on
    this batch: the first creates the optimizer's state. Both update the model."""
    sums = EpochSums()
    with trainer.objective.capture(trainer.model) as captured:
        def step() -> None:
            sums.add(*trainer.step(x, y, captured), y)

        step()
        count, _ = count_dispatched_ops(step)
    return count
