# Helpers and config validation shared by all rule files.
import json
import shlex
import sys
from functools import cache
from pathlib import Path

from snakemake.utils import validate

sys.path.insert(0, workflow.basedir)  # the mmsae package, also when it is not pip-installed
from mmsae.artifacts import stage_dirname
from mmsae.config import config_error, result_keys, section_defaults
from mmsae.models.shape import planned_shape, shape_problems
from mmsae.params import SaeCompareParams
from mmsae.report.sae_compare import plan as sae_compare_plan
from mmsae.scoring.methods import with_parts

# A bad config stops here with one line naming the field and its value; Snakemake's own validation
# (which fills the defaults) would bury the field under its traceback.
if (_problem := config_error(config)) is not None:
    sys.stderr.write(_problem + "\n")
    sys.exit(1)
validate(config, "../config/schema.yaml", set_default=True)
# Layers and k that the model cannot serve, caught now (dry runs included) when its shape is known.
if (_planned := planned_shape(config)) is not None and (_problems := shape_problems(config, *_planned)):
    sys.stderr.write("\n".join(_problems) + "\n")
    sys.exit(1)

RESULTS = f"results/{config['run']}"
TOY_DATA = config["data"]["source"] == "toyworld"
TOY_MODEL = config["model"]["path"] == "toy"
SCRIPTS = f"{workflow.basedir}/workflow/scripts"
ENV = "../envs/mmsae.yaml"  # one software environment for every rule on a cluster
# Stage scripts import mmsae from this checkout, whichever python runs them.
shell.prefix(f"export PYTHONPATH={workflow.basedir}${{{{PYTHONPATH:+:$PYTHONPATH}}}}; ")

STEER_CONCEPT = config["steer"]["concept"] is not None and TOY_DATA and TOY_MODEL

# Which artifacts each stage reads. A stage's folder hash covers its parents' folder names, so a
# config change upstream moves every downstream artifact to a new folder.
PARENTS = {
    "toyworld": [],
    "toy_model": ["toyworld"],
    "sample": ["toyworld"] if TOY_DATA else [],  # the pool's; another source's: parent_folders
    "extract": ["sample"] + (["toy_model"] if TOY_MODEL else []),
    "model_loss": ["sample"] + (["toy_model"] if TOY_MODEL else []),
    "train_sae": ["extract"],
    "encode": ["extract", "train_sae"],
    "features": ["extract", "encode"],
    "premise": ["sample", "extract", "encode", "toy_model"],
    "score": ["sample", "extract", "train_sae", "encode", "features"]
    + (["model_loss"] if "model_loss" in with_parts(config["score"]["methods"]) else []),
    "baseline_scores": ["sample"] + (["toy_model"] if TOY_MODEL else []),
    "evaluate_sae": ["sample", "train_sae"] + (["toy_model"] if TOY_MODEL else []),
    "browser": ["sample", "extract", "encode", "features"] + (["toy_model"] if TOY_MODEL else []),
    # image-patch filtering: toy held-out images unless patch_filter.images names an ImageFolder
    "patch_filter": (["toyworld"] if config["patch_filter"]["images"] is None else [])
    + (["toy_model"] if TOY_MODEL else []) + ["train_sae", "features"],
    # the filtering curve's arms (rules/finetune.smk) read these; its folder hashes them
    "curve": ["sample", "score"]
    + (["baseline_scores"] if "ifd" in config["curve"]["methods"] else [])
    + (["toy_model"] if TOY_MODEL else []),
    "report": ["sample", "train_sae", "features", "score", "evaluate_sae"]
    + (["premise", "toy_model"] if TOY_DATA and TOY_MODEL else [])
    + (["curve"] if config["curve"]["enabled"] else []),
    # opt-in targets (rules/explain.smk, rules/steer.smk); steer.concept (a toy-world word) takes its
    # feature from the premise stage
    "explain": ["sample", "extract", "encode", "features"] + (["toy_model"] if TOY_MODEL else []),
    "explain_score": ["sample", "extract", "encode", "explain"],
    "steer": ["sample", "train_sae", "features"] + (["premise"] if STEER_CONCEPT else [])
    + (["toy_model"] if TOY_MODEL else []),
    "attribute": ["sample", "train_sae"] + (["toy_model"] if TOY_MODEL else []),
    # opt-in target (rules/sae_compare.smk): its own hash also covers every compared SAE (hashed_params)
    "sae_compare": ["sample"],
}


