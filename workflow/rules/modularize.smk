rule modularize:
    input:
        weights=decomposed_model,
        references=reference_module_sets,
        layer_sensitivity=lambda wc: layer_sensitivity_input(
            wc.approach,
            modularization_hyperparameters(config, wc.approach, wc.dataset, wc.model),
            wc,
        ),
        split=rules.split_dataset.output,
    output:
        modules=f"{RESULTS}/modules/{{dataset}}/{{model}}/{{approach}}/seed{{seed}}/modules.safetensors",
        meta=f"{RESULTS}/modules/{{dataset}}/{{model}}/{{approach}}/seed{{seed}}/modules.json",
    log:
        f"{RESULTS}/logs/modularize/{{dataset}}/{{model}}/{{approach}}/seed{{seed}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/modularize/{{dataset}}/{{model}}/{{approach}}/seed{{seed}}.tsv"
    priority: PRIORITY["search"]
    conda:
        "../../environment.yml"
    threads: gpu_rule_threads(config, "modularize")
    resources:
        **gpu_rule_resources(config, "modularize"),
    params:
        data_root=lambda wc, input: data_root(input.split[0]),
        hyperparameters=lambda wc: as_json(
            modularization_hyperparameters(config, wc.approach, wc.dataset, wc.model)
        ),
        references=lambda wc, input: " ".join(
            f"--reference {name}={path}"
            for name, path in zip(references_of(wc.approach), input.references)
        ),
        layer_sensitivity=lambda wc, input: layer_sensitivity_argument(input),
        # Outside the declared outputs: Snakemake does not delete it when a killed job reruns.
        checkpoint=f"{RESULTS}/resume/modules/{{dataset}}/{{model}}/{{approach}}/seed{{seed}}.pt",
    shell:
        "dnnmod modularize --approach {wildcards.approach} --model {input.weights} "
        "--hyperparameters {params.hyperparameters:q} {params.references} {params.layer_sensitivity} --seed {wildcards.seed} --data-root {params.data_root} "
        "--threads {threads} --checkpoint {params.checkpoint} --out {output.modules} 2> {log}"


rule evaluate_modules:
    input:
        modules=rules.modularize.output.modules,
        weights=rules.modularize.input.weights,
        st=st_model_weights,
        split=rules.split_dataset.output,
    output:
        f"{RESULTS}/modules/{{dataset}}/{{model}}/{{approach}}/seed{{seed}}/metrics.json",
    log:
        f"{RESULTS}/logs/evaluate_modules/{{dataset}}/{{model}}/{{approach}}/seed{{seed}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate_modules/{{dataset}}/{{model}}/{{approach}}/seed{{seed}}.tsv"
    conda:
        "../../environment.yml"
    threads: gpu_rule_threads(config, "evaluate_modules")
    resources:
        **gpu_rule_resources(config, "evaluate_modules"),
    params:
        data_root=lambda wc, input: data_root(input.split[0]),
    shell:
        "dnnmod evaluate-modules --modules {input.modules} --model {input.weights} "
        "--st-model {input.st} --data-root {params.data_root} --out {output} 2> {log}"
