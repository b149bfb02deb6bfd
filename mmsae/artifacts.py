"""Versioned stage artifacts: folder naming by config hash, manifest.json, atomic writes.

Every stage writes one folder `results/{run}/{stage}-{hash}`. The hash covers the stage's own config
slice *and* the folder names of the artifacts it reads, so a change upstream gives every downstream
stage a new folder and two configurations never overwrite each other on disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from mmsae import __version__


class Files:
    """Every file name inside a stage folder, by the stage that writes it: the one place to look up or
    change the on-disk layout (tests keep the literal names, so a change here shows up there)."""

    MANIFEST = "manifest.json"  # every stage; written last, so its presence means "complete"
    METRICS = "metrics.json"  # toy_model, train_sae, finetune
    SUMMARY = "summary.parquet"  # evaluate_sae, curve
    HELDOUT = "heldout.parquet"  # toy_model, patch_filter
    # toyworld: the splits (written as f"{split}.parquet"); toy_model: the model folders
    TRAIN = "train.parquet"
    POOL = "pool.parquet"
    MODEL_DIR = "model"  # toy_model and finetune: a Hugging Face model folder
    BASE_MODEL_DIR = "base_model"
    # sample
    SAMPLES = "samples.parquet"
    BAD_ROWS = "bad_rows.parquet"
    # extract (mmsae.activations): a token table plus a zarr store, or an index over stores in parts
    TOKENS = "tokens.parquet"
    ACTS = "acts.zarr"
    ACTS_INDEX = "acts.json"
    PART_INFO = "part.json"
    # model_loss, baseline_scores
    LOSS = "loss.parquet"
    IFD = "ifd.parquet"
    CLIP = "clip.parquet"
    # train_sae (SAELens layout, in its SAE_DIR) and its resumable checkpoint
    SAE_DIR = "sae"
    SAE_CFG = "cfg.json"
    SAE_WEIGHTS = "sae_weights.safetensors"
    SAE_SPARSITY = "sparsity.safetensors"
    MODEL_CARD = "README.md"  # Hugging Face model card (mmsae.sae.card)
    TRAIN_STATE = "state.json"
    TRAIN_STATE_TENSORS = "state.safetensors"
    # evaluate_sae
    CE = "ce.parquet"
    RECONSTRUCTION = "reconstruction.parquet"
    # encode, features, premise
    CODES = "codes.parquet"
    FEATURES = "features.parquet"
    PREMISE = "premise.json"
    # score (mmsae.scoring)
    SCORES = "scores.parquet"
    SHARD_INFO = "shard.json"
    SHARD_STATS = "stats.parquet"
    SHARD_COOC = "cooc.parquet"
    # finetune, benchmark, curve
    TRAIN_IDS = "train_ids.parquet"
    RESULTS = "results.json"  # benchmark also writes toy.parquet / llava_bench.parquet (f"{benchmark}.parquet")
    CURVE = "curve.parquet"
    CURVE_JSON = "curve.json"
    CURVE_PLOT = "curve.png"
    # patch_filter
    PATCH_SCORES = "patch_scores.parquet"
    PREDICTIONS = "predictions.parquet"
    ACCURACY = "accuracy.parquet"
    ACCURACY_PLOT = "accuracy.png"
    EXAMPLES_PLOT = "examples.png"
    # explain, explain_score
    EXPLANATIONS = "explanations.parquet"
    EXPLANATION_SCORES = "explanation_scores.parquet"
    # steer, attribute
    STEERING = "steering.parquet"
    ATTRIBUTION = "attribution.parquet"
    # compare
    AUROC_SPREAD = "auroc_spread.parquet"
    AUROC_SPREAD_HTML = "auroc_spread.html"
    # sae_compare (mmsae.report.sae_compare; also INDEX_HTML)
    COMPARE_RUNS = "runs.parquet"
    COMPARE_SUMMARY = "summary.parquet"
    COMPARE_AUROC = "auroc.parquet"
    COMPARE_PARETO = "pareto.png"
    COMPARE_FINDINGS = "findings.json"
    # study (the filtering curve over runs)
    STUDY = "study.parquet"
    STUDY_JSON = "study.json"
    STUDY_HTML = "study.html"
    STUDY_PLOT = "study.png"
    # report, browser
    REPORT = "report.json"
    INDEX_HTML = "index.html"


MANIFEST = Files.MANIFEST


def config_hash(params: Mapping[str, Any], parents: Sequence[str] = (), length: int = 8) -> str:
    """Short stable hash of a stage's config slice plus the names of its input artifacts."""
    blob = json.dumps({"params": params, "parents": list(parents)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def stage_dirname(stage: str, params: Mapping[str, Any], parents: Sequence[str] = ()) -> str:
    return f"{stage}-{config_hash(params, parents)}"


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `final`, on failure it is deleted.

    A half-written stage therefore never looks complete: `final` (and its manifest) only appear once
    everything inside has been written.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # Snakemake pre-creates output parents; stale content of a failed run goes too
        shutil.rmtree(final)
    os.replace(tmp, final)


@contextlib.contextmanager
def atomic_file(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `final`; renamed onto it only when the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, final)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):  # numpy / torch scalars
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def write_manifest(
    folder: str | os.PathLike,
    stage: str,
    params: Mapping[str, Any],
    inputs: Mapping[str, str | os.PathLike] | None = None,
    counts: Mapping[str, Any] | None = None,
    timings: Mapping[str, float] | None = None,
    config_hash_value: str | None = None,
) -> dict[str, Any]:
    """Write manifest.json: what made this artifact, from what, and how big it is."""
    inputs = {k: str(v) for k, v in (inputs or {}).items()}
    if config_hash_value is None:  # the folder name carries the hash the workflow computed
        m = re.fullmatch(rf"\.?{re.escape(stage)}-([0-9a-f]{{8}})(?:\.tmp-.*)?", Path(folder).name)
        config_hash_value = m.group(1) if m else None
    manifest = {
        "stage": stage,
        "params": dict(params),
        "config_hash": config_hash_value or config_hash(params, sorted(Path(v).name for v in inputs.values())),
        "inputs": inputs,
        "mmsae_version": __version__,
        "python": platform.python_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "counts": dict(counts or {}),
        "timings_s": {k: round(float(v), 3) for k, v in (timings or {}).items()},
    }
    write_json(Path(folder) / MANIFEST, manifest)
    return manifest


ARTIFACT_NAME = re.compile(r"[a-z_]+-[0-9a-f]{8}")  # stage_dirname: {stage}-{config hash}


def require_finished(folder: str | os.PathLike, field: str = "manifest") -> None:
    """Refuse a stage folder without its manifest: what a killed job or a forced rerun (which deletes
    only manifest.json) leaves behind may be stale or half-written. Applies to folders named as
    artifacts ({stage}-{hash}); other folders (a SAELens download, a hand-made store) are the user's."""
    folder = Path(folder)
    if ARTIFACT_NAME.fullmatch(folder.name) and folder.is_dir() and not (folder / MANIFEST).exists():
        from mmsae.errors import InputError

        raise InputError(folder / MANIFEST, field, "missing: an unfinished or forced-rerun stage folder, not read; "
                         "rerun the stage that writes it")


def remove_stale_temporaries(final: Path) -> None:
    """Delete what killed jobs left of earlier attempts at `final` (atomic_dir's hidden temporaries);
    Snakemake never runs two jobs for one output, so none of them is in use."""
    for tmp in final.parent.glob(f".{final.name}.tmp-*"):
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.exists():
        from mmsae.errors import InputError

        raise InputError(path, "manifest", "artifact is missing or incomplete (no manifest.json)")
    return json.loads(path.read_text())


class Timer:
    """Collects named wall-clock timings for the manifest."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start
