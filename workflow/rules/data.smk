rule prepare_dataset:
    output:
        images=f"{DATA}/{{dataset}}/images.safetensors",
        meta=f"{DATA}/{{dataset}}/meta.json",
    params:
        spec=lambda wc: as_json(config["datasets"][wc.dataset]),
    log:
        f"{RESULTS}/logs/data/{{dataset}}/prepare.log",
    benchmark:
        f"{RESULTS}/benchmarks/data/{{dataset}}/prepare.tsv"
    shell:
        "dnnmod data prepare --dataset {wildcards.dataset} --root {DATA} "
        "--spec {params.spec:q} 2> {log}"


rule split_dataset:
    input:
        rules.prepare_dataset.output.images,
    output:
        f"{DATA}/{{dataset}}/splits/seed{{seed}}.safetensors",
    params:
        validation_fraction=config["data"]["validation_fraction"],
    log:
        f"{RESULTS}/logs/data/{{dataset}}/split_seed{{seed}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/data/{{dataset}}/split_seed{{seed}}.tsv"
    shell:
        "dnnmod data split --dataset {wildcards.dataset} --root {DATA} --seed {wildcards.seed} "
        "--validation-fraction {params.validation_fraction} 2> {log}"
