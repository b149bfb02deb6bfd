# The method's premise on the toy world: is there one feature for the word "blue" and blue patches?
# One rule for the run's SAE and for each SAE of sae_compare (its own encode), told apart by folder name.
rule premise:
    input:
        unpack(variant_inputs("premise")),
    output:
        f"{RESULTS}/{{folder}}/manifest.json",
    wildcard_constraints:
        folder=r"premise-[0-9a-f]{8}",
    params:
        cfg=slice_json("premise"),
        samples=variant_dir("premise", "sample"),
        extract=variant_dir("premise", "extract"),
        encode=variant_dir("premise", "encode"),
        model=model_path(),
        out=lambda wc: f"{RESULTS}/{wc.folder}",
    conda:
        ENV
    log:
        f"{RESULTS}/logs/{{folder}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/{{folder}}.tsv"
    shell:
        "python {SCRIPTS}/premise.py --samples {params.samples} --extract {params.extract}"
        " --encode {params.encode} --model {params.model} --out {params.out} --params {params.cfg:q} > {log} 2>&1"
