rule table_base_models:
    input:
        base_model_weights(),
    output:
        csv=report(
            f"{RESULTS}/tables/e1_base_models.csv",
            caption="../report/e1_base_models.rst",
            category="E1 base models",
        ),
        summary_csv=f"{RESULTS}/tables/e1_base_models_summary.csv",
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


rule table_modularization:
    input:
        module_metrics(),
    output:
        csv=report(
            f"{RESULTS}/tables/e2_modularization.csv",
            caption="../report/e2_modularization.rst",
            category="E2 modularization",
        ),
        summary_csv=f"{RESULTS}/tables/e2_modularization_summary.csv",
        markdown=f"{RESULTS}/tables/e2_modularization.md",
        figure=report(
            f"{RESULTS}/figures/e2_accuracy_vs_krr.png",
            caption="../report/e2_accuracy_vs_krr.rst",
            category="E2 modularization",
        ),
        figure_pdf=f"{RESULTS}/figures/e2_accuracy_vs_krr.pdf",
        summary=f"{RESULTS}/metrics/e2_modularization.json",
    log:
        f"{RESULTS}/logs/report/e2_modularization.log",
    benchmark:
        f"{RESULTS}/benchmarks/report/e2_modularization.tsv"
    conda:
        "../../environment.yml"
    shell:
        "dnnmod table modularization --metrics {input} --out {output.csv} "
        "--figure {output.figure} --summary {output.summary} 2> {log}"
