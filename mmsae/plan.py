"""`snakemake plan`: what a config will cost before any job runs (tokens, disk, memory, GPU-hours).

From the config, the model's config.json (no weights: the toy model's from its config slice) and the
data set's row count plus its first `sample_rows` rows, it estimates per stage:

- tokens by modality: text tokens with the model's tokenizer where it can be loaded without weights
  (local folder, toy model), else characters / 4; image tokens per image by the family's arithmetic
  (`image_tokens`), every image of a record counted (`extra_images`, OBELICS `images`);
- disk per artifact: the zarr store (tokens x layers x d_model x dtype bytes x compression), the token
  index, the codes (rows x bytes/row), SAE safetensors, training checkpoints x keep, score subsets;
- peak host and GPU memory: model weights, SAE params + Adam, the stage's batches;
- GPU-hours: FLOPs / (peak FLOP/s x utilisation), both stated (`Throughput`).

It flags what will not fit the Slurm profile's resources (mem_mb, runtime, one GPU's memory) or the
stated disk. The byte-per-row constants below were measured on this project's artifacts
(tests/test_plan.py checks the estimates against tiny real runs within 25%); formulas are in the code
next to each estimate. Run: `python -m mmsae.plan --configfile config/config.yaml` or `snakemake plan`.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mmsae.artifacts import atomic_dir, write_json
from mmsae.config import load_schema, validate
from mmsae.features import cosine_feature_bytes
from mmsae.models.shape import dictionary_size
from mmsae.sae.blocks import dense_rows
from mmsae.scoring.offdist import STORE_BLOCK_BYTES, sae_rows

GB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Measured on this project's artifacts (tests/test_plan.py re-measures them on tiny runs):
# zarr (zstd) on hidden states barely compresses: float32 0.905 (the toy demo's store, 50.4 of 55.7 MB);
# bf16 ~3/4 (issue #15: ~6 KB/token at d 4096 in bf16, one layer = 8 KB raw).
STORE_COMPRESSION = {"float32": 0.9, "bfloat16": 0.75, "float16": 0.9}
TOKENS_BYTES_PER_TOKEN = 6.7  # tokens.parquet on disk (the toy demo: 364 KB / 54,415 tokens)
TOKENS_MEM_BYTES_PER_TOKEN = 120.0  # the same table in pandas (issue #15: 86-200 B/token)
PARQUET_FILE_BYTES = 4096  # footer, schema and page headers of one parquet file (tiny files: most of it)
CODES_BYTES_PER_ROW = 7.0  # codes.parquet on disk per (token, feature, activation) row: 6.9-7.1 in the demo
RELU_L0 = 190  # active latents per token of a trained relu SAE-V (the paper's L0 at 65,536 latents)
BASE_RSS = 0.45 * GB  # python + torch + transformers + mmsae: the toy demo's stage jobs peak at 450-600 MB
TEMPLATE_TOKENS = 12  # chat-template tokens around a question when no tokenizer can be loaded
STAGE_RULES = ("extract", "train_sae", "encode", "features", "score", "evaluate_sae", "model_loss",
               "baseline_scores", "finetune", "report", "browser")


@dataclass(frozen=True)
class Throughput:
    """Stated device throughput: GPU-hours = FLOPs / (peak x utilisation). Defaults: one H100 SXM
    (NVIDIA datasheet, dense: bf16 989 TFLOP/s, TF32 494, fp32 67); utilisation 0.4 for a 7B forward in
    transformers (eager, variable-length batches; an assumption, not a measurement) and 0.5 for the SAE
    GEMMs (perf/sae_flops.py reached 0.73-0.85 of the CPU's matmul peak)."""

    bf16_tflops: float = 989.0
    tf32_tflops: float = 494.0
    fp32_tflops: float = 67.0
    model_utilisation: float = 0.4
    sae_utilisation: float = 0.5
    cpu_gflops: float = 53.0  # fp32 matmul FLOP/s of the SAE on a CPU job (issue #15's measurement, this 2-core CPU)
    gpu_mem_gb: float = 80.0
    disk_gb: float = 1000.0  # scratch space assumed free for results/ (no profile states one)

    def hours(self, flops: float, precision: str, sae: bool = False) -> float:
        peak = {"bf16": self.bf16_tflops, "tf32": self.tf32_tflops, "fp32": self.fp32_tflops}[precision] * 1e12
        return flops / (peak * (self.sae_utilisation if sae else self.model_utilisation)) / 3600


# -- the model, from its config alone -------------------------------------------------------------
@dataclass
class ModelInfo:
    model_type: str
    n_layers: int
    d_model: int
    params_text: int  # decoder + embeddings + LM head
    params_vision: int  # vision tower + projector (Chameleon: its VQ-VAE, unknown -> 0)
    weights_bytes: int | None  # from the safetensors index when present
    cfg: dict[str, Any] = field(repr=False, default_factory=dict)
    preprocessor: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def params(self) -> int:
        return self.params_text + self.params_vision


def _text_params(t: dict[str, Any]) -> int:
    d, layers = int(t["hidden_size"]), int(t["num_hidden_layers"])
    heads = int(t.get("num_attention_heads", max(1, d // 128)))
    hd = int(t.get("head_dim") or d // heads)
    kv = int(t.get("num_key_value_heads") or heads)
    inter = int(t.get("intermediate_size", 4 * d))
    vocab = int(t.get("vocab_size", 32000))
    per_layer = d * heads * hd * 2 + 2 * d * kv * hd + 3 * d * inter + 2 * d
    embeddings = vocab * d * (1 if t.get("tie_word_embeddings") else 2)
    return layers * per_layer + embeddings + d


def _vision_params(v: dict[str, Any], d_text: int) -> int:
    h = int(v.get("hidden_size", v.get("embed_dim", 1024)))
    layers = int(v.get("num_hidden_layers", v.get("depth", 24)))
    inter = int(v.get("intermediate_size", 4 * h))
    patch, size = int(v.get("patch_size", 14)), int(v.get("image_size", 336))
    per_layer = 4 * h * h + 2 * h * inter + 4 * h
    return layers * per_layer + 3 * patch * patch * h + ((size // patch) ** 2 + 1) * h + h * d_text + d_text * d_text


def toy_model_config(toy: dict[str, Any]) -> dict[str, Any]:
    """The toy model's config.json as the toy_model stage will write it (mmsae.models.toy.build)."""
    from mmsae.models.toy import build

    h = int(toy["hidden_size"])
    heads = max(1, h // 16)
    return {
        "model_type": "llava", "vision_feature_select_strategy": "default",
        "text_config": {"hidden_size": h, "num_hidden_layers": int(toy["num_layers"]), "num_attention_heads": heads,
                        "intermediate_size": 4 * h, "vocab_size": len(build.vocabulary()), "head_dim": h // heads},
        "vision_config": {"hidden_size": h, "intermediate_size": 4 * h, "num_hidden_layers": int(toy["vision_layers"]),
                          "image_size": build.IMAGE_SIZE, "patch_size": build.PATCH_SIZE},
    }


def model_info(cfg: dict[str, Any], preprocessor: dict[str, Any] | None = None,
               weights_bytes: int | None = None) -> ModelInfo:
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    d = int(text["hidden_size"])
    vision = cfg.get("vision_config") if isinstance(cfg.get("vision_config"), dict) else None
    return ModelInfo(str(cfg.get("model_type", "llama")), int(text["num_hidden_layers"]), d, _text_params(text),
                     _vision_params(vision, d) if vision else 0, weights_bytes, cfg, preprocessor or {})


def load_model_info(config: dict[str, Any], model_config: str | None = None) -> ModelInfo:
    """The configured model's shape: `model_config` (a folder with config.json) overrides model.path;
    'toy' is built from the toy_model slice; a hub id must be in the local Hugging Face cache."""
    path = model_config or config["model"]["path"]
    if path == "toy":
        return model_info(toy_model_config(config["toy_model"]))
    folder = Path(path)
    if not (folder / "config.json").is_file():
        try:  # a hub id already downloaded (config only); never a download
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(path, allow_patterns=["*.json"], local_files_only=True))
        except Exception as exc:  # noqa: BLE001 (any failure means: no config at hand)
            raise SystemExit(f"plan: no config.json for model {path!r} (not a local folder, not in the HF cache); "
                             f"pass --model-config FOLDER ({exc.__class__.__name__})") from exc
    cfg = json.loads((folder / "config.json").read_text())
    pre: dict[str, Any] = {}
    for name in ("processor_config.json", "preprocessor_config.json"):  # transformers 5 nests the image processor
        if (folder / name).is_file():
            cfg_pre = json.loads((folder / name).read_text())
            pre.update({**cfg_pre, **(cfg_pre.get("image_processor") or {})})
    index = folder / "model.safetensors.index.json"
    size = json.loads(index.read_text()).get("metadata", {}).get("total_size") if index.is_file() else None
    if size is None and (folder / "model.safetensors").is_file():
        size = (folder / "model.safetensors").stat().st_size
    return model_info(cfg, pre, size)


# -- image-token arithmetic per family ------------------------------------------------------------
def _best_resolution(h: int, w: int, pinpoints: list[list[int]]) -> tuple[int, int]:
    """transformers' select_best_resolution: the pinpoint keeping the most pixels, then the least waste."""
    best, best_eff, best_waste = (pinpoints[0][0], pinpoints[0][1]), -1, math.inf
    for ph, pw in pinpoints:
        scale = min(pw / w, ph / h)
        dw, dh = int(w * scale), int(h * scale)
        eff = min(dw * dh, w * h)
        waste = pw * ph - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (ph, pw), eff, waste
    return best


def _smart_resize(h: int, w: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's resize: sides rounded to multiples of `factor`, pixels kept within [min, max]."""
    hb, wb = max(factor, round(h / factor) * factor), max(factor, round(w / factor) * factor)
    if hb * wb > max_pixels:
        beta = math.sqrt(h * w / max_pixels)
        hb, wb = math.floor(h / beta / factor) * factor, math.floor(w / beta / factor) * factor
    elif hb * wb < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        hb, wb = math.ceil(h * beta / factor) * factor, math.ceil(w * beta / factor) * factor
    return hb, wb


def image_tokens(info: ModelInfo, width: int, height: int) -> int:
    """Image tokens of one width x height image: LLaVA-1.5 a fixed grid ((image/patch)^2, 576 at 336/14);
    LLaVA-NeXT anyres = base grid + the unpadded high-res tiles + one newline per row (the processor's
    _get_number_of_features); Qwen2-VL pixels / 28^2 after its smart resize; Chameleon 1024 VQ codes."""
    cfg, t = info.cfg, info.model_type
    vision = cfg.get("vision_config") or {}
    if t in ("llava", "llava_next"):
        size, patch = int(vision.get("image_size", 336)), int(vision.get("patch_size", 14))
        side = size // patch
        extra = 1 if cfg.get("vision_feature_select_strategy", "default") == "full" else 0
        if t == "llava":
            return side * side + extra
        pinpoints = cfg.get("image_grid_pinpoints") or [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
        bh, bw = _best_resolution(height, width, pinpoints)
        cur_h, cur_w = side * (bh // size), side * (bw // size)
        if width / height > cur_w / cur_h:
            new_h = int(round(height * (cur_w / width), 7))
            cur_h -= 2 * ((cur_h - new_h) // 2)
        else:
            new_w = int(round(width * (cur_h / height), 7))
            cur_w -= 2 * ((cur_w - new_w) // 2)
        return cur_h * cur_w + cur_h + side * side + extra
    pre = info.preprocessor
    if t == "qwen2_vl":
        patch = (int(pre.get("patch_size") or vision.get("patch_size", 14))
                 * int(pre.get("merge_size") or vision.get("spatial_merge_size", 2)))
        size = pre.get("size") or {}
        h, w = _smart_resize(height, width, patch, int(pre.get("min_pixels") or size.get("shortest_edge") or 56 * 56),
                             int(pre.get("max_pixels") or size.get("longest_edge") or 28 * 28 * 1280))
        return (h // patch) * (w // patch)
    if t == "chameleon":  # the processor's image_seq_length, else the VQ-VAE's latent grid (1024 at 512 px / 16)
        vq = cfg.get("vq_config") or {}
        side = int(vq.get("resolution", 512)) // 2 ** (len(vq.get("channel_multiplier", [1] * 5)) - 1)
        return int(pre.get("image_seq_length") or side * side)
    return 0  # a text-only LLM ignores images


# -- the data: row count and a sample of rows -----------------------------------------------------
@dataclass
class RowSample:
    question: str
    response: str | None
    image_sizes: list[tuple[int, int]]  # (width, height) per image, in order


def _image_size(value: Any, root: Path) -> tuple[int, int] | None:
    from PIL import Image

    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    try:
        if isinstance(value, bytes | bytearray):
            with Image.open(io.BytesIO(value)) as im:  # the header only: no decode
                return im.size
        if isinstance(value, str):
            with Image.open(root / value) as im:
                return im.size
    except Exception:  # noqa: BLE001 (an unreadable image is a bad row; the plan only skips it)
        return None
    return None


def _list(value: Any) -> list:
    """A list column's value (a list, a numpy array from pandas, or None) as a list."""
    return [] if value is None else list(value)


def _rows_from_frame(df: Any, fmt: str, root: Path) -> list[RowSample]:
    out = []
    for row in df.to_dict("records"):
        if fmt == "obelics":
            texts = [t for t in _list(row.get("texts")) if isinstance(t, str)]
            images = [i for i in _list(row.get("images")) if i is not None]
            question, response = " ".join(texts), None
        else:
            images = [row.get("image"), *_list(row.get("extra_images"))]
            question = str(row.get("question") or "")
            if fmt == "align_anything":
                pick = row.get("overall_response")
                response = row.get("response_2") if pick == 2 else row.get("response_1")
            elif fmt == "rlaif_v":
                response = row.get("chosen")
            else:
                responses, pref = _list(row.get("responses")), row.get("preferred")
                ok = responses and pref is not None and 0 <= int(pref) < len(responses)
                response = str(responses[int(pref)]) if ok else None
        sizes = [s for s in (_image_size(i, root) for i in images if i is not None) if s is not None]
        out.append(RowSample(question.replace("<image>", " "), response, sizes))
    return out


def read_source(data: dict[str, Any], n_rows: int | None, sample_rows: int, toyworld: dict[str, Any],
                seed: int = 0) -> tuple[int, list[RowSample]]:
    """(rows the stages will see, the first `sample_rows` of them as RowSamples) of a `data`-like slice."""
    source, fmt = data["source"], data.get("format", "mmsae")
    if source == "toyworld":
        from mmsae.data import toyworld as tw

        total = int(toyworld["n_samples"])
        df = tw.generate(toyworld["seed"] + seed, min(sample_rows, total), toyworld["corruption_rate"],
                         toyworld["corruption_kinds"], 10, 10)["pool"]
        rows = _rows_from_frame(df, "mmsae", Path("."))
    else:
        path = Path(source)
        root = Path(data.get("image_root") or path.parent)
        if fmt == "llava_json":
            items = json.loads(path.read_text())
            total = len(items)
            rows = []
            for item in items[:sample_rows]:
                turns = item.get("conversations") or []
                q = next((t.get("value", "") for t in turns if t.get("from") == "human"), "")
                a = next((t.get("value", "") for t in turns if t.get("from") == "gpt"), None)
                imgs = item.get("image")
                imgs = imgs if isinstance(imgs, list) else [imgs] if imgs else []
                rows.append(RowSample(q.replace("<image>", " "), a,
                                      [s for s in (_image_size(i, root) for i in imgs) if s is not None]))
        else:
            import pyarrow.parquet as pq

            f = pq.ParquetFile(path)
            total = f.metadata.num_rows
            batch = next(f.iter_batches(batch_size=max(1, sample_rows)), None)
            rows = _rows_from_frame(batch.to_pandas(), fmt, root) if batch is not None else []
    return (min(total, n_rows) if n_rows else total), rows


# -- tokens per sample ----------------------------------------------------------------------------
def load_processor(config: dict[str, Any], model_config: str | None) -> Any:
    """The model's processor (or tokenizer) without weights, or None: toy model, local folder."""
    path = model_config or config["model"]["path"]
    try:
        if path == "toy":
            from mmsae.models.toy.build import build_processor

            return build_processor()
        if not Path(path).is_dir():
            return None
        from transformers import AutoProcessor, AutoTokenizer

        try:
            return AutoProcessor.from_pretrained(path)
        except Exception:  # noqa: BLE001 (a text-only model or no processor files: the tokenizer alone)
            return AutoTokenizer.from_pretrained(path)
    except Exception:  # noqa: BLE001 (no tokenizer: characters / 4)
        return None


@dataclass
class TokenCounts:
    text: float
    image: float
    special: float
    images: float  # images per sample

    @property
    def total(self) -> float:
        return self.text + self.image + self.special


def count_tokens(rows: list[RowSample], info: ModelInfo, processor: Any, include_response: bool,
                 max_length: int | None = None) -> TokenCounts:
    """Mean tokens per sample by modality over `rows`, as the adapters lay them out: the chat-templated
    prompt (+ the response and EOS), each image placeholder replaced by that image's tokens."""
    from mmsae.models.prompts import format_prompt, format_response

    if not rows:
        return TokenCounts(0, 0, 0, 0)
    tok = getattr(processor, "tokenizer", processor)
    special_ids = set(getattr(tok, "all_special_ids", []) or [])
    image_id = getattr(processor, "image_token_id", None) or getattr(tok, "image_token_id", None)
    text = image = special = n_images = 0.0
    for r in rows:
        n_img = len(r.image_sizes) if info.model_type not in ("llama", "mistral", "qwen2") else 0
        img = sum(image_tokens(info, w, h) for w, h in r.image_sizes) if n_img else 0
        if tok is not None:
            try:
                s = format_prompt(processor, r.question, has_image=n_img > 0) if hasattr(processor, "apply_chat_template") else r.question
                if n_img > 1:  # one placeholder per image (images before the question, as the adapters put them)
                    s = s.replace(getattr(processor, "image_token", "<image>"), getattr(processor, "image_token", "<image>") * n_img, 1)
                if include_response and r.response:
                    s += format_response(processor, r.response)
                ids = tok(s)["input_ids"]  # special tokens added as the processor adds them
            except Exception:  # noqa: BLE001 (a template that does not take this message: plain text)
                ids = tok(r.question + (" " + r.response if include_response and r.response else ""))["input_ids"]
            sp = sum(1 for i in ids if i in special_ids and i != image_id)
            placeholders = sum(1 for i in ids if i == image_id)
            t = len(ids) - sp - placeholders
        else:
            chars = len(r.question) + (len(r.response) + 1 if include_response and r.response else 0)
            t, sp = math.ceil(chars / 4) + TEMPLATE_TOKENS, 2
        if info.model_type in ("chameleon",):  # begin/end-of-image sentinels
            sp += 2 * n_img
        if max_length is not None and t + sp + img > max_length:  # extract.too_long: truncate (text only)
            t = max(0, max_length - sp - img)
        text, image, special, n_images = text + t, image + img, special + sp, n_images + n_img
    n = len(rows)
    return TokenCounts(text / n, image / n, special / n, n_images / n)


# -- the plan -------------------------------------------------------------------------------------
@dataclass
class StagePlan:
    stage: str
    jobs: int = 1
    tokens: dict[str, float] = field(default_factory=dict)
    disk: dict[str, float] = field(default_factory=dict)  # artifact -> bytes
    host_peak: float = 0.0  # bytes, one job
    gpu_peak: float = 0.0  # bytes, one job (0: no GPU)
    gpu_hours: float = 0.0  # all jobs
    cpu_hours: float = 0.0  # all jobs: SAE work a stage does on the CPU (score without a GPU)
    notes: list[str] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)

    @property
    def disk_total(self) -> float:
        return sum(self.disk.values())


def sae_params(d: int, d_sae: int) -> int:
    return 2 * d * d_sae + d_sae + d  # W_enc, W_dec, b_enc, b_dec (SAELens layout)


def _source_tokens(n: int, tc: TokenCounts, scope: str = "all", include_special: bool = False) -> float:
    per = tc.text + tc.image + (tc.special if include_special else 0) if scope == "all" else tc.text
    return n * per


def build_plan(config: dict[str, Any], info: ModelInfo, pool: tuple[int, TokenCounts],
               corpus: tuple[int, TokenCounts] | None, tp: Throughput, relu_l0: int = RELU_L0,
               resources: dict[str, dict[str, Any]] | None = None) -> list[StagePlan]:
    """Per-stage estimates; `corpus` None = the SAE learns from the pool (no `sae_data`); `relu_l0`: the
    codes per token of a relu SAE (a topk SAE has k); `resources`: the profile's (profile_resources), which
    say where a job has no GPU."""
    ex, sae_cfg, enc, sc = config["extract"], config["train_sae"], config["encode"], config["score"]
    d, layers = info.d_model, len(ex["layers"])
    d_sae = dictionary_size(sae_cfg["expansion"], d)
    P = sae_params(d, d_sae)
    act_bytes = DTYPE_BYTES[ex["dtype"]]
    model_dtype = config["model"]["dtype"]
    wbytes = info.weights_bytes or info.params * DTYPE_BYTES.get(model_dtype if model_dtype != "auto" else "bfloat16", 2)
    score_layers = sc["layers"] if sc["layers"] is not None else ex["layers"]
    n_pool, tc_pool = pool
    plans: list[StagePlan] = []

    def extraction(name: str, n: int, tc: TokenCounts) -> StagePlan:
        tok = n * tc.total
        p = StagePlan(name, jobs=ex.get("shards", 1),
                      tokens={"text": n * tc.text, "image": n * tc.image, "special": n * tc.special, "total": tok})
        comp = STORE_COMPRESSION[ex["dtype"]]
        p.disk = {"acts.zarr": tok * layers * d * act_bytes * comp, "tokens.parquet": tok * TOKENS_BYTES_PER_TOKEN + PARQUET_FILE_BYTES}
        batch_tok = min(ex["batch_tokens"] or ex["batch_size"] * tc.total, ex["batch_size"] * max(tc.total, 1) * 2)
        shard_buf = ex["chunk_tokens"] * ex["shard_chunks"] * layers * d * act_bytes * 2  # writer buffer + concat
        # forward activations of one batch (hidden, MLP intermediate, captured layers) on the device
        inter = int((info.cfg.get("text_config") or info.cfg).get("intermediate_size", 4 * d))
        fwd = batch_tok * (8 * d + 3 * inter) * 4 + batch_tok * layers * d * 4
        p.gpu_peak = wbytes + fwd
        p.host_peak = BASE_RSS + wbytes + shard_buf + tok * TOKENS_MEM_BYTES_PER_TOKEN / max(1, p.jobs)
        flops = 2 * info.params_text * tok + 2 * info.params_vision * n * tc.image
        p.gpu_hours = tp.hours(flops, "bf16")
        p.notes.append(f"{tc.total:,.0f} tokens/sample ({tc.image / max(tc.total, 1):.1%} image), "
                       f"{tc.images:.2f} images/sample; host: weights + writer shard + token index in memory")
        return p

    plans.append(extraction("extract", n_pool, tc_pool))
    sae_src_n, sae_src_tc = corpus if corpus is not None else pool
    if corpus is not None:
        plans.append(extraction("sae_extract", *corpus))

    # train_sae: one SAE per variant (scopes of evaluate_sae, score layers)
    scopes = list(dict.fromkeys([sae_cfg["scope"], *config["evaluate_sae"]["scopes"]]))
    n_sae = len(scopes) + len(set(score_layers) - {sae_cfg["layer"]})
    # checkpoints kept (train_sae.keep_checkpoints), + the one
    # being written before the oldest goes
    keep = int(sae_cfg["keep_checkpoints"]) + 1
    steps_tokens = sae_cfg["steps"] * sae_cfg["batch_size"]
    train_tokens = _source_tokens(sae_src_n, sae_src_tc, sae_cfg["scope"], sae_cfg["include_special"])
    t = StagePlan("train_sae", jobs=n_sae, tokens={"trained": steps_tokens, "available": train_tokens})
    t.disk = {"sae_weights.safetensors": n_sae * P * 4, "sparsity.safetensors": n_sae * d_sae * 4,
              "checkpoints (during training)": keep * (3 * P * 4 + 2 * d_sae * 8)}  # weights + 2 Adam moments
    batch = sae_cfg["batch_size"]
    # params + grads + 2 Adam moments; the batch's pre-activations, codes and their gradients; decoder out
    sae_dev = 16 * P + batch * d_sae * 4 * 4 + batch * d * 4 * 4
    group = sae_cfg["buffer_chunks"] * ex["chunk_tokens"] * d
    t.gpu_peak = sae_dev
    t.host_peak = BASE_RSS + 2 * group * (4 + act_bytes) + train_tokens * 16  # 2 groups + train-row index
    prec = sae_cfg["precision"]
    t.gpu_hours = n_sae * tp.hours(6 * 2 * d * d_sae * steps_tokens, prec, sae=True)
    if steps_tokens > train_tokens:
        t.notes.append(f"{steps_tokens / max(train_tokens, 1):.1f} epochs over the SAE's tokens")
    plans.append(t)

    # encode: one per score layer; rows = tokens x active latents
    k_arch = sae_cfg["architecture"] in ("topk", "batchtopk", "matryoshka_batchtopk")  # k per token (or its mean)
    l0 = sae_cfg["k"] if k_arch else min(relu_l0, d_sae)
    l0 = min(l0, int(enc["max_codes_per_token"] or l0))  # encode's cap per token (0: none)
    pool_sae_tokens = _source_tokens(n_pool, tc_pool, sae_cfg["scope"], sae_cfg["include_special"])
    e = StagePlan("encode", jobs=len(score_layers), tokens={"encoded": pool_sae_tokens, "codes_rows": pool_sae_tokens * l0})
    e.disk = {"codes.parquet": len(score_layers) * (pool_sae_tokens * l0 * CODES_BYTES_PER_ROW + PARQUET_FILE_BYTES)}
    bt = enc["batch_tokens"]
    dense = min(bt, dense_rows(d_sae)) * d_sae * 4  # one byte-bounded slice of codes (mmsae.sae.blocks)
    e.gpu_peak = 4 * P + dense * 2 + bt * d * 4
    e.host_peak = BASE_RSS + 4 * P + dense * 2 + bt * d * 4 + enc["part_tokens"] * l0 * CODES_BYTES_PER_ROW
    e.gpu_hours = len(score_layers) * tp.hours(2 * d * d_sae * pool_sae_tokens, "tf32", sae=True)
    e.notes.append(f"L0 {l0} ({'k' if k_arch else 'relu SAE-V, the paper'}); "
                   "host/GPU: the SAE, one byte-bounded slice of dense codes x2, one codes part's rows")
    plans.append(e)

    f = StagePlan("features", jobs=len(score_layers))
    f.disk = {"features.parquet": len(score_layers) * d_sae * (config["features"]["top_k"] * 2 * 12 + 64)}
    # 1M-code batches, the [keys x top_k] tables, the cosine's float64 sums (2 x d per cross-modal feature, at
    # most every feature, capped by features.cosine_memory_mb per group)
    f.host_peak = (BASE_RSS + 2**20 * 40 + d_sae * config["features"]["top_k"] * 2 * 16 * 2 + pool_sae_tokens * 16
                   + min(d_sae * cosine_feature_bytes(d), config["features"]["cosine_memory_mb"] << 20))
    f.notes.append("CPU; 1M-code batches + per-feature top-k; the token index's modality column")
    plans.append(f)

    n_methods, n_frac = len(sc["methods"]), len(sc["fractions"])
    s = StagePlan("score", jobs=len(score_layers))
    s.disk = {"scores.parquet": len(score_layers) * n_pool * n_methods * 8 + n_pool * 24,
              "subsets (id lists)": n_methods * sum(sc["fractions"]) * n_pool * 24}
    img_tokens = n_pool * tc_pool.image
    # + offdist's per-sample sums of unit image states [samples, d] float64 (1.3 GB at 40K x 4,096) and one
    # store block (at most STORE_BLOCK_BYTES of float32, with its masked copy)
    s.host_peak = (BASE_RSS + 4 * P + n_pool * (n_methods * 8 + 200) + sae_rows(d_sae) * d_sae * 4
                   + n_pool * d * 8 + 2 * STORE_BLOCK_BYTES)
    # the SAE and one dense block: on the GPU, or on the host of a CPU job (plan() moves it there; on a CPU
    # the loaded SAE is held beside the host copy counted above: perf/real_width.py measured 4.1 GB, 0.62x
    # of the host peak without it)
    s.gpu_peak = 4 * P + sae_rows(d_sae) * d_sae * 4
    if not on_cpu(config, "score", resources):
        s.gpu_hours = len(score_layers) * tp.hours(4 * d * d_sae * img_tokens, "tf32", sae=True)
    else:
        s.cpu_hours = len(score_layers) * 4 * d * d_sae * img_tokens / (tp.cpu_gflops * 1e9) / 3600
        s.notes.append(f"SAE on the CPU over {img_tokens:,.0f} image tokens (offdist), 4 d d_sae FLOPs each at "
                       f"{tp.cpu_gflops:g} GFLOP/s (issue #15 measured 15 ms/token at 4096 x 65,536)")
    s.notes.append(f"{n_methods} methods x {n_frac} fractions; subsets as id lists (a copy of the records if not)")
    plans.append(s)

    ev = config["evaluate_sae"]
    n_ev = min(n_pool, ev["n_samples"] or n_pool)
    v = StagePlan("evaluate_sae", tokens={"evaluated": n_ev * tc_pool.total})
    v.gpu_peak = wbytes + len(scopes) * 4 * P + ev["batch_size"] * tc_pool.total * (d_sae * 4 * 3 + 8 * d * 4)
    v.host_peak = BASE_RSS + wbytes
    base = 1 + (1 if ev["base_model"] else 0)
    v.gpu_hours = tp.hours((2 * info.params * (1 + len(scopes)) * base) * n_ev * tc_pool.total, "bf16")
    plans.append(v)

    for name, passes in (("model_loss", 1), ("baseline_scores", 2)):
        m = StagePlan(name, tokens={"forward": passes * n_pool * tc_pool.total})
        m.gpu_peak, m.host_peak = wbytes + config[name]["batch_size"] * tc_pool.total * (8 * d) * 4, BASE_RSS + wbytes
        m.gpu_hours = tp.hours(2 * info.params * passes * n_pool * tc_pool.total, "bf16")
        plans.append(m)

    cv = config["curve"]
    if cv["enabled"]:
        arms = len(cv["methods"]) * len(cv["fractions"]) + len(cv["random_seeds"]) * len(cv["fractions"]) + 1
        ft = config["finetune"]
        tok = ft["max_steps"] * ft["batch_size"] * tc_pool.total
        fp = StagePlan("finetune", jobs=arms, tokens={"trained": arms * tok})
        fp.disk = {"models": arms * wbytes}
        fp.gpu_peak = (wbytes + 12 * info.params) if not ft["lora"] else wbytes * 1.2
        fp.host_peak = BASE_RSS + wbytes
        fp.gpu_hours = arms * tp.hours(6 * info.params * tok, "bf16")
        fp.notes.append(f"{arms} arms; full fine-tune: weights + fp32 Adam (ZeRO-3 splits it over GPUs)")
        plans.append(fp)
    return plans


# -- the Slurm profile ----------------------------------------------------------------------------
def profile_resources(profile: str | Path) -> dict[str, dict[str, Any]]:
    """{rule: {mem_mb, runtime, gpu}} from a Snakemake profile's default- and set-resources."""
    cfg = yaml.safe_load(Path(profile).read_text()) or {}
    default = cfg.get("default-resources") or {}
    out = {}
    named = cfg.get("set-resources") or {}
    for rule in STAGE_RULES + ("sae_extract", "extract_shard", "score_shard"):
        # the SAE corpus's extraction runs as extract does unless the profile names it
        own = named.get(rule) or (named.get("extract") if rule == "sae_extract" else None) or {}
        r = {**default, **own}
        out[rule] = {"mem_mb": int(r.get("mem_mb", 0)), "runtime": int(r.get("runtime", 0)), "gpu": int(r.get("gpu", 0))}
    return out


def check_profile(plans: list[StagePlan], resources: dict[str, dict[str, Any]], tp: Throughput) -> list[str]:
    """Flag each stage whose one job will not fit its rule's resources; and the disk."""
    flags = []
    for p in plans:
        r = resources.get(p.stage)
        if r is None:
            continue
        if r["mem_mb"] and p.host_peak > r["mem_mb"] * 2**20:
            p.flags.append(f"host memory {p.host_peak / GB:.1f} GiB > mem_mb {r['mem_mb']} ({r['mem_mb'] / 1024:.1f} GiB)")
        if p.gpu_peak and not r["gpu"]:
            p.flags.append("needs a GPU; the profile gives it none")
        if r["gpu"] and p.gpu_peak > tp.gpu_mem_gb * GB * r["gpu"]:
            p.flags.append(f"GPU memory {p.gpu_peak / GB:.1f} GiB > {tp.gpu_mem_gb:g} GiB x {r['gpu']} GPU")
        per_job_min = (p.gpu_hours + p.cpu_hours) * 60 / max(1, p.jobs)
        if r["runtime"] and per_job_min > r["runtime"]:
            p.flags.append(f"runtime {per_job_min:,.0f} min per job > runtime {r['runtime']} min")
        flags += [f"{p.stage}: {x}" for x in p.flags]
    disk = sum(p.disk_total for p in plans)
    if disk > tp.disk_gb * GB:
        flags.append(f"disk: {disk / GB:,.0f} GiB > the {tp.disk_gb:,.0f} GiB assumed free (--disk-gb)")
    return flags


# -- config, CLI, output --------------------------------------------------------------------------
def load_plan_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """A config with the schema's defaults; sections the schema does not know yet (e.g. `sae_data`
    before it lands) pass through unvalidated, so the plan reads them when present."""
    raw = (yaml.safe_load(Path(path).read_text()) or {}) if path else {}
    for k, v in (overrides or {}).items():
        if isinstance(v, dict) and isinstance(raw.get(k), dict):
            raw[k] = {**raw[k], **v}
        else:
            raw[k] = v
    known = load_schema()["properties"]
    extra = {k: v for k, v in raw.items() if k not in known}
    cfg = validate({k: v for k, v in raw.items() if k in known}, path or "config")
    return {**cfg, **extra}


def corpus_section(config: dict[str, Any]) -> dict[str, Any] | None:
    """The SAE corpus (`sae_data`), or None when it is missing or null (the SAE learns from `data`)."""
    sae_data = config.get("sae_data")
    return dict(sae_data) if sae_data and sae_data.get("source") else None


def stage_device(config: dict[str, Any], stage: str) -> str:
    """'cpu' when the config pins the stage to the CPU, else 'auto' (a GPU where the job has one)."""
    key = {"train_sae": config["train_sae"]["device"], "encode": config["encode"]["device"],
           "score": config["score"]["device"]}.get(stage, config["model"]["device"])
    return "cpu" if key == "cpu" else "auto"


# the SAE stages, whose device key may be auto: on a job without a GPU they run on the CPU, holding on the
# host what they would hold on the device (the model stages then only flag: a model forward needs a GPU)
SAE_STAGES = ("train_sae", "encode", "score")


def on_cpu(config: dict[str, Any], stage: str, resources: dict[str, dict[str, Any]] | None) -> bool:
    """Whether the stage's job runs on the CPU: the config pins it there, or (an SAE stage with device auto)
    the profile gives its rule no GPU. Without a profile, auto counts as a GPU."""
    if stage_device(config, stage) == "cpu":
        return True
    r = (resources or {}).get(stage)
    return stage in SAE_STAGES and r is not None and not r["gpu"]


def plan(config: dict[str, Any], model_config: str | None = None, sample_rows: int = 64,
         tp: Throughput | None = None, profile: str | Path | None = None,
         pool_override: tuple[int, TokenCounts] | None = None,
         corpus_override: tuple[int, TokenCounts] | None = None, relu_l0: int = RELU_L0) -> dict[str, Any]:
    """The whole plan as a JSON-ready dict ({inputs, sources, stages, flags, totals})."""
    tp = tp or Throughput()
    info = load_model_info(config, model_config)
    processor = load_processor(config, model_config)
    ex = config["extract"]
    max_len = ex["max_length"] if ex["too_long"] == "truncate" else None

    def source(data: dict[str, Any], n: int | None, seed: int, include_response: bool) -> tuple[int, TokenCounts]:
        total, rows = read_source(data, n, sample_rows, config["toyworld"], seed)
        return total, count_tokens(rows, info, processor, include_response, max_len)

    pool = pool_override or source(config["data"], config["sample"]["n"], 0, ex["include_response"])
    corpus_cfg = corpus_section(config)
    corpus = corpus_override
    if corpus is None and corpus_cfg is not None:
        data = {**config["data"], **corpus_cfg}
        corpus = source(data, corpus_cfg.get("n"), int(corpus_cfg.get("seed", 0)) + 1, ex["include_response"])
    resources = profile_resources(profile) if profile else None
    plans = build_plan(config, info, pool, corpus, tp, relu_l0, resources)
    for p in plans:  # a stage on the CPU (config or a job without a GPU) holds its device memory on the host
        if p.gpu_peak and on_cpu(config, p.stage, resources):
            p.host_peak += p.gpu_peak
            p.gpu_peak = 0.0
            p.notes.append("on the CPU: device memory counted on the host")
    flags = check_profile(plans, resources, tp) if resources else []
    d_sae = dictionary_size(config["train_sae"]["expansion"], info.d_model)

    def src(name: str, s: tuple[int, TokenCounts] | None) -> dict[str, Any] | None:
        return None if s is None else {"rows": s[0], "per_sample": asdict(s[1]), "tokens": s[0] * s[1].total}

    return {
        "inputs": {"model": model_config or config["model"]["path"], "model_type": info.model_type,
                   "d_model": info.d_model, "n_layers": info.n_layers, "params": info.params,
                   "weights_bytes": info.weights_bytes, "d_sae": d_sae, "sample_rows": sample_rows,
                   "tokenizer": processor is not None, "throughput": asdict(tp), "profile": str(profile) if profile else None},
        "sources": {"pool": src("pool", pool), "corpus": src("corpus", corpus)},
        "stages": {p.stage: {**asdict(p), "disk_total": p.disk_total} for p in plans},
        "totals": {"disk": sum(p.disk_total for p in plans), "gpu_hours": sum(p.gpu_hours for p in plans),
                   "cpu_hours": sum(p.cpu_hours for p in plans)},
        "flags": flags,
    }


def _size(b: float) -> str:
    for unit, scale in (("TiB", 1024**4), ("GiB", GB), ("MiB", 2**20), ("KiB", 1024)):
        if b >= scale:
            return f"{b / scale:,.1f} {unit}"
    return f"{b:,.0f} B"


def render_markdown(p: dict[str, Any]) -> str:
    i = p["inputs"]
    lines = [f"# Plan: {i['model']} ({i['model_type']}, d_model {i['d_model']}, {i['params'] / 1e9:.2f}B params), "
             f"d_sae {i['d_sae']:,}", ""]
    for name, s in p["sources"].items():
        if s:
            ps = s["per_sample"]
            lines.append(f"- {name}: {s['rows']:,} rows x {ps['text'] + ps['image'] + ps['special']:,.0f} tokens/sample "
                         f"(text {ps['text']:,.0f}, image {ps['image']:,.0f}, special {ps['special']:,.0f}; "
                         f"{ps['images']:.2f} images) = {s['tokens']:,.0f} tokens")
    tp = i["throughput"]
    lines += [f"- text tokens by {'the model tokenizer' if i['tokenizer'] else 'characters / 4'}, from the first "
              f"{i['sample_rows']} rows; GPU-hours at bf16 {tp['bf16_tflops']:g} / TF32 {tp['tf32_tflops']:g} TFLOP/s "
              f"x {tp['model_utilisation']:g} (model) / {tp['sae_utilisation']:g} (SAE)", "",
              "| stage | jobs | disk | host peak / job | GPU peak / job | GPU-hours | CPU-hours | artifacts | notes |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, s in p["stages"].items():
        arts = "; ".join(f"{k} {_size(v)}" for k, v in s["disk"].items())
        notes = "; ".join(s["notes"] + [f"**{x}**" for x in s["flags"]])
        lines.append(f"| {name} | {s['jobs']} | {_size(s['disk_total'])} | {_size(s['host_peak'])} | "
                     f"{_size(s['gpu_peak']) if s['gpu_peak'] else '-'} | {s['gpu_hours']:,.2f} | "
                     f"{s['cpu_hours']:,.1f} | {arts} | {notes} |")
    t = p["totals"]
    lines += ["", f"Total disk {_size(t['disk'])}, {t['gpu_hours']:,.1f} GPU-hours, {t['cpu_hours']:,.1f} CPU-hours "
              "(SAE work on CPU jobs; model forwards on a CPU are not estimated).", ""]
    lines += ["## Will not fit", ""] + [f"- {x}" for x in p["flags"]] if p["flags"] else ["Everything fits the profile."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mmsae.plan", description=__doc__.split("\n\n")[0])
    ap.add_argument("--configfile", help="config YAML (default: the schema's defaults, i.e. the toy demo)")
    ap.add_argument("--config-json", help="overrides as a JSON object of sections (as snakemake passes it)")
    ap.add_argument("--model-config", help="a folder with the model's config.json (instead of model.path)")
    ap.add_argument("--sample-rows", type=int, default=64, help="rows read to measure tokens per sample")
    ap.add_argument("--profile", default="profiles/slurm/config.yaml", help="Slurm profile to check against ('' = none)")
    ap.add_argument("--rows", type=int, help="pool rows (instead of the data set's count)")
    ap.add_argument("--tokens-per-sample", type=float, help="pool tokens per sample (instead of reading rows)")
    ap.add_argument("--image-share", type=float, default=0.984, help="with --tokens-per-sample: image share")
    ap.add_argument("--corpus-rows", type=int, help="with --corpus-tokens-per-sample: an SAE corpus of this size")
    ap.add_argument("--corpus-tokens-per-sample", type=float)
    for f in Throughput.__dataclass_fields__:
        ap.add_argument("--" + f.replace("_", "-"), type=float, default=getattr(Throughput(), f))
    ap.add_argument("--relu-l0", type=int, default=RELU_L0, help="codes per token of a relu SAE (the paper: 190)")
    ap.add_argument("--out", help="folder for plan.md + plan.json (default: print the markdown)")
    a = ap.parse_args(argv)
    config = load_plan_config(a.configfile, json.loads(a.config_json) if a.config_json else None)
    tp = Throughput(**{f: getattr(a, f) for f in Throughput.__dataclass_fields__})

    def given(rows: int | None, per: float | None) -> tuple[int, TokenCounts] | None:
        if per is None:
            return None
        image = per * a.image_share
        return int(rows or 0), TokenCounts(per - image, image, 0.0, 1.0)

    p = plan(config, a.model_config, a.sample_rows, tp, a.profile or None,
             given(a.rows, a.tokens_per_sample), given(a.corpus_rows, a.corpus_tokens_per_sample), a.relu_l0)
    if a.rows and a.tokens_per_sample is None:
        raise SystemExit("plan: --rows needs --tokens-per-sample (else the data set's count is used)")
    md = render_markdown(p)
    if a.out:
        with atomic_dir(a.out) as tmp:
            write_json(tmp / "plan.json", p)
            (tmp / "plan.md").write_text(md)
    sys.stdout.write(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
