# Opt-in target `snakemake study` (`make study`): the filtering curve over the runs in config study.runs
# (e.g. toy-world seeds; study.dpo_runs: a DPO block), each built first by its own `--config run=NAME`
# run, read from its stable report address (the report carries the curve's arms and the AUROCs).
# results/study/ is shared by every run, so it is not inside results/{run}/.
STUDY_RUNS = config["study"]["runs"]
STUDY_DPO = config["study"]["dpo_runs"]


rule study_runs:
    input:
        [f"results/{r}/report/report.json" for r in [*STUDY_RUNS, *STUDY_DPO]],
    output:
        "results/study/manifest.json",
    params:
        cfg=slice_json("study"),
        reports=" ".join([*(f"--run {r}=results/{r}/report/report.json" for r in STUDY_RUNS),
                          *(f"--dpo {r}=results/{r}/report/report.json" for r in STUDY_DPO)]),
    conda:
        ENV
    log:
        "results/logs/study.log",
    shell:
        "python {SCRIPTS}/study.py {params.reports} --out results/study --params {params.cfg:q} > {log} 2>&1"


rule study:
    input:
        "results/study/manifest.json",
