# Extraction: one job (extract.shards = 1), or one job per contiguous slice of the samples
# (extract_shard, in parallel) and a gather that writes the artifact's token index and manifest.
EXTRACT_SHARDS = config["extract"]["shards"]
EXTRACT_ARGS = (
    "--samples {params.samples} --model {params.model:q} --model-params {params.model_cfg:q}"
    " --out {params.out} --params {params.cfg:q}"
)


def extract_shard_manifests(wc):
    return [f"{RESULTS}/{wc.folder}/shards/{k:04d}/manifest.json" for k in range(EXTRACT_SHARDS)]


# The extraction of every data source (the pool `data`, the SAE corpus, each of `pools`), by folder name.
EXTRACT_PARAMS = dict(
    cfg=slice_json("extract"),
    model_cfg=slice_json("model"),
    model=model_path(),
    samples=variant_dir("extract", "sample"),
    out=lambda wc: f"{RESULTS}/{wc.folder}",
)
EXTRACT_FOLDER = r"extract-[0-9a-f]{8}"


if EXTRACT_SHARDS == 1:

    rule extract:
        input:
            unpack(variant_inputs("extract")),
        output:
            f"{RESULTS}/{{folder}}/manifest.json",
        wildcard_constraints:
            folder=EXTRACT_FOLDER,
        params:
            **EXTRACT_PARAMS,
        conda:
            ENV
        log:
            f"{RESULTS}/logs/{{folder}}.log",
        benchmark:
            f"{RESULTS}/benchmarks/{{folder}}.tsv"
        shell:
            "python {SCRIPTS}/extract.py " + EXTRACT_ARGS + " > {log} 2>&1"

else:

    # A killed shard job's rerun keeps the parts it had finished (mmsae.activations.extract_shard).
    rule extract_shard:
        input:
            unpack(variant_inputs("extract")),
        output:
            f"{RESULTS}/{{folder}}/shards/{{shard}}/manifest.json",
        wildcard_constraints:
            folder=EXTRACT_FOLDER,
            shard=r"\d{4}",
        params:
            **EXTRACT_PARAMS,
            shard=lambda wc: int(wc.shard),
        conda:
            ENV
        log:
            f"{RESULTS}/logs/{{folder}}.shard-{{shard}}.log",
        benchmark:
            f"{RESULTS}/benchmarks/{{folder}}.shard-{{shard}}.tsv"
        shell:
            "python {SCRIPTS}/extract.py " + EXTRACT_ARGS + " --shard {params.shard} > {log} 2>&1"

    rule extract_gather:
        input:
            extract_shard_manifests,
        output:
            f"{RESULTS}/{{folder}}/manifest.json",
        wildcard_constraints:
            folder=EXTRACT_FOLDER,
        params:
            **EXTRACT_PARAMS,
        conda:
            ENV
        log:
            f"{RESULTS}/logs/{{folder}}.log",
        shell:
            "python {SCRIPTS}/extract.py " + EXTRACT_ARGS + " --gather > {log} 2>&1"
