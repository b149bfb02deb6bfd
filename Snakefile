# mmsae: sample -> extract -> train SAE-V -> encode -> features -> score -> report.
# Every stage writes results/{run}/{stage}-{hash}/ where the hash covers the stage's config slice and
# the artifacts it reads; see README.md for the artifact layout.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/model.smk"
include: "rules/extract.smk"
include: "rules/sae.smk"
include: "rules/features.smk"
include: "rules/premise.smk"
include: "rules/score.smk"
include: "rules/baseline_scores.smk"
include: "rules/finetune.smk"
include: "rules/benchmark.smk"
include: "rules/curve.smk"
include: "rules/report.smk"
include: "rules/browser.smk"
include: "rules/patches.smk"
include: "rules/explain.smk"
include: "rules/steer.smk"
include: "rules/compare.smk"
include: "rules/sae_compare.smk"
include: "rules/study.smk"
include: "rules/plan.smk"


rule all:
    input:
        f"{RESULTS}/report/index.html",
        f"{RESULTS}/browser.html",
        *([manifest("patch_filter")] if PATCH_FILTER else []),
        *[manifest("score", source=s) for s in POOLS.values()],  # each of `pools` scored by the run's SAE
    default_target: True
