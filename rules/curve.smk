# The filtering curve: gathers every arm's fine-tuned model (rules/finetune.smk) and its benchmark
# (rules/benchmark.smk) into one table and plot.
rule curve:
    input:
        **inputs("curve"),
        arms=[f"{RESULTS}/{folder}/manifest.json" for folder in ARMS],
        benchmarks=[f"{RESULTS}/{folder}/manifest.json" for folder in BENCHMARKS],
    output:
        manifest("curve"),
    params:
        cfg=slice_json("curve"),
        samples=stage_dir("sample"),
        start=f"{RESULTS}/{BENCH_OF[model_path()]}",
        arms=" ".join(
            f"--arm {m} {f} {'-' if s is None else s} {RESULTS}/{folder} {RESULTS}/{BENCH_OF[f'{RESULTS}/{folder}/model']}"
            for folder, (m, f, s) in ARMS.items()
        ),
        out=stage_dir("curve"),
    conda:
        ENV
    log:
        log_file("curve"),
    benchmark:
        bench_file("curve")
    shell:
        "python {SCRIPTS}/curve.py --samples {params.samples} --start {params.start} {params.arms}"
        " --out {params.out} --params {params.cfg:q} > {log} 2>&1"
