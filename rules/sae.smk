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


# The SAEs spliced into the model (and into its base LLM): CE / KL scores, L0, FVU per modality. The run's
# own folder compares the SAE-V with the text-only SAE; an sae_compare variant's holds its SAE alone, in the
# model only (hashed_params marks it, so the two never share a folder).
def _evaluate_saes(wc):
    variant = variant_of("evaluate_sae", wc.folder)
    return sae_dirs() if not variant else {"all": parent_folders("evaluate_sae", variant)["train_sae"]}


def _evaluate_inputs(wc):
    variant = variant_of("evaluate_sae", wc.folder)
    return {**{k: f"{d}/manifest.json" for k, d in parent_folders("evaluate_sae", variant).items()},
            "saes": [f"{d}/manifest.json" for d in _evaluate_saes(wc).values()]}


rule evaluate_sae:
    input:
        unpack(_evaluate_inputs),
    output:
        f"{RESULTS}/{{folder}}/manifest.json",
    wildcard_constraints:
        folder=r"evaluate_sae-[0-9a-f]{8}",
    params:
        cfg=lambda wc: slice_json("evaluate_sae") if not variant_of("evaluate_sae", wc.folder)
        else json.dumps({**config["evaluate_sae"], "base_model": None}, sort_keys=True),
        model_cfg=slice_json("model"),
        model=model_path(),
        base_model=lambda wc: base_model_arg() if not variant_of("evaluate_sae", wc.folder) else "",
        saes=lambda wc: " ".join(f"--sae {scope}={d}" for scope, d in _evaluate_saes(wc).items()),
        samples=stage_dir("sample"),
        out=lambda wc: f"{RESULTS}/{wc.folder}",
    conda:
        ENV
    log:
        f"{RESULTS}/logs/{{folder}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/{{folder}}.tsv"
    shell:
        "python {SCRIPTS}/evaluate_sae.py --samples {params.samples} --model {params.model:q}"
        " --model-params {params.model_cfg:q} {params.base_model} {params.saes}"
        " --out {params.out} --params {params.cfg:q} > {log} 2>&1"
