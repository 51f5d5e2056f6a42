# Data helpers (data.smk): where a prepared dataset's files live, what a derived task reads.

from pathlib import Path


def data_root(path):
    """The data root of a data/<dataset>/<file> or data/<dataset>/splits/<file> path."""
    path = Path(path)
    return str(path.parents[2] if path.parent.name == "splits" else path.parents[1])


def task_sources(wildcards):
    """The prepared images of the datasets a derived task draws from."""
    spec = TASKS[wildcards.task]
    sources = [f"{DATA}/{part['dataset']}/images.safetensors" for part in spec["parts"]]
    if "dirichlet" in spec:  # drawn from a training split (E4's Dirichlet pool members)
        sources += [
            f"{DATA}/{part['dataset']}/splits/seed{spec['dirichlet']['split_seed']}.safetensors"
            for part in spec["parts"]
        ]
    return list(dict.fromkeys(sources))
