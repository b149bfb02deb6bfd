"""The toy model's parts, built in memory: word-level tokenizer, LlavaProcessor, a tiny LLaVA config."""

from __future__ import annotations

from mmsae.data import toyvocab, toyworld
from mmsae.params import ToyModelParams

PAD, BOS, EOS, UNK, IMAGE_TOKEN = "<pad>", "<s>", "</s>", "<unk>", "<image>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, IMAGE_TOKEN)
TEMPLATE_WORDS = ("answer", ":")  # emitted by the chat template's generation prompt
PATCH_SIZE = 8
IMAGE_SIZE = toyworld.IMAGE_SIZE
GRID = IMAGE_SIZE // PATCH_SIZE
N_IMAGE_TOKENS = GRID * GRID  # CLS is dropped ("default" feature select strategy)
MAX_NEW_TOKENS = 10  # longest answer: "the red square is next to the circle" (alignment setting) + EOS

# User turn: "<s> <image> what color is the circle ?"; generation prompt " answer :"; an assistant
# turn is " answer : {text} </s>". Text-only user turns have no "<image>". Content may be a string or
# a list of typed blocks (image blocks first, as in `prompts.user_message`).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['content'] is string %}{% set blocks = [{'type': 'text', 'text': message['content']}] %}"
    "{% else %}{% set blocks = message['content'] %}{% endif %}"
    "{% if message['role'] == 'assistant' %} answer :"
    "{% for b in blocks %}{% if b['type'] == 'text' %} {{ b['text'] }}{% endif %}{% endfor %} {{ eos_token }}"
    "{% else %}"
    "{% for b in blocks %}{% if b['type'] == 'image' %} <image>{% endif %}{% endfor %}"
    "{% for b in blocks %}{% if b['type'] == 'text' %} {{ b['text'] }}{% endif %}{% endfor %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %} answer :{% endif %}"
)




def vocabulary() -> list[str]:
    words = [w for w in toyvocab.VOCAB_WORDS if w not in SPECIAL_TOKENS]
    words += [w for w in TEMPLATE_WORDS if w not in words]
    return list(SPECIAL_TOKENS) + words


def build_tokenizer():
    """Word-level tokenizer built in memory: special tokens, the toy world's words, the template's words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left",
        model_max_length=128,
        chat_template=CHAT_TEMPLATE,
    )
    assert tok.convert_tokens_to_ids(IMAGE_TOKEN) == vocab[IMAGE_TOKEN]
    return tok


def build_processor(tokenizer=None):
    """LlavaProcessor: 32x32 images, patch 8, CLS dropped -> 16 `<image>` tokens per image."""
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    tokenizer = tokenizer or build_tokenizer()
    image_processor = CLIPImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=True,
        do_resize=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS token, dropped again by "default"
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )



def build_model(params: ToyModelParams, vocab_size: int, image_token_id: int, pad_token_id: int = 0,
                bos_token_id: int = 1, eos_token_id: int = 2):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    h = int(params.hidden_size)
    heads = max(1, h // 16)
    vision = CLIPVisionConfig(
        hidden_size=h, intermediate_size=4 * h, num_hidden_layers=int(params.vision_layers),
        num_attention_heads=heads, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, num_channels=3,
        projection_dim=h,
    )
    text = LlamaConfig(
        vocab_size=vocab_size, hidden_size=h, intermediate_size=4 * h,
        num_hidden_layers=int(params.num_layers), num_attention_heads=heads, num_key_value_heads=heads,
        head_dim=h // heads, max_position_embeddings=128, pad_token_id=pad_token_id, bos_token_id=bos_token_id,
        eos_token_id=eos_token_id, tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=image_token_id, image_seq_length=N_IMAGE_TOKENS,
        vision_feature_layer=-1, vision_feature_select_strategy="default", projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
    model = LlavaForConditionalGeneration(config)
    gc = model.generation_config
    gc.pad_token_id, gc.bos_token_id, gc.eos_token_id = pad_token_id, bos_token_id, eos_token_id
    gc.do_sample, gc.max_new_tokens = False, MAX_NEW_TOKENS
    return model

