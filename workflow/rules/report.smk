rule table_base_models:
    input:
        base_model_weights(),
    output:
        csv=report(
            f"{RESULTS}/tables/e1_base_models.csv",
            caption="../report/e1_base_models.rst",
            category="E1 base models",
        ),
        markdown=f"{RESULTS}/tables/e1_base_models.md",
        metrics=f"{RESULTS}/metrics/e1_base_models.json",
    log:
        f"{RESULTS}/logs/report/e1_base_models.log",
    benchmark:
        f"{RESULTS}/benchmarks/report/e1_base_models.tsv"
    conda:
        "../../environment.yml"
    shell:
        "dnnmod table base-models --models {input} --out {output.csv} "
        "--metrics {output.metrics} 2> {log}"
