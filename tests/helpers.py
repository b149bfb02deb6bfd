"""Tiny random-weight multimodal models built from configs (no downloads), shared by every test.

- `tiny_tokenizer()`: a word-level tokenizer over the toy-world vocabulary, BOS added by the
  tokenizer (as LLaMA tokenizers do), `<image>` / `<pad>` / `</s>` special, a LLaVA-style chat
  template (`USER: <image> question ASSISTANT:`).
- `tiny_llava(tmp_path)` / `tiny_llava_next(tmp_path)`: save_pretrained of model + processor into a
  folder and return its path; `mmsae.models.load_model(path)` loads it back.
- `tiny_chameleon(tmp_path)` / `tiny_qwen2_vl(tmp_path)` / `tiny_llama(tmp_path)`: the same for
  Chameleon (VQ image tokens), Qwen2-VL (merged patches, M-RoPE) and a text-only Llama base LLM.
- `tiny_records(n)`: a few `Record`s with 32x32 toy-world images.

Sizes: text hidden 32, 2 decoder layers; CLIP vision tower hidden 16, 1 layer, patch 8.
LLaVA: 32x32 images -> 4x4 = 16 image tokens. LLaVA-NeXT: base 16x16 tile -> 2x2 grid, anyres
pinpoints up to 32x32, so the image-token count depends on the image's size and aspect ratio.
Chameleon: images center-cropped to 16x16, VQ-VAE with 32 channels and 2 downsamplings -> 4x4 = 16
codebook tokens (16 codes) between `<racm3:break>` / `<eoss>`. Qwen2-VL: vision tower hidden 16,
1 block, patch 4, merge 2; images resized to multiples of 8 -> (h/8)*(w/8) image tokens (32x32 -> 16,
16x32 -> 8, 40x20 -> 10). Llama: the tiny tokenizer with a text-only chat template.
"""

from __future__ import annotations

import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    ChameleonConfig,
    ChameleonForConditionalGeneration,
    ChameleonImageProcessorPil,
    ChameleonProcessor,
    ChameleonVQVAEConfig,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
)

from mmsae.data import Record, toyvocab, toyworld
from mmsae.params import ScoreConsistencyParams, ScoreParams

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
WORDS = ["USER:", "ASSISTANT:", *toyvocab.VOCAB_WORDS]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %} {% else %}ASSISTANT: "
    "{% for c in message['content'] %}{{ c['text'] }}{% endfor %}</s> {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


TEXT_CHAT_TEMPLATE = (  # a text-only LLM's template: string content
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {{ message['content'] }} {% else %}ASSISTANT: "
    "{{ message['content'] }}</s> {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def tiny_tokenizer(extra_special: tuple[str, ...] = (), extra_words: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate([*SPECIAL, *extra_special, *WORDS, *extra_words])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens=["<image>", *extra_special],
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _vision_config(image_size: int) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        image_size=image_size, patch_size=8, projection_dim=16,
    )


def _text_config(vocab_size: int, hidden: int = 32, layers: int = 2) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )


def build_tiny_llava(layers: int = 2, seed: int = 0) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """LLaVA-1.5-style model + processor in memory; 16 image tokens per 32x32 image."""
    tok = tiny_tokenizer()
    image_token_id = tok.convert_tokens_to_ids("<image>")
    config = LlavaConfig(
        vision_config=_vision_config(32), text_config=_text_config(len(tok), layers=layers),
        image_token_id=image_token_id, image_seq_length=16, vision_feature_layer=-1,
        vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
    )
    return model, processor


