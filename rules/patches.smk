# Image-patch filtering (SAE-V paper, Sec. 3.2): score each image patch with the configured SAE-V,
# keep the best, black out the rest, classify. Labelled images: patch_filter.images (an ImageFolder)
# or, on the toy world, its held-out split. In `all` when it has images to run on.
import shlex

PATCH_IMAGES = config["patch_filter"]["images"]
PATCH_FILTER = PATCH_IMAGES is not None or TOY_DATA


def _patch_images(wildcards):
    return f"--images {shlex.quote(PATCH_IMAGES)}" if PATCH_IMAGES is not None else f"--toyworld {stage_dir('toyworld')}"


rule patch_filter:
    input:
        **inputs("patch_filter"),
        **({"images": PATCH_IMAGES} if PATCH_IMAGES is not None else {}),
    output:
        manifest("patch_filter"),
    params:
        cfg=slice_json("patch_filter"),
        model_cfg=slice_json("model"),
        model=model_path(),
        images=_patch_images,
        sae=stage_dir("train_sae"),
        features=stage_dir("features"),
        out=stage_dir("patch_filter"),
    conda:
        ENV
    log:
        log_file("patch_filter"),
    benchmark:
        bench_file("patch_filter")
    shell:
        "python {SCRIPTS}/patch_filter.py {params.images} --model {params.model:q} --model-params {params.model_cfg:q}"
        " --sae {params.sae} --features {params.features} --out {params.out} --params {params.cfg:q} > {log} 2>&1"
