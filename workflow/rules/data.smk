# A dataset and a task live in the same layout (data/<name>/...): each rule claims only its
# own names, so a task is derived, never prepared.
rule prepare_dataset:
    output:
        images=f"{DATA}/{{dataset}}/images.safetensors",
        meta=f"{DATA}/{{dataset}}/meta.json",
    log:
        f"{RESULTS}/logs/data/{{dataset}}/prepare.log",
    benchmark:
        f"{RESULTS}/benchmarks/data/{{dataset}}/prepare.tsv"
    wildcard_constraints:
        dataset="|".join(config["datasets"]),
    priority: PRIORITY["data"]
    conda:
        "../../environment.yml"
    resources:
        **LIGHT_JOB,
    params:
        root=lambda wc, output: data_root(output.meta),
        spec=lambda wc: as_json(config["datasets"][wc.dataset]),
    shell:
        "dnnmod data prepare --dataset {wildcards.dataset} --root {params.root} "
        "--spec {params.spec:q} 2> {log}"


rule split_dataset:
    input:
        rules.prepare_dataset.output.images,
    output:
        f"{DATA}/{{dataset}}/splits/seed{{seed}}.safetensors",
    log:
        f"{RESULTS}/logs/data/{{dataset}}/split_seed{{seed}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/data/{{dataset}}/split_seed{{seed}}.tsv"
    priority: PRIORITY["data"]
    conda:
        "../../environment.yml"
    resources:
        **LIGHT_JOB,
    params:
        root=lambda wc, input: data_root(input[0]),
        validation_fraction=config["data"]["validation_fraction"],
    shell:
        "dnnmod data split --dataset {wildcards.dataset} --root {params.root} "
        "--seed {wildcards.seed} "
        "--validation-fraction {params.validation_fraction} 2> {log}"


# Tasks: class subsets and unions of prepared datasets, written as one more dataset.


rule derive_task:
    input:
        task_sources,
    output:
        images=f"{DATA}/{{task}}/images.safetensors",
        meta=f"{DATA}/{{task}}/meta.json",
    log:
        f"{RESULTS}/logs/data/{{task}}/derive.log",
    benchmark:
        f"{RESULTS}/benchmarks/data/{{task}}/derive.tsv"
    wildcard_constraints:
        task="|".join(TASKS) or "(?!)",  # no tasks: matches nothing
    priority: PRIORITY["data"]
    conda:
        "../../environment.yml"
    resources:
        **LIGHT_JOB,
    params:
        root=lambda wc, output: data_root(output.meta),
        spec=lambda wc: as_json(TASKS[wc.task]),
    shell:
        "dnnmod data derive --task {wildcards.task} --root {params.root} "
        "--spec {params.spec:q} 2> {log}"
