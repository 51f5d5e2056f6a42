# E4 new tasks (reuse.new_tasks in config): per setting and approach, class pairs composed from
# the modules chosen by best F1; the same architecture trained from scratch on each pair (a
# derived task, see helpers/reuse.smk); the table and the figure are separate rules.


rule train_new_task_scratch:
    input:
        images=f"{DATA}/{{task}}/images.safetensors",
        split=f"{DATA}/{{task}}/splits/seed{{seed}}.safetensors",
    output:
        weights=f"{RESULTS}/new_tasks/scratch/{{task}}/{{model}}/seed{{seed}}/model.safetensors",
        meta=f"{RESULTS}/new_tasks/scratch/{{task}}/{{model}}/seed{{seed}}/model.json",
    log:
        f"{RESULTS}/logs/new_tasks/scratch/{{task}}/{{model}}/seed{{seed}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/new_tasks/scratch/{{task}}/{{model}}/seed{{seed}}.tsv"
    wildcard_constraints:
        task="|".join(NEW_TASK_PAIRS) or "(?!)",
    priority: PRIORITY["train"]
    conda:
        "../../environment.yml"
    threads: gpu_rule_threads(config, "train_new_task_scratch")
    resources:
        **gpu_rule_resources(config, "train_new_task_scratch"),
    params:
        data_root=lambda wc, input: data_root(input.images),
        arch=lambda wc: model_entry(wc)["arch"],
        width=lambda wc: model_entry(wc).get("width", 1.0),
        options=lambda wc: as_json(model_entry(wc).get("options", {})),
        recipe=lambda wc: as_json(
            config["recipes"][config["reuse"]["new_tasks"]["recipe"]]
        ),
        # Outside the declared outputs: Snakemake does not delete it when a killed job reruns.
        checkpoint=f"{RESULTS}/resume/new_tasks/scratch/{{task}}/{{model}}/seed{{seed}}.pt",
    shell:
        "dnnmod train --dataset {wildcards.task} --model-name {wildcards.model} "
        "--arch {params.arch} --width {params.width} --options {params.options:q} "
        "--recipe {params.recipe:q} --seed {wildcards.seed} --data-root {params.data_root} "
        "--threads {threads} --checkpoint {params.checkpoint} --out {output.weights} 2> {log}"


rule compose_new_tasks:
    input:
        unpack(new_task_inputs),
        # Continuous learning retrains on each pair task's training split of the seed.
        pair_splits=lambda wc: (
            [
                f"{DATA}/{pair.task}/splits/seed{wc.seed}.safetensors"
                for pair in NEW_TASKS[wc.setting].pairs
            ]
            if NEW_TASKS[wc.setting].continuous_learning
            else []
        ),
    output:
        f"{RESULTS}/new_tasks/{{setting}}/{{approach}}/seed{{seed}}/composed.json",
    log:
        f"{RESULTS}/logs/new_tasks/{{setting}}/{{approach}}/seed{{seed}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/new_tasks/{{setting}}/{{approach}}/seed{{seed}}.tsv"
    wildcard_constraints:
        setting="|".join(NEW_TASKS) or "(?!)",
    conda:
        "../../environment.yml"
    threads: gpu_rule_threads(config, "compose_new_tasks")
    resources:
        **gpu_rule_resources(config, "compose_new_tasks"),
    params:
        data_root=lambda wc, input: data_root(input.splits[0]),
        model=lambda wc: NEW_TASKS[wc.setting].model,
        pairs=lambda wc: as_json(
            [pair.to_json() for pair in NEW_TASKS[wc.setting].pairs]
        ),
        candidates=lambda wc, input: " ".join(
            f"--candidate {modules} {weights}"
            for modules, weights in zip(input.modules, input.models)
        ),
        selection_split=lambda wc: config["reuse"]["new_tasks"]["selection_split"],
        # JSON null: the plain composition only.
        continuous_learning=lambda wc: as_json(
            NEW_TASKS[wc.setting].continuous_learning
        ),
    shell:
        "dnnmod reuse new-task --approach {wildcards.approach} --setting {wildcards.setting} "
        "--model {params.model} --pairs {params.pairs:q} {params.candidates} "
        "--selection-split {params.selection_split} "
        "--continuous-learning {params.continuous_learning:q} "
        "--data-root {params.data_root} --out {output} 2> {log}"


rule table_new_tasks:
    input:
        composed=new_task_composed(),
        scratch=new_task_scratch_models(),
    output:
        csv=report(
            f"{RESULTS}/tables/e4_new_tasks.csv",
            caption="../report/e4_new_tasks.rst",
            category="E4 new tasks",
        ),
        summary_csv=f"{RESULTS}/tables/e4_new_tasks_summary.csv",
        markdown=f"{RESULTS}/tables/e4_new_tasks.md",
        latex=f"{RESULTS}/tables/e4_new_tasks.tex",
        metrics=f"{RESULTS}/metrics/e4_new_tasks.json",
    log:
        f"{RESULTS}/logs/report/e4_new_tasks.log",
    benchmark:
        f"{RESULTS}/benchmarks/report/e4_new_tasks.tsv"
    conda:
        "../../environment.yml"
    resources:
        **LIGHT_JOB,
    shell:
        "dnnmod reuse new-task-table --composed {input.composed} --scratch {input.scratch} "
        "--out {output.csv} --metrics {output.metrics} 2> {log}"


rule figure_new_tasks:
    input:
        composed=new_task_composed(),
        scratch=new_task_scratch_models(),
    output:
        png=report(
            f"{RESULTS}/figures/e4_new_tasks.png",
            caption="../report/e4_new_tasks_figure.rst",
            category="E4 new tasks",
        ),
        pdf=f"{RESULTS}/figures/e4_new_tasks.pdf",
    log:
        f"{RESULTS}/logs/report/e4_new_tasks_figure.log",
    benchmark:
        f"{RESULTS}/benchmarks/report/e4_new_tasks_figure.tsv"
    conda:
        "../../environment.yml"
    resources:
        **LIGHT_JOB,
    shell:
        "dnnmod reuse new-task-figure --composed {input.composed} --scratch {input.scratch} "
        "--out {output.png} 2> {log}"
