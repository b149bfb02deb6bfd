"""The model families behind `ModelAdapter` (see mmsae.models.adapters for how each marks its tokens),
and ADAPTERS: each family's adapter by transformers `model_type`."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch

from mmsae.data.schema import Record
from mmsae.models.adapters.base import IMAGE, BatchMeta, ModelAdapter
from mmsae.models.grid import Grid, square_side


class LlavaAdapter(ModelAdapter):
    """LLaVA 1.5 (`llava`): a fixed number of image tokens per image."""

    family = "llava"
    model_types = ("llava",)

    def image_grid(self) -> dict[str, int]:
        vc = self.model.config.vision_config
        side = int(vc.image_size) // int(vc.patch_size)
        first = 1 if getattr(self.model.config, "vision_feature_select_strategy", "default") == "full" else 0
        return Grid(side, side, first).as_dict()


class LlavaNextAdapter(LlavaAdapter):
    """LLaVA-NeXT (`llava_next`, anyres): image-token count per sample depends on the image size;
    `image_sizes` reaches the model (the processor returns it, build_batch checks it is there)."""

    family = "llava_next"
    model_types = ("llava_next",)

    def build_batch(self, records: Sequence[Record], include_response: bool,
                    max_length: int | None = None) -> tuple[dict[str, torch.Tensor], BatchMeta]:
        inputs, meta = super().build_batch(records, include_response, max_length)
        if "pixel_values" in inputs and "image_sizes" not in inputs:
            raise RuntimeError("LLaVA-NeXT processor returned no image_sizes")
        return inputs, meta


class ChameleonAdapter(ModelAdapter):
    """Chameleon / Anole (`chameleon`): real pixels -> VQ codebook tokens, written into `input_ids`."""

    family = "chameleon"
    model_types = ("chameleon",)
    layers_path = "model.layers"

    def _extra_special_ids(self) -> frozenset[int]:
        return frozenset({int(self.processor.image_start_token_id), int(self.processor.image_end_token_id)})

    def processor_kwargs(self) -> dict[str, Any]:
        return {"return_for_text_completion": True}  # no separator appended after the (full) text

    def _placeholder_expansion(self, n: int) -> list[int]:
        return [self.processor.image_start_token_id, *([self.image_token_id] * n), self.processor.image_end_token_id]

    def image_grid(self) -> dict[str, int]:
        n = int(self.processor.image_seq_length)
        side = square_side(n)
        if side is None:
            raise RuntimeError(f"Chameleon image_seq_length {n} is not a square grid")
        return Grid(side, side).as_dict()

    def build_batch(self, records: Sequence[Record], include_response: bool,
                    max_length: int | None = None) -> tuple[dict[str, torch.Tensor], BatchMeta]:
        inputs, meta = super().build_batch(records, include_response, max_length)
        pixel_values = inputs.pop("pixel_values", None)
        if pixel_values is not None:
            with torch.no_grad():
                codes = self.model.model.get_image_tokens(pixel_values)  # [n_images, image_seq_length] vocab ids
            ids = inputs["input_ids"].clone()
            slots = ids == self.image_token_id  # row-major: the order the model's masked_scatter fills
            if int(slots.sum()) != codes.numel():
                raise RuntimeError(f"Chameleon: {int(slots.sum())} image placeholders but {codes.numel()} VQ tokens")
            ids[slots] = codes.flatten().to(ids)
            inputs["input_ids"] = ids
            meta.token_id[meta.modality == IMAGE] = codes.flatten().cpu().numpy()
        return inputs, meta

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().lm_head(hidden)
        logits[..., self.model.model.vocabulary_mapping.image_tokens] = torch.finfo(logits.dtype).min
        return logits


@functools.cache
def image_only_qwen2_vl_processor() -> type:
    """Qwen2VLProcessor without its video processor (which needs torchvision in transformers 5.23);
    images are processed exactly as by the full processor."""
    from transformers import Qwen2VLProcessor

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return ImageOnlyQwen2VLProcessor


class Qwen2VLAdapter(ModelAdapter):
    """Qwen2-VL (`qwen2_vl`): image-token count per image from `image_grid_thw` and the merge size."""

    family = "qwen2_vl"
    model_types = ("qwen2_vl",)

    def _extra_special_ids(self) -> frozenset[int]:
        config = self.model.config
        return frozenset({int(config.vision_start_token_id), int(config.vision_end_token_id)})

    @classmethod
    def load_processor(cls, path: str, trust_remote_code: bool = False) -> Any:
        # always image-only: AutoProcessor would also load the video processor, which needs torchvision
        return image_only_qwen2_vl_processor().from_pretrained(path, trust_remote_code=trust_remote_code)

    def build_batch(self, records: Sequence[Record], include_response: bool,
                    max_length: int | None = None) -> tuple[dict[str, torch.Tensor], BatchMeta]:
        inputs, meta = super().build_batch(records, include_response, max_length)
        if "pixel_values" in inputs and not {"image_grid_thw", "mm_token_type_ids"} <= inputs.keys():
            raise RuntimeError("Qwen2-VL processor returned no image_grid_thw / mm_token_type_ids")
        return inputs, meta


class CausalLMAdapter(ModelAdapter):
    """A text-only base LLM (`AutoModelForCausalLM`): images ignored, every token text or special."""

    family = "causal_lm"
    model_types = ("llama", "mistral", "qwen2")
    auto_model = "AutoModelForCausalLM"
    layers_path = "model.layers"

    def _image_token_id(self) -> None:
        return None

    @classmethod
    def load_processor(cls, path: str, trust_remote_code: bool = False) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)

    def image_token_counts(self, images: Sequence[Any]) -> list[int]:
        return []  # images are ignored

    def prompt(self, record: Record) -> str:
        text = record.text  # the question without image markers
        if not getattr(self.tokenizer, "chat_template", None):
            return text
        return self.tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                  add_generation_prompt=True, tokenize=False)

    def _add_special_tokens(self, text: str) -> bool:
        """False when the chat template already wrote the BOS token (no second BOS)."""
        bos = self.tokenizer.bos_token
        return not (bos and text.startswith(bos))

    def encode(self, texts: list[str], images: list[Any]) -> dict[str, torch.Tensor]:
        return dict(self.tokenizer(texts, padding=True, padding_side="right", return_tensors="pt",
                                   add_special_tokens=self._add_special_tokens(texts[0])))

    def prompt_ids(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt, add_special_tokens=self._add_special_tokens(prompt))["input_ids"]


ADAPTERS: dict[str, type[ModelAdapter]] = {
    t: cls
    for cls in (LlavaAdapter, LlavaNextAdapter, ChameleonAdapter, Qwen2VLAdapter, CausalLMAdapter)
    for t in cls.model_types
}

