def _model_loss_arg(wildcards):
    folders = parent_folders("score", variant_of("score", wildcards.folder))
    return f"--model-loss {folders['model_loss']}" if "model_loss" in folders else ""


# score.shards > 1: per-sample statistics by sample range in parallel (score_shard, temporary outputs),
# finished by the score rule, which then reads them all (--gather); the scores are the same.
SCORE_SHARDS = config["score"]["shards"]
SCORE_ARGS = (
    "--samples {params.samples} --extract {params.extract} --encode {params.encode}"
    " --features {params.features} --sae {params.sae} {params.model_loss} --out {params.out} --params {params.cfg:q}"
)
SCORE_PARAMS = dict(
    cfg=slice_json("score"),
    samples=variant_dir("score", "sample"),
    extract=variant_dir("score", "extract"),
    encode=variant_dir("score", "encode"),
    features=variant_dir("score", "features"),
    sae=variant_dir("score", "train_sae"),
    model_loss=_model_loss_arg,
    out=lambda wc: f"{RESULTS}/{wc.folder}",
)


def _score_inputs(wildcards):
    shards = [f"{RESULTS}/{wildcards.folder}.shards/{k:04d}" for k in range(SCORE_SHARDS)] if SCORE_SHARDS > 1 else []
    return {**variant_inputs("score")(wildcards), **({"shards": shards} if shards else {})}


if SCORE_SHARDS > 1:

    rule score_shard:
        input:
            unpack(variant_inputs("score")),
        output:
            temp(directory(f"{RESULTS}/{{folder}}.shards/{{shard}}")),
        wildcard_constraints:
            folder=r"score-[0-9a-f]{8}",
            shard=r"\d{4}",
        params:
            **SCORE_PARAMS,
            shard=lambda wc: int(wc.shard),
        conda:
            ENV
        log:
            f"{RESULTS}/logs/{{folder}}.shard-{{shard}}.log",
        benchmark:
            f"{RESULTS}/benchmarks/{{folder}}.shard-{{shard}}.tsv"
        shell:
            "python {SCRIPTS}/score.py " + SCORE_ARGS + " --shard {params.shard} > {log} 2>&1"


# Scores of the configured SAE (whose subsets are kept) and of the per-layer variants (report only).
rule score:
    input:
        unpack(_score_inputs),
    output:
        f"{RESULTS}/{{folder}}/manifest.json",
    wildcard_constraints:
        folder=r"score-[0-9a-f]{8}",
    params:
        **SCORE_PARAMS,
        gather="--gather" if SCORE_SHARDS > 1 else "",
    conda:
        ENV
    log:
        f"{RESULTS}/logs/{{folder}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/{{folder}}.tsv"
    shell:
        "python {SCRIPTS}/score.py " + SCORE_ARGS + " {params.gather} > {log} 2>&1"
