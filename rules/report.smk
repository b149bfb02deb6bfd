def _curve_args(wildcards):
    args = f"--baseline-scores {stage_dir('baseline_scores')}"
    return args + (f" --curve {stage_dir('curve')}" if "curve" in PARENTS["report"] else "")


def _toy_args(wildcards):
    if "premise" not in PARENTS["report"]:
        return ""
    return f"--premise {stage_dir('premise')} --toy-model {stage_dir('toy_model')}"


rule report:
    input:
        **inputs("report"),
        layer_scores=[f"{d}/manifest.json" for d in layer_dirs("score").values()],
        baseline_scores=manifest("baseline_scores"),
    output:
        manifest("report"),
    params:
        cfg=slice_json("report"),
        samples=stage_dir("sample"),
        train_sae=stage_dir("train_sae"),
        features=stage_dir("features"),
        score=stage_dir("score"),
        toy=_toy_args,
        curve=_curve_args,
        sae_eval=stage_dir("evaluate_sae"),
        layer_scores=" ".join(f"--layer-score {layer}={d}" for layer, d in layer_dirs("score").items()),
        out=stage_dir("report"),
    conda:
        ENV
    log:
        log_file("report"),
    benchmark:
        bench_file("report")
    shell:
        "python {SCRIPTS}/report.py --samples {params.samples} --train-sae {params.train_sae}"
        " --features {params.features} --score {params.score} {params.toy} --sae-eval {params.sae_eval}"
        " {params.curve}"
        " {params.layer_scores}"
        " --out {params.out} --params {params.cfg:q} > {log} 2>&1"


# A stable address for the newest report of this run: results/{run}/report/index.html.
rule latest_report:
    input:
        manifest("report"),
    output:
        html=f"{RESULTS}/report/index.html",
        json=f"{RESULTS}/report/report.json",
    params:
        src=stage_dir("report"),
    conda:
        ENV
    log:
        f"{RESULTS}/logs/latest_report.log",
    shell:
        "(cp {params.src}/index.html {output.html}.tmp && mv {output.html}.tmp {output.html}"
        " && cp {params.src}/report.json {output.json}.tmp && mv {output.json}.tmp {output.json}) > {log} 2>&1"
