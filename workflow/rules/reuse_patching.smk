# E3 patching (reuse.patching in config): weak models trained on derived weak tasks, patched
# with every approach's target-class module by each setting's protocol (minmax or moda); the
# table and the figure are separate rules.


rule train_weak_model:
    input:
        images=lambda wc: f"{DATA}/{weak_task_of(wc)}/images.safetensors",
        split=lambda wc: f"{DATA}/{weak_task_of(wc)}/splits/seed{wc.seed}.safetensors",
    output:
        weights=f"{RESULTS}/patching/weak/{{setting}}/{{model}}/{{weak_type}}/tc{{target_class}}/seed{{seed}}/model.safetensors",
        meta=f"{RESULTS}/patching/weak/{{setting}}/{{model}}/{{weak_type}}/tc{{target_class}}/seed{{seed}}/model.json",
    log:
        f"{RESULTS}/logs/patching/weak/{{setting}}/{{model}}/{{weak_type}}/tc{{target_class}}/seed{{seed}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/patching/weak/{{setting}}/{{model}}/{{weak_type}}/tc{{target_class}}/seed{{seed}}.tsv"
    wildcard_constraints:
        setting="|".join(PATCHING["settings"]) if PATCHING else "(?!)",
        weak_type="|".join(patching.WEAK_TYPES),
        target_class=r"\d+",
    priority: PRIORITY["train"]
    conda:
        "../../environment.yml"
    threads: gpu_rule_threads(config, "train_weak_model")
    resources:
        **gpu_rule_resources(config, "train_weak_model"),
    params:
        data_root=lambda wc, input: data_root(input.images),
        task=weak_task_of,
        name=lambda wc: patching.weak_model_name(
            config, wc.setting, wc.model, wc.weak_type
        ),
        arch=lambda wc: weak_model_entry(wc)["arch"],
        width=lambda wc: weak_model_entry(wc).get("width", 1.0),
        options=lambda wc: as_json(weak_model_entry(wc).get("options", {})),
        recipe=lambda wc: as_json(patching.weak_recipe(config, wc.weak_type)),
        # Outside the declared outputs: Snakemake does not delete it when a killed job reruns.
        checkpoint=f"{RESULTS}/resume/patching/weak/{{setting}}/{{model}}/{{weak_type}}/tc{{target_class}}/seed{{seed}}.pt",
    shell:
        "dnnmod train --dataset {params.task} --model-name {params.name} "
        "--arch {params.arch} --width {params.width} --options {params.options:q} "
        "--recipe {params.recipe:q} --seed {wildcards.seed} --data-root {params.data_root} "
        "--threads {threads} --checkpoint {params.checkpoint} --out {output.weights} 2> {log}"


rule patch_weak_models:
    input:
        unpack(patched_modules),
        weak=lambda wc: [path for _, path in weak_models_of(wc)],
        splits=weak_task_splits,
        # the min-max range: the strong model's validation images of the target class
        strong_split=lambda wc: f"{DATA}/{PATCHING['settings'][wc.setting]['dataset']}/splits/seed{wc.seed}.safetensors",
    output:
        f"{RESULTS}/patching/{{setting}}/{{model}}/{{approach}}/seed{{seed}}/metrics.json",
    log:
        f"{RESULTS}/logs/patching/{{setting}}/{{model}}/{{approach}}/seed{{seed}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/patching/{{setting}}/{{model}}/{{approach}}/seed{{seed}}.tsv"
    wildcard_constraints:
        setting="|".join(PATCHING["settings"]) if PATCHING else "(?!)",
    conda:
        "../../environment.yml"
    threads: gpu_rule_threads(config, "patch_weak_models")
    resources:
        **gpu_rule_resources(config, "patch_weak_models"),
    params:
        data_root=lambda wc, input: data_root(input.splits[0]),
        weak=lambda wc: " ".join(
            f"--weak {weak_type}={path}" for weak_type, path in weak_models_of(wc)
        ),
        # minmax with its calibration images, or moda with its calibration layer's training
        # (reuse.patching.protocol).
        protocol=lambda wc: patching.protocol_arguments(config, wc.setting),
    shell:
        "dnnmod reuse patch --modules {input.modules} --model {input.strong} {params.weak} "
        "--setting {wildcards.setting} {params.protocol} --data-root {params.data_root} "
        "--out {output} 2> {log}"


rule table_patching:
    input:
        patching_metrics(),
    output:
        csv=report(
            f"{RESULTS}/tables/e3_patching.csv",
            caption="../report/e3_patching.rst",
            category="E3 patching",
        ),
        summary_csv=f"{RESULTS}/tables/e3_patching_summary.csv",
        markdown=f"{RESULTS}/tables/e3_patching.md",
        metrics=f"{RESULTS}/metrics/e3_patching.json",
    log:
        f"{RESULTS}/logs/report/e3_patching.log",
    benchmark:
        f"{RESULTS}/benchmarks/report/e3_patching.tsv"
    conda:
        "../../environment.yml"
    resources:
        **LIGHT_JOB,
    shell:
        "dnnmod reuse patch-table --metrics {input} --out {output.csv} "
        "--summary {output.metrics} 2> {log}"


rule figure_patching:
    input:
        patching_metrics(),
    output:
        png=report(
            f"{RESULTS}/figures/e3_patching.png",
            caption="../report/e3_patching_figure.rst",
            category="E3 patching",
        ),
        pdf=f"{RESULTS}/figures/e3_patching.pdf",
    log:
        f"{RESULTS}/logs/report/e3_patching_figure.log",
    benchmark:
        f"{RESULTS}/benchmarks/report/e3_patching_figure.tsv"
    conda:
        "../../environment.yml"
    resources:
        **LIGHT_JOB,
    shell:
        "dnnmod reuse patch-figure --metrics {input} --out {output.png} 2> {log}"
