"""Automatic feature explanations by a multimodal LLM, and their IoU score (method.md section 6).

Companion paper: "Large Multi-modal Models Can Interpret Features in Large Multi-modal Models".

Explaining (stage `explain`)
    For each selected feature (config: the top `top_n` cross-modal features by weight, or an explicit
    list), its top `n_images` images and top `n_texts` text contexts go to an explainer behind any
    OpenAI-compatible chat endpoint (POST {base_url}/chat/completions, images as PNG data URIs,
    temperature 0 by default, retries with exponential backoff on connection errors, timeouts, 429
    and 5xx). The reply's first non-empty line is the explanation.

    - Images: samples ranked by the feature's highest (`image_rank: max`) or mean (`mean`, the
      paper) activation over their image tokens, from the sparse codes. The activation map over the
      patch grid (extract's `image_grid`: rows x cols from patch `first`; a square grid inferred from
      tokens.parquet when the manifest has none) is thresholded into the ACTIVATION MASK: cells where
      activation >= mask_threshold x the feature's highest image-token activation anywhere (one
      reference per feature, so a weak activation on a random image stays weak). The mask is
      upsampled to pixels (nearest; over the centre square with `center_crop`, the CLIP crop) and
      everything outside it is multiplied by `dim` (0 = black).
    - Texts: the feature's top text tokens (features.parquet top_text_rows), each with
      `context_tokens` tokens either side of its sample, decoded by the model's tokenizer, the
      activating token marked <<like this>>, a run of image tokens shown once as <image>, special
      tokens left out.

Scoring (stage `explain_score`)
    On each of the feature's top images: IoU between the explanation's segmentation mask and the
    feature's activation mask (both at pixel resolution). Baseline: the same on `n_random` random
    images (seeded, not among its top images): the explanation's mask on that image vs the feature's
    activation mask there. A pair whose union is empty (nothing segmented, nothing active) has no IoU
    and is left out of the means; the counts say how many were scored. Read the gap with care: a
    feature that detects its concept perfectly also scores well on the random images that happen to
    show the concept; the baseline is low when the feature is weak or misplaced on ordinary images.

    Masks come from
    - a masks parquet (`masks`, e.g. from GroundingDINO + SAM): sample_id, concept, and `mask`
      (PNG bytes, the image's size, nonzero = inside) or `box` ([x0, y0, x1, y1] pixels, x0 <= x < x1);
      optional `feature` (a row then applies to that feature only). A concept is used when its label
      occurs as a word or phrase in the explanation (case-insensitive, plural 's' allowed); its masks
      on a sample are united. A sample the file never names is not scored;
    - otherwise, on the toy world, ground truth: the samples' `objects` (colour, shape, bbox): an
      explanation naming colours and/or shapes gets the objects of those colours AND shapes (any
      named colour, any named shape), drawn as rendered. A noise-image sample shows no objects.

Modules: `tables` (artifact names, schemas, the default prompt), `activations` (feature selection,
activation maps and masks, masked images), `contexts` (text contexts), `client` (the explainer
endpoint), `masks` (concept masks), `score` (IoU scores, premise_localization).
"""

from mmsae.interpret.explain.activations import (
    activation_grid,
    activation_index,
    activation_mask,
    feature_images,
    image_activations,
    image_grid,
    masked_image,
    png_bytes,
    read_images,
    reference_activations,
    select_features,
    top_images,
)
from mmsae.interpret.explain.client import (
    ChatError,
    ExplainerConfig,
    api_key,
    build_messages,
    chat,
    data_uri,
    explain_features,
    explainer_config,
    parse_explanation,
)
from mmsae.interpret.explain.contexts import (
    render_context,
    text_contexts,
)
from mmsae.interpret.explain.masks import (
    FileMasks,
    ToyMasks,
    read_mask_samples,
)
from mmsae.interpret.explain.score import (
    iou,
    premise_localization,
    random_images,
    score_explanations,
)
from mmsae.interpret.explain.tables import (
    DEFAULT_PROMPT,
    EXPLANATION_SCHEMA,
    IMAGES,
    SCORE_SCHEMA,
    prompt_hash,
    write_table,
)

__all__ = ["ChatError", "DEFAULT_PROMPT", "EXPLANATION_SCHEMA", "ExplainerConfig",
           "FileMasks", "IMAGES", "SCORE_SCHEMA", "ToyMasks", "activation_grid",
           "activation_index", "activation_mask", "api_key", "build_messages", "chat", "data_uri",
           "explain_features", "explainer_config", "feature_images", "image_activations", "image_grid",
           "iou", "masked_image", "parse_explanation", "png_bytes",
           "premise_localization", "prompt_hash", "random_images", "read_images", "read_mask_samples",
           "reference_activations", "render_context", "score_explanations", "select_features",
           "text_contexts", "top_images", "write_table"]
