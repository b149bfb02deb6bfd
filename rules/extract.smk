# Extraction: one job (extract.shards = 1), or one job per contiguous slice of the samples
# (extract_shard, in parallel) and a gather that writes the artifact's token index and manifest.
EXTRACT_SHARDS = config["extract"]["shards"]
EXTRACT_ARGS = (
    "--samples {params.samples} --model {params.model:q} --model-params {params.model_cfg:q}"
    " --out {params.out} --params {params.cfg:q}"
)


def extract_shard_manifests():
    return [f"{stage_dir('extract')}/shards/{k:04d}/manifest.json" for k in range(EXTRACT_SHARDS)]


if EXTRACT_SHARDS == 1:

    rule extract:
        input:
            **inputs("extract"),
        output:
            manifest("extract"),
        params:
            cfg=slice_json("extract"),
            model_cfg=slice_json("model"),
            model=model_path(),
            samples=stage_dir("sample"),
            out=stage_dir("extract"),
        conda:
            ENV
        log:
            log_file("extract"),
        benchmark:
            bench_file("extract")
        shell:
            "python {SCRIPTS}/extract.py " + EXTRACT_ARGS + " > {log} 2>&1"

else:

    # A killed shard job's rerun keeps the parts it had finished (mmsae.activations.extract_shard).
    rule extract_shard:
        input:
            **inputs("extract"),
        output:
            f"{stage_dir('extract')}/shards/{{shard}}/manifest.json",
        wildcard_constraints:
            shard=r"\d{4}",
        params:
            cfg=slice_json("extract"),
            model_cfg=slice_json("model"),
            model=model_path(),
            samples=stage_dir("sample"),
            out=stage_dir("extract"),
            shard=lambda wc: int(wc.shard),
        conda:
            ENV
        log:
            f"{log_file('extract')[:-len('.log')]}.shard-{{shard}}.log",
        benchmark:
            f"{bench_file('extract')[:-len('.tsv')]}.shard-{{shard}}.tsv"
        shell:
            "python {SCRIPTS}/extract.py " + EXTRACT_ARGS + " --shard {params.shard} > {log} 2>&1"

    rule extract_gather:
        input:
            extract_shard_manifests(),
        output:
            manifest("extract"),
        params:
            cfg=slice_json("extract"),
            model_cfg=slice_json("model"),
            model=model_path(),
            samples=stage_dir("sample"),
            out=stage_dir("extract"),
        conda:
            ENV
        log:
            log_file("extract"),
        shell:
            "python {SCRIPTS}/extract.py " + EXTRACT_ARGS + " --gather > {log} 2>&1"
