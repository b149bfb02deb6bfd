rule features:
    input:
        unpack(variant_inputs("features")),
    output:
        f"{RESULTS}/{{folder}}/manifest.json",
    wildcard_constraints:
        folder=r"features-[0-9a-f]{8}",
    params:
        cfg=slice_json("features"),
        extract=stage_dir("extract"),
        encode=variant_dir("features", "encode"),
        out=lambda wc: f"{RESULTS}/{wc.folder}",
    conda:
        ENV
    log:
        f"{RESULTS}/logs/{{folder}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/{{folder}}.tsv"
    shell:
        "python {SCRIPTS}/features.py --encode {params.encode} --extract {params.extract} --out {params.out}"
        " --params {params.cfg:q} > {log} 2>&1"


# The method's premise on the toy world: is there one feature for the word "blue" and blue patches?
rule premise:
    input:
        **inputs("premise"),
    output:
        manifest("premise"),
    params:
        cfg=slice_json("premise"),
        samples=stage_dir("sample"),
        extract=stage_dir("extract"),
        encode=stage_dir("encode"),
        model=model_path(),
        out=stage_dir("premise"),
    conda:
        ENV
    log:
        log_file("premise"),
    benchmark:
        bench_file("premise")
    shell:
        "python {SCRIPTS}/premise.py --samples {params.samples} --extract {params.extract}"
        " --encode {params.encode} --model {params.model} --out {params.out} --params {params.cfg:q} > {log} 2>&1"
