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
