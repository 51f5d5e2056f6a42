# dnnmod: modularize CNNs and reuse their modules, from data to report.
# Default config = the paper scale; `--configfile config/demo.yaml` runs the embedded study.


from snakemake.utils import min_version, validate

min_version("9.0")


# A --configfile given on the command line replaces the paper config instead of being merged
# into it, so a study never inherits keys from another scale.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


validate(config, "workflow/schemas/config.schema.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/helpers/data.smk"
include: "workflow/rules/helpers/training.smk"
include: "workflow/rules/helpers/modularization.smk"
include: "workflow/rules/helpers/reuse.smk"
include: "workflow/rules/helpers/report.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/modularize.smk"
include: "workflow/rules/cnnsplitter.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/reuse_patching.smk"
include: "workflow/rules/reuse_newtask.smk"
include: "workflow/rules/reuse_subtasks.smk"
include: "workflow/rules/pan_rajan.smk"
include: "workflow/rules/reuse_replacement.smk"
include: "workflow/rules/sensitivity.smk"


rule all:
    default_target: True
    input:
        all_outputs(),


# On a cluster, jobs without a GPU run on the host that runs Snakemake unless the config sends
# them to a partition of their own (resources.light.partition; dnnmod.job_resources).
if not LIGHT_JOB:
    workflow.localrules(
        *(rule.name for rule in workflow.rules if "gpu" not in rule.resources)
    )
