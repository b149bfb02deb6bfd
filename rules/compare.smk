# Opt-in target `snakemake compare`: the spread of the report's AUROC tables over the runs in
# config compare.runs (e.g. toy-world seeds), each built first by its own `--config run=NAME` run.
# results/compare/ is shared by every run, so it is not inside results/{run}/.
COMPARE_RUNS = config["compare"]["runs"]


rule compare_runs:
    input:
        [f"results/{r}/report/report.json" for r in COMPARE_RUNS],
    output:
        "results/compare/manifest.json",
    params:
        cfg=slice_json("compare"),
        reports=" ".join(f"--report {r}=results/{r}/report/report.json" for r in COMPARE_RUNS),
    conda:
        ENV
    log:
        "results/logs/compare_runs.log",
    shell:
        "python {SCRIPTS}/compare_runs.py {params.reports} --out results/compare --params {params.cfg:q} > {log} 2>&1"


rule compare:
    input:
        "results/compare/manifest.json",