def _check_curve():
    """Curve arms must name subsets the score stage writes."""
    cfg, score = config["curve"], config["score"]
    extra = ("ifd", "oracle", "clean")  # selections that are not score methods
    for m in cfg["methods"]:
        if m in ("random", "all"):
            raise ValueError(f"config curve.methods: {m!r} is always an arm: random subsets come from curve.random_seeds, "
                             "the whole sample is always fine-tuned on")
        if m not in score["methods"] and m not in extra:
            raise ValueError(f"config curve.methods: {m!r} is not in score.methods (nor one of {extra})")
        if m in ("oracle", "clean") and not TOY_DATA:
            raise ValueError(f"config curve.methods: {m!r} needs the toy world's ground truth")
    for f in cfg["fractions"] if any(m not in extra for m in cfg["methods"]) else []:
        if not any(abs(f - g) < 1e-9 for g in score["fractions"]):
            raise ValueError(f"config curve.fractions: {f} is not in score.fractions {score['fractions']}")
    if cfg["enabled"] and not TOY_DATA and not config["benchmark"]["llava_bench"]:
        raise ValueError("config curve.enabled: the curve needs a benchmark: set benchmark.llava_bench (and "
                         "benchmark.judge) or curve.enabled: false")


_check_curve()

# Variants: the SAE recipe with some train_sae keys overridden ({"scope": "text"} for the SAE that
# evaluate_sae compares with the SAE-V, {"layer": L} for the per-layer AUROC table). A variant flows
# through the stages in VARIED: their folders hash their parents' names, so each variant gets its own.
VARIED = ("train_sae", "encode", "features", "score", "premise", "evaluate_sae")
SAE_SCOPES = list(dict.fromkeys([config["train_sae"]["scope"], *config["evaluate_sae"]["scopes"]]))
SCORE_LAYERS = config["score"]["layers"] if config["score"]["layers"] is not None else config["extract"]["layers"]
# sae_compare (opt-in, toy world): every architecture x modality_mix x sparsity setting x seed is a variant of
# train_sae and of each stage after it that the comparison reads
SAE_COMPARE = (sae_compare_plan(SaeCompareParams.from_dict(config["sae_compare"]), config["train_sae"])
               if TOY_DATA and TOY_MODEL else [])  # premise needs the toy world's words and masks
COMPARED = [r["variant"] for r in SAE_COMPARE]
VARIANTS = {
    "train_sae": [{"scope": s} for s in SAE_SCOPES] + [{"layer": layer} for layer in SCORE_LAYERS] + COMPARED,
    "encode": [{"layer": layer} for layer in SCORE_LAYERS] + COMPARED,
    "features": [{"layer": layer} for layer in SCORE_LAYERS] + COMPARED,
    "score": [{"layer": layer} for layer in SCORE_LAYERS] + COMPARED,
    "premise": COMPARED,
    "evaluate_sae": COMPARED,
}


def _freeze(v):
    """A hashable stand-in for a variant value (a modality_mix of shares is a dict), undone by _thaw."""
    if isinstance(v, dict):
        return ("__dict__", tuple(sorted((k, _freeze(x)) for k, x in v.items())))
    if isinstance(v, list):
        return ("__list__", tuple(_freeze(x) for x in v))
    return v


def _thaw(v):
    if isinstance(v, tuple) and len(v) == 2 and v[0] == "__dict__":
        return {k: _thaw(x) for k, x in v[1]}
    if isinstance(v, tuple) and len(v) == 2 and v[0] == "__list__":
        return [_thaw(x) for x in v[1]]
    return v


