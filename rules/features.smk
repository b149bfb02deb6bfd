# features.weights_on: corpus: the weights from the SAE corpus's codes (--corpus-encode, --corpus-extract);
# otherwise the rule is the one of before, so finished features folders are not rerun.
WEIGHTS_ON_CORPUS = config["features"]["weights_on"] == "corpus"


def _corpus_args(wc):
    folders = parent_folders("features", variant_of("features", wc.folder))
    return " ".join(f"--{name.replace('_', '-')} {folders[name]}" for name in CORPUS_PARENTS)


rule features:
    input:
        unpack(variant_inputs("features")),
    output:
        f"{RESULTS}/{{folder}}/manifest.json",
    wildcard_constraints:
        folder=r"features-[0-9a-f]{8}",
    params:
        # the hashed slice: without the weights keys at their defaults, as before them (the stage fills them)
        cfg=json.dumps(hashed_params("features"), sort_keys=True),
        extract=variant_dir("features", "extract"),
        encode=variant_dir("features", "encode"),
        **({"corpus": _corpus_args} if WEIGHTS_ON_CORPUS else {}),
        out=lambda wc: f"{RESULTS}/{wc.folder}",
    conda:
        ENV
    log:
        f"{RESULTS}/logs/{{folder}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/{{folder}}.tsv"
    shell:
        "python {SCRIPTS}/features.py --encode {params.encode} --extract {params.extract} --out {params.out}"
        + (" {params.corpus}" if WEIGHTS_ON_CORPUS else "")
        + " --params {params.cfg:q} > {log} 2>&1"
