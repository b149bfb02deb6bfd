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
