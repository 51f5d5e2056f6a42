# E6 intra-dataset replacement (reuse.replacement): per pair of a weaker and a stronger model
# of one dataset, the weaker model's module set with class k's module swapped for the
# stronger model's, for every k; the table and the figure are separate rules over the
# per-pair records.


rule reuse_replace:
    input:
        weaker_weights=replacement_weights("weaker"),
        weaker_modules=replacement_modules("weaker"),
        stronger_weights=replacement_weights("stronger"),
        stronger_modules=replacement_modules("stronger"),
        split=rules.split_dataset.output,
    output:
        f"{RESULTS}/reuse/replacement/{{dataset}}/{{approach}}/{{weaker}}/{{stronger}}/seed{{seed}}.json",
    log:
        f"{RESULTS}/logs/reuse_replace/{{dataset}}/{{approach}}/{{weaker}}/{{stronger}}/seed{{seed}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/reuse_replace/{{dataset}}/{{approach}}/{{weaker}}/{{stronger}}/seed{{seed}}.tsv"
    wildcard_constraints:
        weaker=r"[a-z0-9_.\-]+",
        stronger=r"[a-z0-9_.\-]+",
    conda:
        "../../environment.yml"
    threads: gpu_rule_threads(config, "reuse_replace")
    resources:
        **gpu_rule_resources(config, "reuse_replace"),
    params:
        data_root=lambda wc, input: data_root(input.split[0]),
    shell:
        "dnnmod reuse replace --weaker-model {input.weaker_weights} "
        "--weaker-modules {input.weaker_modules} --stronger-model {input.stronger_weights} "
        "--stronger-modules {input.stronger_modules} --data-root {params.data_root} "
        "--threads {threads} --out {output} 2> {log}"


rule table_replacement:
    input:
        replacement_records(),
    output:
        csv=report(
            f"{RESULTS}/tables/e6_replacement.csv",
            caption="../report/e6_replacement.rst",
            category="E6 replacement",
        ),
        summary_csv=f"{RESULTS}/tables/e6_replacement_summary.csv",
        markdown=f"{RESULTS}/tables/e6_replacement.md",
        metrics=f"{RESULTS}/metrics/e6_replacement.json",
    log:
        f"{RESULTS}/logs/report/e6_replacement.log",
    benchmark:
        f"{RESULTS}/benchmarks/report/e6_replacement.tsv"
    conda:
        "../../environment.yml"
    resources:
        **LIGHT_JOB,
    shell:
        "dnnmod reuse replace-table --records {input} --out {output.csv} "
        "--summary {output.metrics} 2> {log}"


rule figure_replacement:
    input:
        replacement_records(),
    output:
        png=report(
            f"{RESULTS}/figures/e6_replacement.png",
            caption="../report/e6_replacement_figure.rst",
            category="E6 replacement",
        ),
        pdf=f"{RESULTS}/figures/e6_replacement.pdf",
    log:
        f"{RESULTS}/logs/report/e6_replacement_figure.log",
    benchmark:
        f"{RESULTS}/benchmarks/report/e6_replacement_figure.tsv"
    conda:
        "../../environment.yml"
    resources:
        **LIGHT_JOB,
    shell:
        "dnnmod reuse replace-figure --records {input} --out {output.png} 2> {log}"
