rule train_base_model:
    input:
        images=rules.prepare_dataset.output.images,
        split=rules.split_dataset.output,
    output:
        weights=f"{RESULTS}/models/{{dataset}}/{{model}}/{{training}}/seed{{seed}}/model.safetensors",
        meta=f"{RESULTS}/models/{{dataset}}/{{model}}/{{training}}/seed{{seed}}/model.json",
    log:
        f"{RESULTS}/logs/train/{{dataset}}/{{model}}/{{training}}/seed{{seed}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train/{{dataset}}/{{model}}/{{training}}/seed{{seed}}.tsv"
    wildcard_constraints:
        training="|".join(training_kinds()),
    priority: PRIORITY["train"]
    conda:
        "../../environment.yml"
    threads: gpu_rule_threads(config, "train_base_model")
    resources:
        **gpu_rule_resources(config, "train_base_model"),
    params:
        data_root=lambda wc, input: data_root(input.images),
        arch=lambda wc: model_entry(wc)["arch"],
        width=lambda wc: model_entry(wc).get("width", 1.0),
        options=lambda wc: as_json(model_entry(wc).get("options", {})),
        recipe=lambda wc: as_json(recipe_of(wc)),
        objective=lambda wc: as_json(config["objectives"].get(wc.training, {})),
        # Outside the declared outputs: Snakemake does not delete it when a killed job reruns.
        checkpoint=f"{RESULTS}/resume/models/{{dataset}}/{{model}}/{{training}}/seed{{seed}}.pt",
    shell:
        "dnnmod train --dataset {wildcards.dataset} --model-name {wildcards.model} "
        "--arch {params.arch} --width {params.width} --options {params.options:q} "
        "--recipe {params.recipe:q} --training {wildcards.training} "
        "--objective {params.objective:q} --seed {wildcards.seed} --data-root {params.data_root} "
        "--threads {threads} "
        "--checkpoint {params.checkpoint} --out {output.weights} 2> {log}"
