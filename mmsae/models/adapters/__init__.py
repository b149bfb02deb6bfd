"""One small interface over model families: batches in, decoder layers, per-token marks.

An adapter wraps a loaded HF model + processor (or tokenizer) and answers four questions the stages ask:

- `build_batch(records, include_response)`: model inputs (prompt from the shared chat-template
  format, right padding) and a `BatchMeta` describing every token: sample, position, modality
  (image | text | special), token id, whether it belongs to the response, patch index;
- `decoder_layers()`: the `nn.ModuleList` whose outputs are the residual stream (hook point);
- `final_hidden(inputs)` / `lm_head(h)`: the last hidden state (after the final norm) and the
  unembedding, so losses can be computed on selected positions without full-vocabulary logits;
- `image_grid()`: how the first image tokens of each image map onto the base patch grid (None where
  the grid is not fixed).

Image tokens are the positions the processor filled with the image placeholder id (`image_token_id`);
`patch` numbers them 0, 1, ... per image and `image_index` says which image of the sample (several images:
one placeholder per image, placed by the record's `<image>` markers, else all before the question; the
processor expands them in order, and `image_token_counts` (the processor's own count per image size)
splits a sample's image tokens into its images, checked against the tokens found). Family by family:

LLaVA 1.5 (`llava`): one `<image>` becomes a fixed number of feature tokens (vision grid side^2),
row-major over the CLIP patch grid. The placeholder id stays in `input_ids`; the model scatters the
projected features in.

LLaVA-NeXT (anyres): the processor expands one `<image>` into base-tile features (rows x cols of the
base grid, row-major) followed by the high-resolution tiles' unpadded feature map, row by row, each
row closed by one `image_newline` token. All of them carry the image placeholder id, so they are
`image` tokens with consecutive `patch` indices: patch p < rows * cols is base-grid cell
(p // cols, p % cols); later patches are tile features and newlines. Their number depends on the
image's size and aspect ratio.

Chameleon / Anole (`chameleon`, early fusion): the processor expands one `<image>` into
`<racm3:break>` (begin-of-image) + `image_seq_length` x `<image>` + `<eoss>` (end-of-image). The
adapter runs the model's VQ-VAE on the real pixels (`get_image_tokens`) and writes the resulting
codebook tokens (`IMGIMG...Z` vocabulary ids) into `input_ids` in place of the placeholders, so the
model sees exactly the tokens its own forward would embed from `pixel_values`, and `token_id` records
the VQ code of each image token. Image tokens: the VQ grid (side x side, row-major). The two
sentinels are `special`. `lm_head` masks the image-codebook logits like the model's own forward
(text loss is normalised over non-image tokens only). Text-completion mode: the processor does not
append its separator token; the chat template alone decides the turn format.

Qwen2-VL (`qwen2_vl`): the chat template writes `<|vision_start|><|image_pad|><|vision_end|>`; the
processor repeats `<|image_pad|>` once per merged patch: (h/14 x w/14) / merge_size^2 tokens for an
image resized to a multiple of 28, so the count varies per image (`image_grid_thw`), row-major over
the merged grid (h / patch / merge rows). `mm_token_type_ids` (M-RoPE) reaches the model.
`<|vision_start|>` / `<|vision_end|>` are `special`. `image_grid()` is None (not fixed).

Text-only base LLMs (`llama`, `mistral`, `qwen2`; `AutoModelForCausalLM`): for transfer
experiments. A record's image is ignored; the prompt is the tokenizer's chat template applied to
the question (plain question when there is none), so every token is `text` or `special`.
"""

from mmsae.models.adapters.base import IMAGE, SPECIAL, TEXT, BatchMeta, ModelAdapter
from mmsae.models.adapters.families import (
    ADAPTERS,
    CausalLMAdapter,
    ChameleonAdapter,
    LlavaAdapter,
    LlavaNextAdapter,
    Qwen2VLAdapter,
    image_only_qwen2_vl_processor,
)

__all__ = [
    "ADAPTERS", "IMAGE", "SPECIAL", "TEXT", "BatchMeta", "CausalLMAdapter", "ChameleonAdapter", "LlavaAdapter",
    "LlavaNextAdapter", "ModelAdapter", "Qwen2VLAdapter", "image_only_qwen2_vl_processor",
]