def tiny_llava(tmp_path: str | Path, layers: int = 2, seed: int = 0) -> Path:
    """A saved LLaVA-1.5-style model + processor (folder path); 16 image tokens per 32x32 image."""
    model, processor = build_tiny_llava(layers, seed)
    out = Path(tmp_path) / "tiny_llava"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def build_tiny_llava_next(layers: int = 2, seed: int = 0) -> tuple[LlavaNextForConditionalGeneration, LlavaNextProcessor]:
    """LLaVA-NeXT-style model + processor in memory (anyres: 16x16 base tile, pinpoints up to 32x32)."""
    tok = tiny_tokenizer()
    image_token_id = tok.convert_tokens_to_ids("<image>")
    pinpoints = [[16, 32], [32, 16], [32, 32]]
    config = LlavaNextConfig(
        vision_config=_vision_config(16), text_config=_text_config(len(tok), layers=layers),
        image_token_id=image_token_id, image_grid_pinpoints=pinpoints, vision_feature_layer=-1,
        vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}, image_grid_pinpoints=pinpoints,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
    )
    return model, processor


def tiny_llava_next(tmp_path: str | Path, layers: int = 2, seed: int = 0) -> Path:
    """A saved LLaVA-NeXT-style model + processor (folder path); image-token count varies with image size."""
    model, processor = build_tiny_llava_next(layers, seed)
    out = Path(tmp_path) / "tiny_llava_next"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def _save(model, processor, out: Path) -> Path:
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


# -- Chameleon ------------------------------------------------------------------------------------
CHAMELEON_BOI, CHAMELEON_EOI = "<racm3:break>", "<eoss>"
CHAMELEON_CODES = 16


def chameleon_code_token(code: int) -> str:
    """The vocabulary name of VQ code `code`: digits as letters A-J between IMGIMG and Z (as Chameleon's)."""
    return "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


def build_tiny_chameleon(layers: int = 2, seed: int = 0) -> tuple[ChameleonForConditionalGeneration, ChameleonProcessor]:
    """Chameleon-style model + processor in memory; 16 VQ tokens per image (16x16 crop)."""
    tok = tiny_tokenizer(extra_special=(CHAMELEON_BOI, CHAMELEON_EOI),
                         extra_words=tuple(chameleon_code_token(c) for c in range(CHAMELEON_CODES)))
    vq = ChameleonVQVAEConfig(
        embed_dim=8, num_embeddings=CHAMELEON_CODES, latent_channels=8, resolution=16, base_channels=32,
        channel_multiplier=[1, 1, 1], num_res_blocks=1,
    )
    config = ChameleonConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, vq_config=vq.to_dict(), vocabulary_map=tok.get_vocab(),
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = ChameleonForConditionalGeneration(config).eval()
    image_processor = ChameleonImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    processor = ChameleonProcessor(image_processor=image_processor, tokenizer=tok, image_seq_length=16)
    processor.chat_template = CHAT_TEMPLATE  # ChameleonProcessor.__init__ takes no chat_template
    return model, processor


def tiny_chameleon(tmp_path: str | Path, layers: int = 2, seed: int = 0) -> Path:
    """A saved Chameleon-style model + processor (folder path)."""
    return _save(*build_tiny_chameleon(layers, seed), Path(tmp_path) / "tiny_chameleon")


# -- Qwen2-VL -------------------------------------------------------------------------------------
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|> {{ message['role'] }} "
    "{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|> <|image_pad|> <|vision_end|> {% else %}{{ c['text'] }} {% endif %}"
    "{% endfor %}<|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant{% endif %}"
)


def qwen_tokenizer() -> PreTrainedTokenizerFast:
    """Qwen-style: no BOS, `<|im_end|>` is EOS, `<|endoftext|>` pads."""
    vocab = {tok: i for i, tok in enumerate([*QWEN_SPECIAL, "user", "assistant", *WORDS])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<|endoftext|>",
        extra_special_tokens=QWEN_SPECIAL[1:],
    )
    tok.chat_template = QWEN_CHAT_TEMPLATE
    return tok


