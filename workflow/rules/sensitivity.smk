# E7 sensitivity and ablations (sensitivity.sweeps), and the training-curve figures.
# Per sweep point: a model trained with the value (training-time parameters only), then one job
# that decomposes and evaluates. The table, the figure and each curve figure are rules of their
# own, so that changing one reruns only it.


wildcard_constraints:
    variant=r"[a-z0-9_]+-[A-Za-z0-9_.+\-]+",


use rule train_base_model as train_sensitivity_model with:
    output:
        weights=f"{RESULTS}/sensitivity/models/{{dataset}}/{{model}}/{{training}}/{{variant}}/seed{{seed}}/model.safetensors",
        meta=f"{RESULTS}/sensitivity/models/{{dataset}}/{{model}}/{{training}}/{{variant}}/seed{{seed}}/model.json",
    log:
        f"{RESULTS}/logs/sensitivity/train/{{dataset}}/{{model}}/{{training}}/{{variant}}/seed{{seed}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/sensitivity/train/{{dataset}}/{{model}}/{{training}}/{{variant}}/seed{{seed}}.tsv"
    threads: gpu_rule_threads(config, "train_sensitivity_model")
    resources:
        **gpu_rule_resources(config, "train_sensitivity_model"),
    params:
        objective=lambda wc: as_json(
            sensitivity.objective_overrides(
                config,
                SENSITIVITY_MODELS[(wc.training, wc.dataset, wc.model, wc.variant)],
            )
        ),
        checkpoint=f"{RESULTS}/resume/sensitivity/models/{{dataset}}/{{model}}/{{training}}/{{variant}}/seed{{seed}}.pt",


rule modularize_sensitivity:
    input:
        weights=lambda wc: sensitivity_weights(sensitivity_point(wc), wc.seed),
        st=st_model_weights,
        references=sensitivity_references,
        # the study's model's sweep: CNNSplitter's points vary decomposition settings only
        layer_sensitivity=lambda wc: layer_sensitivity_input(
            wc.approach,
            sensitivity.approach_overrides(config, sensitivity_point(wc)),
            wc,
        ),
        split=rules.split_dataset.output,
    output:
        modules=f"{RESULTS}/sensitivity/modules/{{dataset}}/{{model}}/{{approach}}/{{variant}}/seed{{seed}}/modules.safetensors",
        meta=f"{RESULTS}/sensitivity/modules/{{dataset}}/{{model}}/{{approach}}/{{variant}}/seed{{seed}}/modules.json",
        metrics=f"{RESULTS}/sensitivity/modules/{{dataset}}/{{model}}/{{approach}}/{{variant}}/seed{{seed}}/metrics.json",
    log:
        f"{RESULTS}/logs/sensitivity/modularize/{{dataset}}/{{model}}/{{approach}}/{{variant}}/seed{{seed}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/sensitivity/modularize/{{dataset}}/{{model}}/{{approach}}/{{variant}}/seed{{seed}}.tsv"
    priority: PRIORITY["search"]
    conda:
        "../../environment.yml"
    threads: gpu_rule_threads(config, "modularize_sensitivity")
    resources:
        **gpu_rule_resources(config, "modularize_sensitivity"),
    params:
        data_root=lambda wc, input: data_root(input.split[0]),
        hyperparameters=lambda wc: as_json(
            sensitivity.approach_overrides(config, sensitivity_point(wc))
        ),
        references=lambda wc, input: " ".join(
            f"--reference {name}={path}"
            for name, path in zip(sensitivity_reference_names(wc), input.references)
        ),
        layer_sensitivity=lambda wc, input: layer_sensitivity_argument(input),
        # Outside the declared outputs: Snakemake does not delete it when a killed job reruns.
        checkpoint=f"{RESULTS}/resume/sensitivity/modules/{{dataset}}/{{model}}/{{approach}}/{{variant}}/seed{{seed}}.pt",
    shell:
        "dnnmod modularize --approach {wildcards.approach} --model {input.weights} "
        "--hyperparameters {params.hyperparameters:q} {params.references} {params.layer_sensitivity} --seed {wildcards.seed} --data-root {params.data_root} "
        "--threads {threads} --checkpoint {params.checkpoint} --out {output.modules} "
        "--metrics {output.metrics} --st-model {input.st} 2> {log}"


