# Opt-in targets (not in `all`): `snakemake steer` clamps SAE features while the model generates
# (before / after answers, mmsae/steering.py); `snakemake attribute` attributes logit(A) - logit(B) to
# (token, SAE feature) (mmsae/attribution.py). Both use the configured SAE (train_sae).
# steer.concept (a toy-world word) takes its feature from the premise stage (STEER_CONCEPT, common.smk).


rule steer:
    input:
        **inputs("steer"),
    output:
        manifest("steer"),
    params:
        cfg=slice_json("steer"),
        model_cfg=slice_json("model"),
        model=model_path(),
        sae=stage_dir("train_sae"),
        samples=stage_dir("sample"),
        features=stage_dir("features"),
        premise=f"--premise {stage_dir('premise')}" if STEER_CONCEPT else "",
        out=stage_dir("steer"),
    conda:
        ENV
    log:
        log_file("steer"),
    benchmark:
        bench_file("steer")
    shell:
        "python {SCRIPTS}/steer.py --model {params.model:q} --model-params {params.model_cfg:q} --sae {params.sae}"
        " --samples {params.samples} --features {params.features} {params.premise} --out {params.out}"
        " --params {params.cfg:q} > {log} 2>&1"


rule attribute:
    input:
        **inputs("attribute"),
    output:
        manifest("attribute"),
    params:
        cfg=slice_json("attribute"),
        model_cfg=slice_json("model"),
        model=model_path(),
        sae=stage_dir("train_sae"),
        samples=stage_dir("sample"),
        out=stage_dir("attribute"),
    conda:
        ENV
    log:
        log_file("attribute"),
    benchmark:
        bench_file("attribute")
    shell:
        "python {SCRIPTS}/attribute.py --model {params.model:q} --model-params {params.model_cfg:q}"
        " --sae {params.sae} --samples {params.samples} --out {params.out} --params {params.cfg:q} > {log} 2>&1"
