"""E6, intra-dataset replacement (Pan & Rajan): the module set of a weaker model with the
module of class k swapped for class k's module of a stronger model of the same dataset,
composed N-class top-1/top-5 test accuracy per k.

The scores of all 2N modules (the weaker set's and the stronger set's) are computed once over
the test images, one batched masked pass per set. A module's score does not depend on the
other modules, so the composition swapping class k is the weaker set's score columns with
column k taken from the stronger set's, combined by the sets' rule (``voting`` for Pan &
Rajan): no module is extracted, and no network is built per swap. The baselines are the two
module sets composed unchanged and the two base models.

The two module sets must recognise the same classes of the same dataset and combine scores by
the same rule; the models may differ in architecture (the paper swaps between ResNets).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from dnnmod.errors import ConfigError
from dnnmod.modules.combination import combine_scores
from dnnmod.modules.inference import run
from dnnmod.modules.metrics import module_scores, top_k_accuracy
from dnnmod.modules.moduleset import ModuleSet


def check_pair(weaker: ModuleSet, stronger: ModuleSet, where: str) -> None:
    """ConfigError naming what differs unless the two sets can stand in for each other."""
    for key in ("dataset", "num_classes"):
        if weaker.base.get(key) != stronger.base.get(key):
            raise ConfigError(f"{where}: the weaker modules are of {key} "
                              f"{weaker.base.get(key)!r}, the stronger of "
                              f"{stronger.base.get(key)!r}; replacement swaps modules of one "
                              "dataset")
    if weaker.classes != stronger.classes:
        raise ConfigError(f"{where}: the module sets recognise classes {weaker.classes} and "
                          f"{stronger.classes}; replacement needs the same classes")
    if weaker.combination != stronger.combination:
        raise ConfigError(f"{where}: the module sets combine by {weaker.combination!r} and "
                          f"{stronger.combination!r}; a swapped module must be combined by "
                          "its set's rule")


@torch.no_grad()
def replacement_scores(weaker: tuple[nn.Module, ModuleSet], stronger: tuple[nn.Module, ModuleSet],
                       test) -> torch.Tensor:
    """Scores of the weaker set's N modules then the stronger set's N on the ImageSet ``test``:
    (images, 2N) or (images, 2N, k). One batched masked pass per set; every swap is then a
    choice of columns, so no module is extracted or run twice."""
    return torch.cat([module_scores(model, modules, test).float()
                      for model, modules in (weaker, stronger)], dim=1)


def replace_modules(weaker: tuple[nn.Module, ModuleSet], stronger: tuple[nn.Module, ModuleSet],
                    test) -> dict[str, Any]:
    """E6 for one pair: per swapped class, the composed top-1/top-5 and the swapped class's
    recall; the baselines (each set composed as is, each base model) beside."""
    check_pair(weaker[1], stronger[1], "replacement")
    classes = weaker[1].classes
    combination = weaker[1].combination
    count = len(classes)
    scores = replacement_scores(weaker, stronger, test)
    labels = test.labels

    def measure(columns: list[int]) -> dict[str, float]:
        chosen = scores[:, columns]
        predicted = combine_scores(combination, chosen, classes)
        return {"top1": 100.0 * (predicted == labels).float().mean().item(),
                "top5": top_k_accuracy(chosen, classes, labels, 5), "predicted": predicted}

    def model_accuracy(model: nn.Module) -> dict[str, float]:
        logits = run(model, test)
        every = list(range(logits.shape[1]))
        return {"top1": top_k_accuracy(logits, every, labels, 1),
                "top5": top_k_accuracy(logits, every, labels, 5)}

    weaker_composed = measure(list(range(count)))
    stronger_composed = measure(list(range(count, 2 * count)))
    rows = []
    for position, label in enumerate(classes):
        columns = [count + j if j == position else j for j in range(count)]
        result = measure(columns)
        own = labels == label
        rows.append({
            "swapped_class": label, "class_name": test.class_names[label],
            "top1": result["top1"], "top5": result["top5"],
            "class_recall": 100.0 * (result["predicted"][own] == label).float().mean().item(),
            "weaker_class_recall": 100.0 * (weaker_composed["predicted"][own] == label)
            .float().mean().item(),
        })
    return {
        "weaker_composed_top1": weaker_composed["top1"],
        "weaker_composed_top5": weaker_composed["top5"],
        "stronger_composed_top1": stronger_composed["top1"],
        "stronger_composed_top5": stronger_composed["top5"],
        **{f"weaker_model_{k}": v for k, v in model_accuracy(weaker[0]).items()},
        **{f"stronger_model_{k}": v for k, v in model_accuracy(stronger[0]).items()},
        "rows": rows,
    }


def replacement_record(weaker: tuple[nn.Module, dict[str, Any], ModuleSet],
                       stronger: tuple[nn.Module, dict[str, Any], ModuleSet], test,
                       device: str) -> dict[str, Any]:
    """The per-pair record the E6 table reads: which models and module sets, and
    :func:`replace_modules`' result. Each argument: (model, its metadata, its module set)."""
    started = time.monotonic()
    seeds = {weaker[2].provenance["seed"], stronger[2].provenance["seed"]}
    if len(seeds) != 1:
        raise ConfigError(f"replacement: module sets of seeds {sorted(seeds)}; a pair is "
                          "compared within one seed")
    if weaker[2].approach != stronger[2].approach:
        raise ConfigError(f"replacement: {weaker[2].approach} modules and "
                          f"{stronger[2].approach} modules; swap modules of one approach")
    result = replace_modules(weaker[::2], stronger[::2], test)
    return {
        "experiment": "e6_replacement", "approach": weaker[2].approach,
        "dataset": weaker[1]["dataset"], "seed": seeds.pop(),
        **{role: {"model": meta["model"], "arch": meta["arch"],
                  "weights_sha256": meta.get("weights_sha256")}
           for role, (_, meta, _) in (("weaker", weaker), ("stronger", stronger))},
        **result, "seconds": time.monotonic() - started, "device": device,
    }
