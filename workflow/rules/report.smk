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
        latex=f"{RESULTS}/tables/e1_base_models.tex",
        metrics=f"{RESULTS}/metrics/e1_base_models.json",
    log:
        f"{RESULTS}/logs/report/e1_base_models.log",
    benchmark:
        f"{RESULTS}/benchmarks/report/e1_base_models.tsv"
    conda:
        "../../environment.yml"
    resources:
        **LIGHT_JOB,
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
        latex=f"{RESULTS}/tables/e2_modularization.tex",
        figure=report(
            f"{RESULTS}/figures/e2_accuracy_vs_krr.png",
            caption="../report/e2_accuracy_vs_krr.rst",
            category="E2 modularization",
        ),
        figure_pdf=f"{RESULTS}/figures/e2_accuracy_vs_krr.pdf",
        summary=f"{RESULTS}/metrics/e2_modularization.json",
        orderings=report(
            f"{RESULTS}/tables/e2_orderings.csv",
            caption="../report/e2_orderings.rst",
            category="E2 modularization",
        ),
        orderings_markdown=f"{RESULTS}/tables/e2_orderings.md",
        orderings_latex=f"{RESULTS}/tables/e2_orderings.tex",
    log:
        f"{RESULTS}/logs/report/e2_modularization.log",
    benchmark:
        f"{RESULTS}/benchmarks/report/e2_modularization.tsv"
    conda:
        "../../environment.yml"
    resources:
        **LIGHT_JOB,
    shell:
        "dnnmod table modularization --metrics {input} --out {output.csv} "
        "--figure {output.figure} --summary {output.summary} "
        "--orderings {output.orderings} 2> {log}"


rule table_cost:
    input:
        # Not read: every other result must exist first, so that every job's benchmark does.
        study_outputs(),
    output:
        csv=report(
            f"{RESULTS}/tables/e8_cost.csv",
            caption="../report/e8_cost.rst",
            category="E8 cost",
        ),
        summary_csv=f"{RESULTS}/tables/e8_cost_summary.csv",
        markdown=f"{RESULTS}/tables/e8_cost.md",
        latex=f"{RESULTS}/tables/e8_cost.tex",
        scenarios=report(
            f"{RESULTS}/tables/e8_scenarios.csv",
            caption="../report/e8_scenarios.rst",
            category="E8 cost",
        ),
        scenarios_markdown=f"{RESULTS}/tables/e8_scenarios.md",
        scenarios_latex=f"{RESULTS}/tables/e8_scenarios.tex",
        figure=report(
            f"{RESULTS}/figures/e8_energy.png",
            caption="../report/e8_energy.rst",
            category="E8 cost",
        ),
        figure_pdf=f"{RESULTS}/figures/e8_energy.pdf",
        metrics=f"{RESULTS}/metrics/e8_cost.json",
    log:
        f"{RESULTS}/logs/report/e8_cost.log",
    benchmark:
        f"{RESULTS}/benchmarks/report/e8_cost.tsv"
    conda:
        "../../environment.yml"
    resources:
        **LIGHT_JOB,
    params:
        results=lambda wc, output: Path(output.metrics).parents[1],
        energy=as_json(config["energy"]),
    shell:
        "dnnmod table cost --results {params.results} --energy {params.energy:q} "
        "--out {output.csv} --scenarios {output.scenarios} --figure {output.figure} "
        "--metrics {output.metrics} 2> {log}"


rule study_report:
    input:
        results=study_outputs(),
        cost=COST_OUTPUTS,
        captions=report_captions(),
    output:
        REPORT_HTML,
    log:
        f"{RESULTS}/logs/report/report_html.log",
    benchmark:
        f"{RESULTS}/benchmarks/report/report_html.tsv"
    conda:
        "../../environment.yml"
    resources:
        **LIGHT_JOB,
    params:
        results=lambda wc, output: Path(output[0]).parent,
        config=as_json(config),
    shell:
        "dnnmod report html --results {params.results} --captions workflow/report "
        "--config {params.config:q} --out {output} 2> {log}"
