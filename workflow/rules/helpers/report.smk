# Report helpers (report.smk): every output of the study, the training curves, the cost table
# and the HTML report.

from pathlib import Path

from dnnmod.report import sensitivity
from dnnmod.training.objectives import StandardTraining


def all_outputs():
    outputs = [
        f"{RESULTS}/tables/e1_base_models.csv",
        f"{RESULTS}/metrics/e1_base_models.json",
    ]
    if MODULARIZATIONS:
        outputs += [
            f"{RESULTS}/tables/e2_modularization.csv",
            f"{RESULTS}/figures/e2_accuracy_vs_krr.png",
            f"{RESULTS}/metrics/e2_modularization.json",
        ]
    if PATCHING:
        outputs += [
            f"{RESULTS}/tables/e3_patching.csv",
            f"{RESULTS}/figures/e3_patching.png",
            f"{RESULTS}/metrics/e3_patching.json",
        ]
    if NEW_TASKS:
        outputs += [
            f"{RESULTS}/tables/e4_new_tasks.csv",
            f"{RESULTS}/figures/e4_new_tasks.png",
            f"{RESULTS}/metrics/e4_new_tasks.json",
        ]
    if SUBTASKS is not None and MODULARIZATIONS:
        outputs += [
            f"{RESULTS}/tables/e5_subtask_reuse.csv",
            f"{RESULTS}/figures/e5_subtask_reuse.png",
            f"{RESULTS}/metrics/e5_subtask_reuse.json",
        ]
    if pan_rajan_costs():
        outputs += [
            f"{RESULTS}/tables/pan_rajan_decomposition.csv",
            f"{RESULTS}/metrics/pan_rajan_decomposition.json",
        ]
    if REPLACEMENTS:
        outputs += [
            f"{RESULTS}/tables/e6_replacement.csv",
            f"{RESULTS}/figures/e6_replacement.png",
            f"{RESULTS}/metrics/e6_replacement.json",
        ]
    if SENSITIVITY:
        outputs += [
            f"{RESULTS}/tables/e7_sensitivity.csv",
            f"{RESULTS}/figures/e7_sensitivity.png",
            f"{RESULTS}/metrics/e7_sensitivity.json",
        ]
    outputs += [
        f"{RESULTS}/figures/e7_{curve}.png"
        for curve in TRAINING_CURVES
        if training_curve_inputs(curve)
    ]
    # Last: the cost table and the HTML report read everything above (report_inputs).
    outputs += report_outputs()
    return outputs


# Training curves (E7's figures): the study's runs of each approach, and its sweep points.
TRAINING_CURVES = {
    "ga_convergence": "cnnsplitter",
    "mask_training": "gradsplitter",
    "modular_training": None,
}


def training_curve_inputs(curve):
    """What a training-curve figure reads: the study's and E7's module sets of its approach,
    or (modular training) their models of every training kind but standard training."""
    if curve == "modular_training":
        paths = [
            model_weights(dataset, model, training, seed)
            for (dataset, model, training) in trained_models()
            if training != StandardTraining.name
            for seed in SEEDS
        ]
        paths += [
            sensitivity_weights(point, seed)
            for point, seed in sensitivity_units()
            if point.stage == sensitivity.TRAINING
        ]
    else:
        approach = TRAINING_CURVES[curve]
        paths = [
            f"{RESULTS}/modules/{dataset}/{model}/{approach}/seed{seed}/modules.safetensors"
            for (name, dataset, model) in MODULARIZATIONS
            if name == approach
            for seed in SEEDS
        ]
        paths += [
            sensitivity_modules(point, seed)
            for point, seed in sensitivity_units()
            if point.approach == approach
        ]
    return list(dict.fromkeys(paths))


# The study report (report.smk): E8 cost from every job's benchmark file, then one HTML file.
# Both run after every other table and figure of all_outputs(), whatever experiment adds them.

COST_OUTPUTS = [
    f"{RESULTS}/tables/e8_cost.csv",
    f"{RESULTS}/figures/e8_energy.png",
    f"{RESULTS}/metrics/e8_cost.json",
]
REPORT_HTML = f"{RESULTS}/report.html"


def report_outputs():
    return [*COST_OUTPUTS, REPORT_HTML]


def study_outputs():
    """Every table, figure and metrics file of the study but the report's own."""
    return [path for path in all_outputs() if path not in report_outputs()]


def report_captions():
    """The captions the HTML report shows (a changed caption rebuilds the report only)."""
    return sorted(str(path) for path in Path("workflow/report").glob("*.rst"))
