"""The adapter interface every model family implements (see mmsae.models.adapters): token marks,
`BatchMeta`, and `ModelAdapter` with the defaults most families share."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from torch import nn

from mmsae.data.schema import Record
from mmsae.errors import InputError
from mmsae.models.prompts import format_response, format_segments

TEXT, IMAGE, SPECIAL = "text", "image", "special"


@dataclass
class BatchMeta:
    """Per-token description of a padded batch [B, T] (numpy arrays, right padding).

    `attention_mask` marks real tokens; every other per-token array is meaningful only there.
    `position` is the index in the sample's unpadded sequence (with right padding: the column).
    """

    sample_ids: list[str]
    attention_mask: np.ndarray  # bool [B, T]
    token_id: np.ndarray  # int64 [B, T]
    modality: np.ndarray  # object [B, T]: image | text | special
    is_response: np.ndarray  # bool [B, T]
    patch: np.ndarray  # int32 [B, T]: index among its image's tokens, -1 elsewhere
    image_index: np.ndarray | None = None  # int16 [B, T]: which image of the sample (0, 1, ...), -1 elsewhere

    @property
    def position(self) -> np.ndarray:
        return np.broadcast_to(np.arange(self.attention_mask.shape[1], dtype=np.int32), self.attention_mask.shape)

    @property
    def n_image_tokens(self) -> np.ndarray:
        return ((self.modality == IMAGE) & self.attention_mask).sum(axis=1)

    def tokens_frame(self) -> pd.DataFrame:
        """One row per real token, in row-major order: the order of `hidden[attention_mask]`."""
        m = self.attention_mask
        rows, _ = np.nonzero(m)
        return pd.DataFrame(
            {
                "sample_id": np.asarray(self.sample_ids, dtype=object)[rows],
                "position": self.position[m].astype(np.int32),
                "modality": self.modality[m],
                "token_id": self.token_id[m].astype(np.int32),
                "is_response": self.is_response[m],
                "patch": self.patch[m].astype(np.int32),
                "image_index": (self.image_index[m] if self.image_index is not None
                                else np.where(self.modality[m] == IMAGE, 0, -1)).astype(np.int16),
            }
        )


class ModelAdapter:
    """Base adapter: a HF image-text-to-text model with a processor and a chat template.

    Subclasses set the class attributes and override the few hooks where their family differs:
    `encode` (texts + images -> tensors), `prompt` (one record's prompt text), `_placeholder_expansion`
    (what one image placeholder of the prompt becomes in `input_ids`), `_extra_special_ids`.
    """

    family: ClassVar[str] = "base"
    model_types: ClassVar[tuple[str, ...]] = ()
    auto_model: ClassVar[str] = "AutoModelForImageTextToText"  # transformers auto class that loads it
    layers_path: ClassVar[str] = "model.language_model.layers"  # attribute path of the decoder layers

    def __init__(self, model: nn.Module, processor: Any, path: str = "<memory>") -> None:
        self.model, self.processor, self.path = model, processor, str(path)
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.tokenizer.padding_side = "right"  # positions = columns; pads only ever follow real tokens
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.unk_token or self.tokenizer.eos_token
        if processor is not self.tokenizer and getattr(processor, "chat_template", None) is None:
            # some processors (ChameleonProcessor in transformers 5.23) drop the saved template on load;
            # the tokenizer read the same chat_template file
            processor.chat_template = getattr(self.tokenizer, "chat_template", None)
        self.image_token_id = self._image_token_id()
        self.special_ids = (frozenset(int(i) for i in self.tokenizer.all_special_ids) | self._extra_special_ids()) - {
            self.image_token_id}

    def _image_token_id(self) -> int | None:
        return int(self.model.config.image_token_id)

    def _extra_special_ids(self) -> frozenset[int]:
        """Token ids marked `special` besides the tokenizer's special tokens (image sentinels)."""
        return frozenset()

    @classmethod
    def load_processor(cls, path: str, trust_remote_code: bool = False) -> Any:
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)

    # -- model structure --------------------------------------------------------------------------
    @property
    def text_config(self) -> Any:
        return self.model.config.get_text_config()

    @property
    def d_model(self) -> int:
        return int(self.text_config.hidden_size)

    @property
    def n_layers(self) -> int:
        return len(self.decoder_layers())

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def context_length(self) -> int | None:
        """The longest sequence the language model was built for (max_position_embeddings), if it says."""
        n = getattr(self.text_config, "max_position_embeddings", None)
        return int(n) if isinstance(n, int) and n > 0 else None

    def decoder_layers(self) -> nn.ModuleList:
        return attrgetter(self.layers_path)(self.model)

    def check_layers(self, layers: Sequence[int], field: str = "extract.layers") -> list[int]:
        """The layers as ints; InputError naming `field` when one is outside the model's depth."""
        n = self.n_layers
        bad = [int(layer) for layer in layers if not 0 <= int(layer) < n]
        if bad:
            raise InputError(self.path, field, f"layer(s) {bad} out of range: the model has {n} decoder layers (0..{n - 1})")
        if not layers:
            raise InputError(self.path, field, "no layers given")
        return [int(layer) for layer in layers]

    def image_grid(self) -> dict[str, int] | None:
        """The base patch grid {rows, cols, first} (mmsae.models.grid: patch index `first + r * cols + c`
        is cell (r, c)); None when not fixed."""
        return None

    # -- inputs ------------------------------------------------------------------------------------
    def prompt(self, record: Record) -> str:
        """The user turn with one image placeholder per image, placed as `Record.segments()` says."""
        try:
            segments = record.segments()
        except ValueError as exc:
            raise InputError(self.path, "question", f"sample {record.sample_id!r}: {exc}") from exc
        return format_segments(self.processor, segments)

    def image_token_counts(self, images: Sequence[Any]) -> list[int] | None:
        """Image tokens the processor gives each of `images` (PIL), in order: its own per-size count
        (transformers' `_get_num_multimodal_tokens`); None when the processor cannot say."""
        if not images:
            return []
        count = getattr(self.processor, "_get_num_multimodal_tokens", None)
        if count is None:
            return None
        sizes = [(im.height, im.width) for im in images]
        return [int(n) for n in count(image_sizes=sizes).num_image_tokens]

    def texts(self, records: Sequence[Record], include_response: bool) -> tuple[list[str], list[str]]:
        """(prompts, full texts) in the shared prompt format."""
        prompts = [self.prompt(r) for r in records]
        if not include_response:
            return prompts, list(prompts)
        return prompts, [p + format_response(self.processor, r.preferred_response) for p, r in zip(prompts, records, strict=True)]

    def processor_kwargs(self) -> dict[str, Any]:
        return {}

    def encode(self, texts: list[str], images: list[Any]) -> dict[str, torch.Tensor]:
        """Tokenise (right padding) and preprocess the images; the processor expands image placeholders."""
        return dict(self.processor(text=texts, images=images or None, padding=True, padding_side="right",
                                   return_tensors="pt", **self.processor_kwargs()))

    def prompt_ids(self, prompt: str) -> list[int]:
        """The prompt tokenised alone, placeholders not expanded (as the processor tokenises text)."""
        return self.tokenizer(prompt)["input_ids"]

    def image_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.image_token_id is None:
            return torch.zeros_like(input_ids, dtype=torch.bool)
        return input_ids == self.image_token_id

    def build_batch(self, records: Sequence[Record], include_response: bool,
                    max_length: int | None = None) -> tuple[dict[str, torch.Tensor], BatchMeta]:
        """Model inputs (on the model's device) and per-token metadata for `records`.

        `max_length` cuts sequences on the right; cutting into image tokens is an InputError
        (the model cannot run with a partial image).
        """
        if not records:
            raise ValueError("build_batch: no records")
        prompts, texts = self.texts(records, include_response)
        inputs = self.encode(texts, [im for r in records for im in r.images])
        input_ids = inputs["input_ids"]
        attn = inputs.get("attention_mask")
        if attn is None:
            attn = torch.ones_like(input_ids)
            inputs["attention_mask"] = attn
        is_image = self.image_mask(input_ids)
        if max_length is not None and input_ids.shape[1] > max_length:
            kept = is_image[:, :max_length].sum(1)
            lost = (kept != is_image.sum(1)).nonzero().flatten().tolist()
            if lost:
                sid = records[lost[0]].sample_id
                raise InputError(self.path, "extract.max_length",
                                 f"max_length {max_length} cuts into the image tokens of sample {sid!r} "
                                 f"({int(is_image[lost[0]].sum())} image tokens)")
            seq = input_ids.shape[1]
            for key, value in inputs.items():
                if torch.is_tensor(value) and value.dim() == 2 and value.shape == (len(records), seq):
                    inputs[key] = value[:, :max_length]
            input_ids, attn, is_image = inputs["input_ids"], inputs["attention_mask"], is_image[:, :max_length]
        self._check_right_padding(attn)

        ids = input_ids.numpy().astype(np.int64)
        mask = attn.numpy().astype(bool)
        img = is_image.numpy()
        special = np.isin(ids, np.fromiter(self.special_ids, dtype=np.int64, count=len(self.special_ids)))
        modality = np.where(img, IMAGE, np.where(special, SPECIAL, TEXT)).astype(object)
        counts = [self.image_token_counts(r.images) for r in records]
        patch, image_index = self._image_positions(img, counts, records)
        is_response = np.zeros_like(mask)
        if include_response:
            for b, start in enumerate(self._response_starts(prompts, ids, mask, counts)):
                is_response[b, start:] = True
            is_response &= mask
        meta = BatchMeta([r.sample_id for r in records], mask, ids, modality, is_response, patch, image_index)
        device = self.device
        inputs = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in inputs.items()}
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        return inputs, meta

    @staticmethod
    def _check_right_padding(attn: torch.Tensor) -> None:
        lengths = attn.sum(1)
        expected = torch.arange(attn.shape[1])[None, :] < lengths[:, None]
        if not torch.equal(attn.bool(), expected):
            raise RuntimeError("processor did not right-pad the batch (attention mask is not a prefix)")

    def _image_positions(self, img: np.ndarray, counts: list[list[int] | None],
                         records: Sequence[Record]) -> tuple[np.ndarray, np.ndarray]:
        """(patch, image_index) [B, T]: each row's image tokens split into its images by `counts` (image
        k's tokens follow image k-1's, as the processor expands the placeholders in order); patch
        restarts at 0 for every image."""
        patch = np.full(img.shape, -1, np.int32)
        image_index = np.full(img.shape, -1, np.int16)
        for b, n in enumerate(counts):
            cols = np.nonzero(img[b])[0]
            if n is None:  # a processor that cannot count per image: fine for one image, not for several
                if len(records[b].images) > 1:
                    raise InputError(self.path, "extra_images", f"sample {records[b].sample_id!r}: this model's "
                                     "processor does not give image-token counts per image; one image per sample")
                n = counts[b] = [len(cols)] if records[b].images else []
            if sum(n) != len(cols):
                raise RuntimeError(f"sample {records[b].sample_id!r}: {len(cols)} image tokens, but the processor "
                                   f"counts {n} for its {len(n)} images")
            which = np.repeat(np.arange(len(n)), n)
            image_index[b, cols] = which
            patch[b, cols] = np.arange(len(cols)) - np.concatenate([[0], np.cumsum(n)[:-1]]).astype(np.int64)[which]
        return patch, image_index

    def _placeholder_expansion(self, n: int) -> list[int]:
        """The ids one image placeholder of the prompt becomes in `input_ids`, for `n` image tokens."""
        return [self.image_token_id] * n

    def _response_starts(self, prompts: list[str], ids: np.ndarray, mask: np.ndarray,
                         counts: list[list[int]]) -> list[int]:
        """Index of the first response token per row: the end of the common prefix of the full sequence
        and the (image-expanded: image k's placeholder becomes counts[b][k] tokens) prompt tokenised alone,
        so a token merged across the boundary counts as response."""
        starts = []
        for b, prompt in enumerate(prompts):
            per_image = iter(counts[b])
            expanded: list[int] = []
            for t in self.prompt_ids(prompt):
                if t == self.image_token_id:
                    expanded.extend(self._placeholder_expansion(next(per_image, 0)))
                else:
                    expanded.append(t)
            row = ids[b][mask[b]]
            n = min(len(expanded), len(row))
            diff = np.nonzero(row[:n] != np.asarray(expanded[:n], dtype=np.int64))[0]
            starts.append(int(diff[0]) if len(diff) else n)
        return starts

    # -- forward -----------------------------------------------------------------------------------
    def forward(self, inputs: dict[str, torch.Tensor], **kwargs: Any) -> Any:
        return self.model(**inputs, use_cache=False, **kwargs)

    def final_hidden(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Last hidden state [B, T, d] after the final norm (what the LM head reads)."""
        return self.model.model(**inputs, use_cache=False).last_hidden_state

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.get_output_embeddings()(hidden)
