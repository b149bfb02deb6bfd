# The filtering curve's arms: fine-tune the model on each (method, fraction) subset of the configured
# score, on seeded random subsets and on the whole sample, then benchmark every model, the starting one
# included; the curve stage gathers them. One hashed folder per arm.


SINGLE_ARMS = ("clean",)  # reference arms with one fine-tune, not one per kept fraction


def _arm_data(method, fraction, seed):
    """(data parquet, extra finetune.py args) of one arm."""
    samples = f"{stage_dir('sample')}/samples.parquet"
    if method == "all":
        return samples, ""
    if method == "random":
        return samples, f"--keep-fraction {fraction} --keep-by random:{seed}"
    if method in ("oracle", "clean"):  # clean: every clean sample at fraction 1 (the clean-pool ceiling)
        return samples, f"--keep-fraction {fraction} --keep-by {method}"
    if method == "ifd":
        return samples, f"--keep-fraction {fraction} --keep-by {stage_dir('baseline_scores')}/ifd.parquet:ifd_score"
    # a score subset is an id list (sample_id, best first): the records, images included, stay in samples.parquet
    return samples, f"--ids {stage_dir('score')}/subsets/{method}/top{int(round(fraction * 100)):03d}.parquet"


def _arms():
    """{finetune folder name: (method, fraction, seed or None)}."""
    cfg = config["curve"]
    specs = [(m, f, None) for m in cfg["methods"] if m not in SINGLE_ARMS for f in cfg["fractions"]]
    specs += [(m, 1.0, None) for m in cfg["methods"] if m in SINGLE_ARMS]
    specs += [("random", f, s) for s in cfg["random_seeds"] for f in cfg["fractions"]]
    specs.append(("all", 1.0, None))
    return {
        stage_dirname("finetune", {**hashed_params("finetune"), "arm": [m, f, s]},
                      [Path(stage_dir(p)).name for p in _arm_parents(m)]): (m, f, s)
        for m, f, s in specs
    }


def _arm_parents(method):
    """The stages an arm reads, and no more: a new SAE does not redo the random arms."""
    reads = {"all": [], "random": [], "oracle": [], "clean": [], "ifd": ["baseline_scores"]}.get(method, ["score"])
    return ["sample", *reads] + (["toy_model"] if TOY_MODEL else [])


ARMS = _arms()
def _launcher(wildcards, resources):
    """One process per GPU the job was given: `accelerate launch` with finetune.accelerate_config."""
    gpus = int(resources.get("gpu", 0) or 0)
    if gpus <= 1:
        return "python"
    cfg = config["finetune"]["accelerate_config"]
    if cfg is None:
        raise ValueError(f"config finetune.accelerate_config: the finetune job has {gpus} GPUs; name an accelerate "
                         "config (config/accelerate/deepspeed_zero3.yaml or fsdp.yaml) or give it one GPU")
    return f"accelerate launch --config_file {workflow.basedir}/{cfg} --num_processes {gpus}"


rule finetune:
    input:
        lambda wc: [manifest(p) for p in _arm_parents(ARMS[wc.folder][0])],
    output:
        f"{RESULTS}/{{folder}}/manifest.json",
    wildcard_constraints:
        folder=r"finetune-[0-9a-f]{8}",
    params:
        cfg=slice_json("finetune"),
        model=model_path(),
        data=lambda wc: _arm_data(*ARMS[wc.folder])[0],
        keep=lambda wc: _arm_data(*ARMS[wc.folder])[1],
        out=lambda wc: f"{RESULTS}/{wc.folder}",
        launch=_launcher,
    resources:
        gpu=0,  # the profile sets it (profiles/slurm: finetune gpu); more than 1 launches accelerate
    conda:
        ENV
    log:
        f"{RESULTS}/logs/{{folder}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/{{folder}}.tsv"
    shell:
        "{params.launch} {SCRIPTS}/finetune.py --model {params.model:q} --data {params.data} {params.keep}"
        " --out {params.out}"
        " --params {params.cfg:q} > {log} 2>&1"
