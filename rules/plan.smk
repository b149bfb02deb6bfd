# `snakemake plan`: what this config will cost (tokens, disk per artifact, peak memory, GPU-hours) and what
# will not fit the Slurm profile, before any job runs (mmsae/plan.py). Reads the model's config.json and the
# data set's first rows only: no GPU, no weights. Not part of the default target.
import json as _json


rule plan:
    localrule: True  # seconds on the login node: never a cluster job
    output:
        md=f"{RESULTS}/plan/plan.md",
        json=f"{RESULTS}/plan/plan.json",
    params:
        config=lambda wc: _json.dumps(config, sort_keys=True, default=str),
        out=f"{RESULTS}/plan",
        profile=f"{workflow.basedir}/profiles/slurm/config.yaml",
    conda:
        ENV
    log:
        f"{RESULTS}/logs/plan.log",
    shell:
        "python -m mmsae.plan --config-json {params.config:q} --profile {params.profile:q} --out {params.out} > {log} 2>&1"
