# E5 sub-task reuse (reuse.subtasks in config): every module set of the study, scored on every
# sub-task of its classes (sizes 2..N, or a seeded sample); the table and the figure are
# separate rules over the per-unit tables.


rule reuse_subtasks:
    input:
        modules=rules.modularize.output.modules,
        weights=decomposed_model,
        st=st_model_weights,
        split=rules.split_dataset.output,
    output:
        csv=f"{RESULTS}/reuse/subtasks/{{dataset}}/{{model}}/{{approach}}/seed{{seed}}/subtasks.csv",
        record=f"{RESULTS}/reuse/subtasks/{{dataset}}/{{model}}/{{approach}}/seed{{seed}}/subtasks.json",
    log:
        f"{RESULTS}/logs/subtasks/{{dataset}}/{{model}}/{{approach}}/seed{{seed}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/subtasks/{{dataset}}/{{model}}/{{approach}}/seed{{seed}}.tsv"
    priority: PRIORITY["search"]
    conda:
        "../../environment.yml"
    threads: gpu_rule_threads(config, "reuse_subtasks")
    resources:
        **gpu_rule_resources(config, "reuse_subtasks"),
    params:
        data_root=lambda wc, input: data_root(input.split[0]),
        settings=lambda wc: as_json(subtask_settings(wc.approach)),
    shell:
        "dnnmod reuse subtasks --modules {input.modules} --model {input.weights} "
        "--st-model {input.st} --settings {params.settings:q} --data-root {params.data_root} "
        "--threads {threads} --out {output.csv} 2> {log}"


rule table_subtask_reuse:
    input:
        subtask_tables(),
    output:
        csv=report(
            f"{RESULTS}/tables/e5_subtask_reuse.csv",
            caption="../report/e5_subtask_reuse.rst",
            category="E5 sub-task reuse",
        ),
        summary_csv=f"{RESULTS}/tables/e5_subtask_reuse_summary.csv",
        markdown=f"{RESULTS}/tables/e5_subtask_reuse.md",
        metrics=f"{RESULTS}/metrics/e5_subtask_reuse.json",
    log:
        f"{RESULTS}/logs/report/e5_subtask_reuse.log",
    benchmark:
        f"{RESULTS}/benchmarks/report/e5_subtask_reuse.tsv"
    conda:
        "../../environment.yml"
    resources:
        **LIGHT_JOB,
    shell:
        "dnnmod reuse subtasks-table --subtasks {input} --out {output.csv} "
        "--metrics {output.metrics} 2> {log}"


rule figure_subtask_reuse:
    input:
        subtask_tables(),
    output:
        png=report(
            f"{RESULTS}/figures/e5_subtask_reuse.png",
            caption="../report/e5_subtask_reuse_figure.rst",
            category="E5 sub-task reuse",
        ),
        pdf=f"{RESULTS}/figures/e5_subtask_reuse.pdf",
    log:
        f"{RESULTS}/logs/report/e5_subtask_reuse_figure.log",
    benchmark:
        f"{RESULTS}/benchmarks/report/e5_subtask_reuse_figure.tsv"
    conda:
        "../../environment.yml"
    resources:
        **LIGHT_JOB,
    shell:
        "dnnmod reuse subtasks-figure --subtasks {input} --out {output.png} 2> {log}"