# Data sources. The pool `data` (source None) is scored and feeds the curve, report and browser; the SAE
# corpus `sae_data` (CORPUS, when set) is what train_sae learns from; each `pools` entry ("pool:<name>") is
# one more pool scored with the same SAE. A source has its own sample, extract, model_loss, encode,
# features and score folders (SOURCED), hashed on its data keys and sampling, never on its name: equal
# sources share folders, and train_sae's hash covers the corpus chain only, so adding or changing a pool
# keeps the SAE.
SOURCED = ("sample", "extract", "model_loss", "encode", "features", "score")
CORPUS = "sae_data" if config["sae_data"]["source"] is not None else None
POOLS = {name: f"pool:{name}" for name in config["pools"]}
TOY_SPLITS = ("pool", "train", "heldout")  # the toy world's files, `toyworld:<split>`


def source_config(source):
    """(data keys, sampling {n, seed}) of a source."""
    if source is None:
        return config["data"], config["sample"]
    keys = section_defaults("sae_data", config["sae_data"] if source == "sae_data" else config["pools"][source[5:]])
    return keys, {k: keys.pop(k) for k in ("n", "seed")}


for _name, _source in POOLS.items():
    if source_config(_source)[0]["source"] is None:
        raise ValueError(f"config pools.{_name}.source: a pool needs a data set ('toyworld[:split]' or a file)")


def toy_split(source):
    """The toy world's split a source reads ('toyworld' = its pool), or None for a data set file."""
    name = source_config(source)[0]["source"]
    if name != "toyworld" and not name.startswith("toyworld:"):
        return None
    split = name.partition(":")[2] or "pool"
    if split not in TOY_SPLITS:
        label = "data" if source is None else source.replace(":", "s.", 1) if source != "sae_data" else source
        raise ValueError(f"config {label}.source: {name!r}: the toy world's splits are {', '.join(TOY_SPLITS)}")
    return split


def data_path(source=None):
    split = toy_split(source)
    return f"{stage_dir('toyworld')}/{split}.parquet" if split else source_config(source)[0]["source"]


# Parents read from another source than the stage's own: train_sae's extraction is the corpus's
# ((stage, parent) -> source); with features.weights_on: corpus, features also reads the corpus's
# extraction and codes (input name -> stage, of the corpus).
SOURCE_OF_PARENT = {("train_sae", "extract"): CORPUS}
CORPUS_PARENTS = {"corpus_extract": "extract", "corpus_encode": "encode"}
if config["features"]["weights_on"] == "corpus":
    if CORPUS is None:
        raise ValueError("config features.weights_on: 'corpus' needs an SAE corpus (sae_data)")
    PARENTS["features"] = PARENTS["features"] + list(CORPUS_PARENTS)


def parent_folders(stage, variant):
    """{input name: folder} of the artifacts `stage` reads, for its variant (train_sae keys and `source`)."""
    variant = dict(variant)
    source = variant.pop("source", None)
    parents = PARENTS[stage] if stage != "sample" else (["toyworld"] if toy_split(source) else [])
    out = {}
    for name in parents:
        parent = CORPUS_PARENTS.get(name, name)
        src = CORPUS if name in CORPUS_PARENTS else SOURCE_OF_PARENT.get((stage, name), source)
        out[name] = stage_dir(parent, source=src, **variant)
    return out


def hashed_params(stage, source=None, **variant):
    """The config a stage depends on, which its folder hash covers: its own slice (plus the model slice
    for stages that run it) without its execution keys (schema: `execution: true`); a variant overrides
    train_sae keys; sample hashes its source's data keys and sampling."""
    params = result_keys(stage, config.get(stage, {}))
    if stage == "evaluate_sae" and variant:
        # a compared SAE alone, in the model only (no base LLM, no text-only SAE): never the folder of the
        # run's own evaluate_sae, even where the compared SAE is the run's SAE
        params.update(saes="variant", base_model=None)
    if stage == "sae_compare":
        params["saes"] = [Path(stage_dir("train_sae", **v)).name for v in COMPARED]
        params["stages"] = {s: result_keys(s, config[s]) for s in ("encode", "features", "score", "premise", "evaluate_sae")}
    if stage == "train_sae":
        params.update(variant)
        if params.get("modality_mix", "natural") == "natural":
            # the store's own mix (the default): the SAE of before this key, in the folder it had
            params.pop("modality_mix", None)
    if stage in ("extract", "model_loss", "evaluate_sae", "baseline_scores", "browser", "patch_filter",
                 "steer", "attribute"):
        params["model"] = result_keys("model", config["model"])
    if stage == "sample":
        data, sampling = source_config(source)
        params = {**result_keys("sample", sampling), "data": data}
    if stage == "features" and (params["weights_on"], params["weights_samples"]) == ("pool", None):
        # the weights from the whole pool: the features of before these keys, in the folders they had
        del params["weights_on"], params["weights_samples"]
    if stage == "curve":  # the arms' recipe: fine-tuning and benchmarking
        params.update(finetune=hashed_params("finetune"), benchmark=config["benchmark"],
                      model=result_keys("model", config["model"]))
    return params


