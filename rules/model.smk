rule toy_model:
    input:
        **inputs("toy_model"),
    output:
        manifest("toy_model"),
    params:
        cfg=slice_json("toy_model"),
        toyworld=stage_dir("toyworld"),
        out=stage_dir("toy_model"),
    conda:
        ENV
    # Two threads: the toy model is the demo's critical path and nothing else can run beside it (every
    # later stage needs it); two intra-op threads take a training step from 106 to 65 ms on 2 cores.
    threads: 2
    log:
        log_file("toy_model"),
    benchmark:
        bench_file("toy_model")
    shell:
        "python {SCRIPTS}/toy_model.py --toyworld {params.toyworld} --out {params.out}"
        " --params {params.cfg:q} > {log} 2>&1"


rule model_loss:
    input:
        **inputs("model_loss"),
    output:
        manifest("model_loss"),
    params:
        cfg=slice_json("model_loss"),
        model_cfg=slice_json("model"),
        model=model_path(),
        samples=stage_dir("sample"),
        out=stage_dir("model_loss"),
    conda:
        ENV
    log:
        log_file("model_loss"),
    benchmark:
        bench_file("model_loss")
    shell:
        "python {SCRIPTS}/model_loss.py --samples {params.samples} --model {params.model:q}"
        " --model-params {params.model_cfg:q} --out {params.out} --params {params.cfg:q} > {log} 2>&1"
