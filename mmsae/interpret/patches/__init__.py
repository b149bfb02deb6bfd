"""Image-patch filtering (SAE-V paper, Section 3.2): score every patch of an image, keep the best ones,
black out the rest in pixel space, and measure how well the model still classifies the image.

Patch scores (higher = kept first) come from one forward of the model on the image plus a neutral
prompt (`score_question`). The SAE encodes the residual stream after its layer (`hook_layer`) at every
image token (one per base-grid patch) and at the prompt's text tokens; a feature is active where its
activation exceeds `delta`. They are the sample-level definitions of mmsae.scoring applied to the
pseudo-sample "prompt text + one patch":

- `l0`       active features on the patch (scoring `l0` of a sample made of that one token);
- `l1`       sum of their activations (`l1`);
- `cooc_l0`  active features on the patch that co-occur: with `cooccurrence: text` (Algorithm 1) they
             also fire on at least one text token of the prompt; with `cooccurrence: features` they are
             `cross-modal` in features.parquet (independent of the prompt);
- `cosine`   sum of the cross-modal weights (features.parquet; 0 unless cross-modal) of those
             co-occurring features (scoring `cosine`);
- `random`   seeded uniform scores, a function of (seed, image id) only;
- `attention` attention probability from the last prompt token to the patch's token, averaged over
             heads and over every decoder layer (eager attention, read by hooks on `self_attn`).

Kept patches: the best ceil(f * n_patches) per image and kept fraction f (`mmsae.scoring.subsets.subset_size`),
ties broken by a seeded random order (never by position: that would favour the top rows).

Geometry (mmsae.models.grid): a fixed-grid LLaVA model (`model_type: llava`, `ModelAdapter.image_grid`)
sees the processed image `pixel_values` [3, H, W]; base-grid cell (r, c) of a rows x cols grid is the
pixel box rows [r*H/rows, (r+1)*H/rows) x columns [c*W/cols, (c+1)*W/cols). Blacked-out boxes are set to what the
processor makes of a black pixel, so a masked input is exactly the processed image of a picture that is
black there (no resampling blur across patch borders). The toy model: 4x4 grid of 8 px on 32x32 images;
LLaVA-1.5: 24x24 of 14 px on 336x336. A `full` feature-select strategy puts CLS first; it is skipped.
LLaVA-NeXT (anyres tiles), Chameleon (VQ tokens made inside the adapter) and Qwen2-VL (merged, dynamic
grid) are refused with an InputError.

Classification: the model answers `question` about each (masked) image; `likelihood` picks the label
of the label set whose answer (label + EOS, the pipeline's response format) has the highest total
log-probability, `greedy` generates and compares the normalised text with the label. Accuracy per
(method, kept fraction), plus the unmasked images (method `none`, fraction 1.0).

Labelled images: an ImageFolder (`<root>/<label>/*.png|jpg|...`, label text = folder name with `_` as
spaces) or the toy world's held-out split, labelled by `toyworld.answer_for(question, scene)` (e.g.
"what shape is on the left ?": one object per side, so one right answer; label set = the three shapes).

Modules: `images` (labelled image sets), `scores` (patch scores), `classify` (masking, classification,
accuracy, `patch_filter`), `plots` (figures).
"""

from mmsae.interpret.patches.classify import (
    UNMASKED,
    View,
    accuracy_table,
    black_out,
    black_pixel,
    classify_views,
    masked_batch,
    normalise_answer,
    patch_filter,
    response_logprob,
    views_of,
)
from mmsae.interpret.patches.images import (
    ImageSet,
    image_folder_set,
    toy_image_set,
    toy_label_set,
)
from mmsae.interpret.patches.plots import plot_accuracy, plot_examples
from mmsae.interpret.patches.scores import (
    METHODS,
    SAE_METHODS,
    AttentionRows,
    keep_mask,
    patch_grid,
    random_scores,
    sae_patch_scores,
    score_patches,
    tiebreak,
)

__all__ = ["AttentionRows", "ImageSet", "METHODS", "SAE_METHODS", "UNMASKED", "View", "accuracy_table", "black_out", "black_pixel",
           "classify_views", "image_folder_set", "keep_mask", "masked_batch", "normalise_answer",
           "patch_filter", "patch_grid", "plot_accuracy", "plot_examples", "random_scores",
           "response_logprob", "sae_patch_scores", "score_patches", "tiebreak", "toy_image_set",
           "toy_label_set", "views_of"]
