"""The layout check: TRL's collated batch against `ModelAdapter.build_batch`, so the fine-tuned model is
trained on the token layout every other stage feeds it."""

from __future__ import annotations

import dataclasses
from typing import Any

import pandas as pd
import torch

from mmsae.data.schema import records_from_frame
from mmsae.finetune.data import build_dataset


def check_layout(model: Any, processor: Any, df: pd.DataFrame, method: str, n: int,
                 path: str = "<model>") -> dict[str, Any]:
    """Collate the first `n` records with TRL's vision collator and compare with our build_batch.

    Compares, per row, the input ids (image tokens by position; for Chameleon the placeholders, before
    any VQ codes are written) and the loss positions (TRL's labels / completion_mask vs
    `BatchMeta.is_response`). Returns {"checked", "identical", "mismatches": [...]}.
    """
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    from mmsae.models import adapter_class
    from mmsae.models.adapters import ModelAdapter

    sub = df.iloc[:n].reset_index(drop=True)
    records = records_from_frame(sub)
    ds = build_dataset(sub, processor, method)
    examples = [dict(ds[i]) for i in range(len(ds))]
    if method == "sft":
        batch = DataCollatorForVisionLanguageModeling(processor=processor, completion_only_loss=True)(examples)
        loss_mask = batch["labels"] != -100
        variants = [records]
    else:
        batch = DataCollatorForVisionPreference(processor=processor)(examples)
        loss_mask = batch["completion_mask"].bool()
        rejected = []
        for r in records:
            j = next(i for i in range(len(r.responses)) if i != r.preferred)
            rejected.append(dataclasses.replace(r, preferred=j))  # every image kept
        variants = [records, rejected]  # TRL: chosen rows first, then rejected rows
    ids, attn = batch["input_ids"], batch["attention_mask"].bool()

    cls = adapter_class(model.config, path)
    tokenizer = getattr(processor, "tokenizer", processor)
    padding_side = tokenizer.padding_side
    adapter = cls(model, processor, path)
    tokenizer.padding_side = padding_side  # the adapter sets right padding; leave the processor as it was
    mismatches: list[dict[str, Any]] = []
    row = 0
    for variant in variants:
        # the base build_batch: tokens only, no model forward (Chameleon's VQ step is not run)
        inputs, meta = ModelAdapter.build_batch(adapter, variant, include_response=True)
        ours = inputs["input_ids"].cpu()
        for b, rec in enumerate(variant):
            ours_ids = ours[b][torch.from_numpy(meta.attention_mask[b])].tolist()
            ours_resp = meta.is_response[b][meta.attention_mask[b]].tolist()
            trl_ids = ids[row][attn[row]].tolist()
            trl_resp = loss_mask[row][attn[row]].tolist()
            if ours_ids != trl_ids or ours_resp != trl_resp:
                mismatches.append({"sample_id": rec.sample_id, "row": row, "ours": ours_ids, "trl": trl_ids,
                                   "ours_loss_positions": [i for i, x in enumerate(ours_resp) if x],
                                   "trl_loss_positions": [i for i, x in enumerate(trl_resp) if x]})
            row += 1
    return {"checked": row, "identical": not mismatches, "mismatches": mismatches[:3]}
