# Opt-in target `snakemake sae_compare` (toy world): every SAE of config sae_compare (architecture x
# modality_mix x sparsity setting x seed) gets its own train_sae / encode / features / score / premise /
# evaluate_sae folders (variants, rules/common.smk), then one aggregate: results/{run}/sae_compare-<hash>/.
def _compared_folders(run):
    return {stage: stage_dir(stage, **run["variant"]) for stage in ("train_sae", "evaluate_sae", "premise", "score")}


def _compared_spec(run):
    labels = {k: run[k] for k in ("architecture", "mix", "sparsity_key", "sparsity_value", "seed")}
    return json.dumps({**labels, **_compared_folders(run)}, sort_keys=True)


rule sae_compare_aggregate:
    input:
        **inputs("sae_compare"),
        saes=[f"{d}/manifest.json" for r in SAE_COMPARE for d in _compared_folders(r).values()],
    output:
        manifest("sae_compare"),
    params:
        cfg=slice_json("sae_compare"),
        samples=stage_dir("sample"),
        saes=" ".join(f"--sae {shlex.quote(_compared_spec(r))}" for r in SAE_COMPARE),
        out=stage_dir("sae_compare"),
    conda:
        ENV
    log:
        log_file("sae_compare"),
    benchmark:
        bench_file("sae_compare")
    shell:
        "python {SCRIPTS}/sae_compare.py --samples {params.samples} {params.saes}"
        " --out {params.out} --params {params.cfg:q} > {log} 2>&1"


rule sae_compare:
    input:
        manifest("sae_compare") if SAE_COMPARE else [],
    run:
        if not SAE_COMPARE:
            raise ValueError("config sae_compare: the comparison runs on the toy world (data.source: toyworld, "
                             "model.path: toy): its premise check needs the toy world's words and masks")