def build_tiny_qwen2_vl(layers: int = 2, seed: int = 0):
    """Qwen2-VL-style model + (image-only) processor in memory; patch 4, merge 2."""
    from mmsae.models.adapters import image_only_qwen2_vl_processor

    tok = qwen_tokenizer()
    ids = tok.get_vocab()
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
            bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=4,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    image_processor = Qwen2VLImageProcessorPil(min_pixels=8 * 8, max_pixels=64 * 64, patch_size=4, merge_size=2,
                                               temporal_patch_size=2)
    # Qwen2VLProcessor itself insists on a video processor, which needs torchvision (absent here)
    processor = image_only_qwen2_vl_processor()(image_processor=image_processor, tokenizer=tok,
                                                 chat_template=QWEN_CHAT_TEMPLATE)
    return model, processor


def tiny_qwen2_vl(tmp_path: str | Path, layers: int = 2, seed: int = 0) -> Path:
    """A saved Qwen2-VL-style model + processor, `processor_class` Qwen2VLProcessor as in a real checkpoint."""
    out = _save(*build_tiny_qwen2_vl(layers, seed), Path(tmp_path) / "tiny_qwen2_vl")
    cfg_file = out / "processor_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["processor_class"] = "Qwen2VLProcessor"
    cfg_file.write_text(json.dumps(cfg))
    return out


# -- text-only base LLM ---------------------------------------------------------------------------
def build_tiny_llama(layers: int = 2, seed: int = 0) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    tok = tiny_tokenizer()
    tok.chat_template = TEXT_CHAT_TEMPLATE
    torch.manual_seed(seed)
    return LlamaForCausalLM(_text_config(len(tok), layers=layers)).eval(), tok


def tiny_llama(tmp_path: str | Path, layers: int = 2, seed: int = 0) -> Path:
    """A saved text-only Llama + tokenizer (the base LLM of the transfer experiments)."""
    return _save(*build_tiny_llama(layers, seed), Path(tmp_path) / "tiny_llama")


def tiny_records(n: int = 3, seed: int = 0, sizes: list[tuple[int, int]] | None = None) -> list[Record]:
    """n toy-world Records; `sizes` (width, height) resizes image i, e.g. to vary LLaVA-NeXT token counts."""
    df = toyworld.generate(seed, n, 0.0, [], 10, 10)["pool"]
    out = []
    for i, row in enumerate(df.itertuples(index=False)):
        image = Image.open(io.BytesIO(row.image)).convert("RGB")
        if sizes is not None:
            image = image.resize(sizes[i % len(sizes)])
        out.append(Record(str(row.sample_id), row.question, image, list(row.responses), int(row.preferred),
                          extras={"task": row.task}))
    return out


def records_frame(records: list[Record]):
    """Records back to a parquet-ready DataFrame in the record schema (for the stage scripts)."""
    import pandas as pd

    rows = []
    for r in records:
        buf = io.BytesIO()
        r.image.save(buf, format="PNG")
        rows.append({"sample_id": r.sample_id, "question": r.question, "image": buf.getvalue(),
                     "responses": r.responses, "preferred": r.preferred})
    return pd.DataFrame(rows)


def assert_close(a, b, atol: float = 1e-5) -> None:
    np.testing.assert_allclose(np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32), atol=atol, rtol=1e-4)


# -- a stub OpenAI-compatible server on 127.0.0.1 (the LLaVA-Bench judge, the feature explainer) -----


class Stub:
    """POST /v1/chat/completions on localhost; `reply(n, body)` -> (status, payload) for request n."""

    def __init__(self, reply):
        self.requests: list[dict] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                status, payload = reply(len(stub.requests) - 1, body)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def completion(text: str) -> tuple[int, dict]:
    return 200, {"choices": [{"message": {"role": "assistant", "content": text}}]}


def consistency(cfg: dict) -> ScoreConsistencyParams:
    """The typed score.consistency slice of a partial dict (the rest from the schema's defaults)."""
    return ScoreParams.load({"consistency": cfg}).consistency
