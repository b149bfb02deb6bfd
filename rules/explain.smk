# Opt-in (not in `all`): automatic explanations of cross-modal features by a multimodal LLM, and their
# IoU score. `snakemake explain_score` runs both; `snakemake explain` only queries the explainer.
# Two stages, so masks from an external segmenter (made from explanations.parquet) can be added to
# explain_score without querying the explainer again.


def _explain_base_url(wildcards):
    # Checked when the job is planned, so a run without an endpoint stops before any work.
    if not config["explain"]["base_url"]:
        raise ValueError("config explain.base_url: the explain rule needs an OpenAI-compatible endpoint, "
                         "e.g. --config explain='{base_url: http://host:8000/v1}'")
    return config["explain"]["base_url"]


def _masks(wildcards):
    masks = config["explain_score"]["masks"]
    return {"masks": masks} if masks else {}


rule explain:
    input:
        **inputs("explain"),
    output:
        manifest("explain"),
    params:
        cfg=slice_json("explain"),
        base_url=_explain_base_url,
        samples=stage_dir("sample"),
        extract=stage_dir("extract"),
        encode=stage_dir("encode"),
        features=stage_dir("features"),
        model=model_path(),
        out=stage_dir("explain"),
    conda:
        ENV
    log:
        log_file("explain"),
    benchmark:
        bench_file("explain")
    shell:
        "python {SCRIPTS}/explain.py --samples {params.samples} --extract {params.extract} --encode {params.encode}"
        " --features {params.features} --model {params.model} --out {params.out} --params {params.cfg:q} > {log} 2>&1"


rule explain_score:
    input:
        unpack(_masks),
        **inputs("explain_score"),
    output:
        manifest("explain_score"),
    params:
        cfg=slice_json("explain_score"),
        samples=stage_dir("sample"),
        extract=stage_dir("extract"),
        encode=stage_dir("encode"),
        explain=stage_dir("explain"),
        out=stage_dir("explain_score"),
    conda:
        ENV
    log:
        log_file("explain_score"),
    benchmark:
        bench_file("explain_score")
    shell:
        "python {SCRIPTS}/explain_score.py --samples {params.samples} --extract {params.extract}"
        " --encode {params.encode} --explain {params.explain} --out {params.out} --params {params.cfg:q} > {log} 2>&1"