@cache
def _stage_dir(stage, frozen):
    variant = {k: _thaw(v) for k, v in frozen}
    parents = [Path(d).name for d in parent_folders(stage, variant).values()]
    return f"{RESULTS}/{stage_dirname(stage, hashed_params(stage, **variant), parents)}"


def stage_dir(stage, **variant):
    """results/{run}/{stage}-{hash}; `variant` overrides train_sae keys for this stage and its parents, and
    `source` names the data source of a SOURCED stage (None: the pool `data`)."""
    keep = {k: v for k, v in variant.items()
            if (k != "source" and stage in VARIED) or (k == "source" and stage in SOURCED and v is not None)}
    return _stage_dir(stage, tuple(sorted((k, _freeze(v)) for k, v in keep.items())))


def variant_of(stage, folder):
    """The variant whose `stage` folder is named `folder` (the wildcard of the varied and sourced rules)."""
    sources = [{"source": s} for s in [CORPUS, *POOLS.values()] if s is not None] if stage in SOURCED else []
    for variant in [{**v, **s} for s in [{}, *sources] for v in [{}, *VARIANTS.get(stage, [])]]:
        if Path(stage_dir(stage, **variant)).name == folder:
            return variant
    raise ValueError(f"no {stage} variant has the folder {folder}")


def variant_inputs(stage):
    """Input function of a varied rule: its parents' manifests, for the variant named by the wildcard."""
    return lambda wc: {p: f"{d}/manifest.json" for p, d in parent_folders(stage, variant_of(stage, wc.folder)).items()}


def variant_dir(stage, parent):
    """Params function of a varied rule: the folder of one of its parents, for the wildcard's variant."""
    return lambda wc: parent_folders(stage, variant_of(stage, wc.folder))[parent]


def source_of(stage, folder):
    return variant_of(stage, folder).get("source")


def sae_dirs():
    return {scope: stage_dir("train_sae", scope=scope) for scope in SAE_SCOPES}


def layer_dirs(stage):
    return {layer: stage_dir(stage, layer=layer) for layer in SCORE_LAYERS}


def manifest(stage, **overrides):
    return f"{stage_dir(stage, **overrides)}/manifest.json"


def inputs(stage):
    """A rule's inputs: the manifests of the artifacts it reads (the pool `data`'s)."""
    return {p: f"{d}/manifest.json" for p, d in parent_folders(stage, {}).items()}


def log_file(stage):
    return f"{RESULTS}/logs/{Path(stage_dir(stage)).name}.log"


def bench_file(stage):
    return f"{RESULTS}/benchmarks/{Path(stage_dir(stage)).name}.tsv"


def slice_json(stage):
    """The stage's own config slice as JSON, passed to the script (and tracked by params:)."""
    return json.dumps(config.get(stage, {}), sort_keys=True)


def model_path():
    return f"{stage_dir('toy_model')}/model" if TOY_MODEL else config["model"]["path"]


def base_model_arg():
    """--base-model for evaluate_sae: the toy model's base LM, a configured path, or nothing."""
    base = config["evaluate_sae"]["base_model"]
    if base is None:
        return ""
    if base == "toy" and not TOY_MODEL:
        raise ValueError("config evaluate_sae.base_model: 'toy' needs model.path: toy; give a base LLM path or null")
    return f"--base-model {stage_dir('toy_model')}/base_model" if base == "toy" else f"--base-model {base}"

