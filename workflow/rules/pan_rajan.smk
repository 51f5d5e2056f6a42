# Pan & Rajan's decomposition cost (their Table 1): top-1/top-5 of the model and of the
# composed modules, and the model-module Jaccard index, per module set; the table is a
# separate rule over the per-module-set records.


rule evaluate_decomposition:
    input:
        modules=rules.modularize.output.modules,
        weights=decomposed_model,
        split=rules.split_dataset.output,
    output:
        f"{RESULTS}/modules/{{dataset}}/{{model}}/{{approach}}/seed{{seed}}/decomposition_cost.json",
    log:
        f"{RESULTS}/logs/evaluate_decomposition/{{dataset}}/{{model}}/{{approach}}/seed{{seed}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate_decomposition/{{dataset}}/{{model}}/{{approach}}/seed{{seed}}.tsv"
    conda:
        "../../environment.yml"
    threads: gpu_rule_threads(config, "evaluate_decomposition")
    resources:
        **gpu_rule_resources(config, "evaluate_decomposition"),
    params:
        data_root=lambda wc, input: data_root(input.split[0]),
    shell:
        "dnnmod evaluate-decomposition --modules {input.modules} --model {input.weights} "
        "--data-root {params.data_root} --out {output} 2> {log}"


rule table_pan_rajan:
    input:
        pan_rajan_costs(),
    output:
        csv=report(
            f"{RESULTS}/tables/pan_rajan_decomposition.csv",
            caption="../report/pan_rajan_decomposition.rst",
            category="Pan & Rajan decomposition",
        ),
        summary_csv=f"{RESULTS}/tables/pan_rajan_decomposition_summary.csv",
        markdown=f"{RESULTS}/tables/pan_rajan_decomposition.md",
        metrics=f"{RESULTS}/metrics/pan_rajan_decomposition.json",
    log:
        f"{RESULTS}/logs/report/pan_rajan_decomposition.log",
    benchmark:
        f"{RESULTS}/benchmarks/report/pan_rajan_decomposition.tsv"
    conda:
        "../../environment.yml"
    resources:
        **LIGHT_JOB,
    shell:
        "dnnmod table pan-rajan --costs {input} --out {output.csv} "
        "--summary {output.metrics} 2> {log}"
