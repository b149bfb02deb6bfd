# The benchmark stage: every fine-tuned arm (rules/finetune.smk) and the starting model, evaluated on
# the toy world's held-out questions or LLaVA-Bench (mmsae/evaluation/benchmarks.py,
# mmsae/evaluation/llava_bench.py).
# {benchmark folder: (model to evaluate, manifest of the artifact that made it, if any)}
_START = (model_path(), manifest("toy_model") if TOY_MODEL else None)
BENCHMARKS = {
    stage_dirname("benchmark", {**config["benchmark"], "model": key}, [model]): (model, made_by)
    for key, (model, made_by) in {
        "start": _START, **{f: (f"{RESULTS}/{f}/model", f"{RESULTS}/{f}/manifest.json") for f in ARMS}
    }.items()
}
BENCH_OF = {model: folder for folder, (model, _) in BENCHMARKS.items()}


rule benchmark:
    input:
        lambda wc: [m for m in BENCHMARKS[wc.folder][1:] if m],
    output:
        f"{RESULTS}/{{folder}}/manifest.json",
    wildcard_constraints:
        folder=r"benchmark-[0-9a-f]{8}",
    params:
        cfg=slice_json("benchmark"),
        model_cfg=slice_json("model"),
        model=lambda wc: BENCHMARKS[wc.folder][0],
        heldout=f"--toy-heldout {stage_dir('toyworld')}/heldout.parquet" if TOY_DATA else "",
        out=lambda wc: f"{RESULTS}/{wc.folder}",
    conda:
        ENV
    log:
        f"{RESULTS}/logs/{{folder}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/{{folder}}.tsv"
    shell:
        "python {SCRIPTS}/benchmark.py --model {params.model:q} --model-params {params.model_cfg:q}"
        " {params.heldout} --out {params.out} --params {params.cfg:q} > {log} 2>&1"