rule table_sensitivity:
    input:
        [
            str(Path(sensitivity_modules(point, seed)).with_name("metrics.json"))
            for point, seed in sensitivity_units()
        ],
    output:
        csv=report(
            f"{RESULTS}/tables/e7_sensitivity.csv",
            caption="../report/e7_sensitivity.rst",
            category="E7 sensitivity",
        ),
        summary_csv=f"{RESULTS}/tables/e7_sensitivity_summary.csv",
        markdown=f"{RESULTS}/tables/e7_sensitivity.md",
        latex=f"{RESULTS}/tables/e7_sensitivity.tex",
        metrics=f"{RESULTS}/metrics/e7_sensitivity.json",
    log:
        f"{RESULTS}/logs/report/e7_sensitivity.log",
    benchmark:
        f"{RESULTS}/benchmarks/report/e7_sensitivity.tsv"
    conda:
        "../../environment.yml"
    resources:
        **LIGHT_JOB,
    params:
        points=as_json([point.record(seed) for point, seed in sensitivity_units()]),
    shell:
        "dnnmod sensitivity table --points {params.points:q} --metrics {input} "
        "--out {output.csv} --summary {output.metrics} 2> {log}"


rule figure_sensitivity:
    input:
        rules.table_sensitivity.output.csv,
    output:
        figure=report(
            f"{RESULTS}/figures/e7_sensitivity.png",
            caption="../report/e7_sensitivity_figure.rst",
            category="E7 sensitivity",
        ),
        pdf=f"{RESULTS}/figures/e7_sensitivity.pdf",
    log:
        f"{RESULTS}/logs/report/e7_sensitivity_figure.log",
    benchmark:
        f"{RESULTS}/benchmarks/report/e7_sensitivity_figure.tsv"
    conda:
        "../../environment.yml"
    resources:
        **LIGHT_JOB,
    shell:
        "dnnmod sensitivity figure --table {input} --out {output.figure} 2> {log}"


rule figure_ga_convergence:
    input:
        training_curve_inputs("ga_convergence"),
    output:
        figure=report(
            f"{RESULTS}/figures/e7_ga_convergence.png",
            caption="../report/e7_ga_convergence.rst",
            category="E7 sensitivity",
        ),
        pdf=f"{RESULTS}/figures/e7_ga_convergence.pdf",
    log:
        f"{RESULTS}/logs/report/e7_ga_convergence.log",
    benchmark:
        f"{RESULTS}/benchmarks/report/e7_ga_convergence.tsv"
    conda:
        "../../environment.yml"
    resources:
        **LIGHT_JOB,
    params:
        verb="ga-convergence",
    shell:
        "dnnmod curves {params.verb} --inputs {input} --out {output.figure} 2> {log}"


use rule figure_ga_convergence as figure_mask_training with:
    input:
        training_curve_inputs("mask_training"),
    output:
        figure=report(
            f"{RESULTS}/figures/e7_mask_training.png",
            caption="../report/e7_mask_training.rst",
            category="E7 sensitivity",
        ),
        pdf=f"{RESULTS}/figures/e7_mask_training.pdf",
    log:
        f"{RESULTS}/logs/report/e7_mask_training.log",
    benchmark:
        f"{RESULTS}/benchmarks/report/e7_mask_training.tsv"
    params:
        verb="mask-training",


use rule figure_ga_convergence as figure_modular_training with:
    input:
        training_curve_inputs("modular_training"),
    output:
        figure=report(
            f"{RESULTS}/figures/e7_modular_training.png",
            caption="../report/e7_modular_training.rst",
            category="E7 sensitivity",
        ),
        pdf=f"{RESULTS}/figures/e7_modular_training.pdf",
    log:
        f"{RESULTS}/logs/report/e7_modular_training.log",
    benchmark:
        f"{RESULTS}/benchmarks/report/e7_modular_training.tsv"
    params:
        verb="modular-training",
