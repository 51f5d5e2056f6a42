# CNNSplitter's layer sensitivity sweep, as its authors ran it before choosing each model's keep
# ratios (layer_sensitivity_analyzer.py): every conv layer alone pruned to r = 0.1, ..., 1.0 of
# its kernels in every module, the modules composed on the validation images the search scores.
# A search with keep_ratios: sweep derives its sensitive layers and keep ratios from it
# (dnnmod.approaches.cnnsplitter.keep_ratios_from_sweep); modularize then depends on it.


rule cnnsplitter_layer_sensitivity:
    input:
        weights=lambda wc: model_weights(
            wc.dataset, wc.model, training_of("cnnsplitter"), wc.seed
        ),
        split=rules.split_dataset.output,
    output:
        cnnsplitter_sweep_path("{dataset}", "{model}", "{seed}"),
    log:
        f"{RESULTS}/logs/cnnsplitter_layer_sensitivity/{{dataset}}/{{model}}/seed{{seed}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/cnnsplitter_layer_sensitivity/{{dataset}}/{{model}}/seed{{seed}}.tsv"
    priority: PRIORITY["search"]
    conda:
        "../../environment.yml"
    threads: gpu_rule_threads(config, "cnnsplitter_layer_sensitivity")
    resources:
        **gpu_rule_resources(config, "cnnsplitter_layer_sensitivity"),
    params:
        data_root=lambda wc, input: data_root(input.split[0]),
        hyperparameters=lambda wc: as_json(
            modularization_hyperparameters(config, "cnnsplitter", wc.dataset, wc.model)
        ),
    shell:
        "dnnmod cnnsplitter-sweep --model {input.weights} "
        "--hyperparameters {params.hyperparameters:q} --seed {wildcards.seed} "
        "--data-root {params.data_root} --threads {threads} --out {output} 2> {log}"
