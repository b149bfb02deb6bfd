# IFD (and CLIP score with a local CLIP model): the rebuttal's no-SAE baselines, per sample.
rule baseline_scores:
    input:
        **inputs("model_loss"),
    output:
        manifest("baseline_scores"),
    params:
        cfg=slice_json("baseline_scores"),
        model_cfg=slice_json("model"),
        model=model_path(),
        samples=stage_dir("sample"),
        out=stage_dir("baseline_scores"),
    conda:
        ENV
    log:
        log_file("baseline_scores"),
    benchmark:
        bench_file("baseline_scores")
    shell:
        "python {SCRIPTS}/baseline_scores.py --samples {params.samples} --model {params.model:q}"
        " --model-params {params.model_cfg:q} --out {params.out} --params {params.cfg:q} > {log} 2>&1"
