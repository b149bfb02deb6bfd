# One rule for every SAE of the run: the configured one and its variants (other scopes for
# evaluate_sae, other layers for the per-layer AUROC table), told apart by their folder names.
rule train_sae:
    input:
        unpack(variant_inputs("train_sae")),
    output:
        f"{RESULTS}/{{folder}}/manifest.json",
    wildcard_constraints:
        folder=r"train_sae-[0-9a-f]{8}",
    params:
        cfg=lambda wc: json.dumps(hashed_params("train_sae", **variant_of("train_sae", wc.folder)), sort_keys=True),
        extract=variant_dir("train_sae", "extract"),  # the SAE corpus's (sae_data), else the pool's
        out=lambda wc: f"{RESULTS}/{wc.folder}",
        # outside the output folder, so a killed job's rerun resumes from its last checkpoint
        checkpoints=lambda wc: f"{RESULTS}/{wc.folder}.checkpoints",
    conda:
        ENV
    log:
        f"{RESULTS}/logs/{{folder}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/{{folder}}.tsv"
    shell:
        "python {SCRIPTS}/train_sae.py --extract {params.extract} --out {params.out}"
        " --checkpoints {params.checkpoints} --params {params.cfg:q} > {log} 2>&1"


rule encode:
    input:
        unpack(variant_inputs("encode")),
    output:
        f"{RESULTS}/{{folder}}/manifest.json",
    wildcard_constraints:
        folder=r"encode-[0-9a-f]{8}",
    params:
        cfg=slice_json("encode"),
        extract=variant_dir("encode", "extract"),
        sae=variant_dir("encode", "train_sae"),
        out=lambda wc: f"{RESULTS}/{wc.folder}",
    conda:
        ENV
    log:
        f"{RESULTS}/logs/{{folder}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/{{folder}}.tsv"
    shell:
        "python {SCRIPTS}/encode.py --extract {params.extract} --sae {params.sae} --out {params.out}"
        " --params {params.cfg:q} > {log} 2>&1"


# The SAEs spliced into the model (and into its base LLM): CE / KL scores, L0, FVU per modality.
rule evaluate_sae:
    input:
        **inputs("evaluate_sae"),
        saes=[f"{d}/manifest.json" for d in sae_dirs().values()],
    output:
        manifest("evaluate_sae"),
    params:
        cfg=slice_json("evaluate_sae"),
        model_cfg=slice_json("model"),
        model=model_path(),
        base_model=lambda wc: base_model_arg(),
        saes=" ".join(f"--sae {scope}={d}" for scope, d in sae_dirs().items()),
        samples=stage_dir("sample"),
        out=stage_dir("evaluate_sae"),
    conda:
        ENV
    log:
        log_file("evaluate_sae"),
    benchmark:
        bench_file("evaluate_sae")
    shell:
        "python {SCRIPTS}/evaluate_sae.py --samples {params.samples} --model {params.model:q}"
        " --model-params {params.model_cfg:q} {params.base_model} {params.saes}"
        " --out {params.out} --params {params.cfg:q} > {log} 2>&1"
