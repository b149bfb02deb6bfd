"""Stage baseline_scores: the per-sample reference scores of the SAE-V rebuttal, IFD and CLIP score.

IFD (instruction-following difficulty, Li et al. 2024, "From Quantity to Quality")
    IFD = L(answer | image, question) / L(answer alone): mean next-token loss (nats) of the preferred
    response given the pipeline's prompt (`mmsae.models.loss.response_loss`) over its loss after only a
    BOS token (EOS for tokenizers without BOS). Direction: HIGHER IFD = the image and question help
    less to predict the answer = a harder, more informative sample in Li et al., who keep the highest
    IFD after removing IFD >= 1 (the prompt does not help at all: misaligned). `ifd_score` follows
    that published selection (higher = kept first): IFD below the threshold as is, IFD >= threshold
    mapped to threshold - IFD (<= 0, below every kept sample). We reproduce the baseline as published
    rather than tune its sign to our toy world, where every corruption kind raises the conditional
    loss and so IFD: there the threshold is what removes bad samples, and its AUROC should be read in
    both directions.

CLIP score (DataComp style)
    Cosine similarity of the CLIP image embedding and the text embedding (question + preferred
    response by default, truncated to CLIP's context). Higher = better aligned = kept first. Only with
    a local CLIP model folder configured; otherwise skipped with a logged reason, never faked.

Reads SAMPLE_DIR/samples.parquet (record schema) and writes, atomically:
  OUT/ifd.parquet    sample_id, loss_conditioned, loss_answer, ifd, ifd_score, n_tokens
  OUT/clip.parquet   sample_id, clip_score                        (only with clip_model)
  OUT/manifest.json  counts include clip_skipped (the reason) when there is no CLIP score

Example:
  python workflow/scripts/baseline_scores.py --samples results/demo/sample-xxxx --model path/to/model \\
      --out results/demo/baseline_scores-yyyy --params '{"clip_model": "/models/clip-vit-large-patch14"}'
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from mmsae import cli
from mmsae.artifacts import Files, Timer, atomic_dir, write_manifest
from mmsae.data.schema import Record
from mmsae.errors import InputError
from mmsae.models.adapters import ModelAdapter
from mmsae.models.prompts import format_response
from mmsae.params import BaselineScoresParams

log = logging.getLogger("mmsae.benchmarks")

# --------------------------------------------------------------------------------------------------
# IFD


@torch.inference_mode()
def answer_only_loss(adapter: ModelAdapter, records: Sequence[Record], batch_size: int) -> pd.DataFrame:
    """Mean next-token NLL (nats) of each record's preferred response with nothing before it but BOS
    (EOS for a tokenizer without BOS): the denominator of IFD. Columns: sample_id, loss, n_tokens."""
    tok = adapter.tokenizer
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    if start is None:
        raise InputError(adapter.path, "tokenizer", "no BOS or EOS token to start the answer-only sequence")
    ids, losses, counts = [], [], []
    for b0 in range(0, len(records), batch_size):
        batch = records[b0:b0 + batch_size]
        seqs = [[start, *tok(format_response(adapter.processor, r.preferred_response),
                             add_special_tokens=False)["input_ids"]] for r in batch]
        length = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), length), tok.pad_token_id, dtype=torch.long)
        attn = torch.zeros_like(input_ids)
        for i, s in enumerate(seqs):
            input_ids[i, :len(s)] = torch.tensor(s)
            attn[i, :len(s)] = 1
        target = attn.bool().clone()
        target[:, 0] = False
        rows, cols = target.nonzero(as_tuple=True)
        device = adapter.device
        hidden = adapter.final_hidden({"input_ids": input_ids.to(device), "attention_mask": attn.to(device)})
        logits = adapter.lm_head(hidden[rows.to(device), (cols - 1).to(device)]).float()
        nll = F.cross_entropy(logits, input_ids[rows, cols].to(device), reduction="none").cpu().double()
        sums = torch.zeros(len(batch), dtype=torch.float64).index_add_(0, rows, nll)
        n = torch.bincount(rows, minlength=len(batch))
        for i, r in enumerate(batch):
            ids.append(r.sample_id)
            counts.append(int(n[i]))
            losses.append(float(sums[i] / n[i]) if n[i] else math.nan)
    return pd.DataFrame({"sample_id": pd.Series(ids, dtype=str), "loss": np.asarray(losses, dtype=np.float64),
                         "n_tokens": np.asarray(counts, dtype=np.int64)})


def ifd_scores(adapter: ModelAdapter, records: Sequence[Record], batch_size: int = 32,
               threshold: float = 1.0) -> pd.DataFrame:
    """Per sample: loss_conditioned (image + question), loss_answer (answer alone), ifd (their ratio),
    ifd_score (Li et al.'s selection, higher = kept first; see the module docstring), n_tokens."""
    from mmsae.models.loss import response_loss

    meta = getattr(records, "meta", None)  # ParquetRecords: check the texts without decoding any image
    if meta is not None:
        missing = [s for s, resp in zip(meta["sample_id"], meta["responses"], strict=True) if resp is None or not len(resp)]
    else:
        missing = [r.sample_id for r in records if not r.responses]
    if missing:
        raise InputError("samples", "responses", f"sample {missing[0]!r}: IFD needs a response")
    cond = response_loss(adapter, records, batch_size, progress=False)
    alone = answer_only_loss(adapter, records, batch_size)
    ifd = cond["loss"].to_numpy() / alone["loss"].to_numpy()
    score = np.where(ifd < threshold, ifd, threshold - ifd)
    score = np.where(np.isnan(ifd), -np.inf, score)
    n_nan = int(np.isnan(ifd).sum())
    if n_nan:
        log.warning("ifd: %d samples without scorable response tokens get ifd NaN, ifd_score -inf", n_nan)
    return pd.DataFrame({"sample_id": cond["sample_id"], "loss_conditioned": cond["loss"],
                         "loss_answer": alone["loss"], "ifd": ifd, "ifd_score": score,
                         "n_tokens": cond["n_tokens"]})


# --------------------------------------------------------------------------------------------------
# CLIP score


def clip_text(record: Record, mode: str) -> str:
    if mode == "question":
        return record.question
    response = record.preferred_response or ""
    return response if mode == "response" else f"{record.question} {response}".strip()


@torch.inference_mode()
def clip_scores(records: Sequence[Record], clip_model: str | os.PathLike | None, text: str = "question_response",
                batch_size: int = 32, device: str = "cpu") -> tuple[pd.DataFrame | None, str | None]:
    """(frame sample_id / clip_score, None), or (None, reason) when no CLIP model is configured.

    clip_score = cosine(image embedding, text embedding) of a transformers CLIPModel from a local folder
    (its tokenizer and image processor from the same folder); texts truncated to the model's context.
    """
    if not clip_model:
        reason = "no CLIP model configured (baseline_scores.clip_model is null)"
        log.info("clip score skipped: %s", reason)
        return None, reason
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    path = str(clip_model)
    if not Path(path).is_dir():
        raise InputError(path, "baseline_scores.clip_model", "not a local folder")
    model = CLIPModel.from_pretrained(path, use_safetensors=True).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    image_processor = AutoImageProcessor.from_pretrained(path)
    max_len = int(model.config.text_config.max_position_embeddings)
    ids, scores = [], []
    for b0 in range(0, len(records), batch_size):
        batch = records[b0:b0 + batch_size]
        t = tokenizer([clip_text(r, text) for r in batch], padding=True, truncation=True, max_length=max_len,
                      return_tensors="pt")
        px = image_processor(images=[r.image for r in batch], return_tensors="pt")["pixel_values"]
        img = _features(model.get_image_features(pixel_values=px.to(device)))
        txt = _features(model.get_text_features(input_ids=t["input_ids"].to(device),
                                                attention_mask=t["attention_mask"].to(device)))
        scores.extend(F.cosine_similarity(img.float(), txt.float(), dim=-1).cpu().tolist())
        ids.extend(r.sample_id for r in batch)
    return pd.DataFrame({"sample_id": pd.Series(ids, dtype=str), "clip_score": np.asarray(scores)}), None


def _features(out: Any) -> torch.Tensor:
    """get_*_features returns a tensor, or (newer transformers) an output with pooler_output."""
    return out if torch.is_tensor(out) else out.pooler_output


# --------------------------------------------------------------------------------------------------
# the stage

STAGE = "baseline_scores"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Inputs(cli.ModelInputs):
    """--samples, --model, --model-params: the records to score and the model that scores them."""


def run(inputs: Inputs, params: BaselineScoresParams, out: Path) -> None:
    timer = Timer()
    records, adapter = cli.load_records_and_model(inputs, timer)
    with timer("ifd"):
        ifd = ifd_scores(adapter, records, params.batch_size, params.ifd_threshold)
    with timer("clip"):
        clip, skipped = clip_scores(records, params.clip_model, params.clip_text, params.batch_size,
                                    device=str(adapter.device))
    with atomic_dir(out) as tmp:
        ifd.to_parquet(tmp / Files.IFD, index=False)
        counts = {"n_samples": len(ifd), "ifd_mean": float(ifd["ifd"].mean()),
                  "ifd_at_or_above_threshold": int((ifd["ifd"] >= params.ifd_threshold).sum())}
        if clip is not None:
            clip.to_parquet(tmp / Files.CLIP, index=False)
            counts["clip_mean"] = float(clip["clip_score"].mean())
        else:
            counts["clip_skipped"] = skipped
        write_manifest(tmp, STAGE, cli.manifest_params(params, inputs.model_params),
                       inputs={"samples": inputs.samples, "model": inputs.model}, counts=counts,
                       timings=timer.timings)
