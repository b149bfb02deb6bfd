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


# The pool's model loss, and each of `pools`' (a score method), by folder name.
rule model_loss:
    input:
        unpack(variant_inputs("model_loss")),
    output:
        f"{RESULTS}/{{folder}}/manifest.json",
    wildcard_constraints:
        folder=r"model_loss-[0-9a-f]{8}",
    params:
        cfg=slice_json("model_loss"),
        model_cfg=slice_json("model"),
        model=model_path(),
        samples=variant_dir("model_loss", "sample"),
        out=lambda wc: f"{RESULTS}/{wc.folder}",
    conda:
        ENV
    log:
        f"{RESULTS}/logs/{{folder}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/{{folder}}.tsv"
    shell:
        "python {SCRIPTS}/model_loss.py --samples {params.samples} --model {params.model:q}"
        " --model-params {params.model_cfg:q} --out {params.out} --params {params.cfg:q} > {log} 2>&1"
