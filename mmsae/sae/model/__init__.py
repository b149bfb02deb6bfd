"""SAE architectures behind one small interface, registered by name (SAELens-style, sparsify-compact).

Every architecture maps raw activations x [..., d_in] to codes f [..., d_sae] and back. Input handling is
shared by all architectures and happens in `normalise` / `denormalise`:

- `normalize_activations="constant_norm_rescale"` (config `normalize: token`): every token is rescaled to
  norm sqrt(d_in) before the SAE sees it; the reconstruction is mapped back to the token's own scale.
- `input_scale` (config `scale_inputs`): one scalar s = sqrt(d_in) / mean ||x|| estimated on training
  batches. The SAE trains on s * x; `fold_input_scale()` folds s into the weights
  (W_enc * s, W_dec / s, b_dec / s) so that a saved SAE reads raw activations with input_scale = 1.

The training loss is computed in the SAE's own (normalised) space: that is the space the paper's loss
(Eq. 1-3) and the decoder-norm-weighted L1 term refer to. Reconstructions returned by `forward` are in
the raw space of x.

Architectures:

- `relu` (`ReLUSAE`, SAELens "standard"): the SAE-V paper's SAE, ReLU codes, decoder-norm-weighted L1.
- `topk` (`TopKSAE`, SAELens "topk"): Gao et al. 2024 "Scaling and evaluating sparse autoencoders" as
  implemented by OpenAI's sparse_autoencoder and EleutherAI's sparsify: f = TopK_k(ReLU((x - b_dec) W_enc
  + b_enc)), unit-norm decoder rows, b_dec initialised to the geometric median of the first batch, FVU
  loss plus the AuxK loss on dead latents, sparse (gathered) decoder. No L1 term.
- `batchtopk` (`BatchTopKSAE`, SAELens "batchtopk"): Bussmann et al. 2024: the k * n largest codes of a batch
  of n tokens in training, one threshold (an EMA of the smallest kept code) at inference; TopK's recipe.
- `jumprelu` (`JumpReLUSAE`, SAELens "jumprelu"): Rajamanoharan et al. 2024: a trained threshold per latent,
  straight-through (rectangle kernel) gradients, an L0 (step) or tanh sparsity penalty.
- `matryoshka_batchtopk` (`MatryoshkaBatchTopKSAE`, SAELens "matryoshka_batchtopk"): Bussmann et al. 2025:
  BatchTopK with a reconstruction loss at each nested prefix of the dictionary (matryoshka_widths).

The three are saved as SAELens saves them for inference: "jumprelu" with a `threshold` tensor (io.py).

Training hooks (no-ops in the base class, so the ReLU path is unchanged): `configure_training(params)`,
`init_from_batch(x)` (fresh runs, before step 0), `before_optimizer_step()` (after backward, before
gradient clipping) and `after_optimizer_step()`; `mmsae.sae.training.optimizer_step` calls them in that order.
"""

from mmsae.sae.model.base import (
    ARCHITECTURES,
    NORMALIZATIONS,
    SAE,
    LossOutput,
    SAEConfig,
    build_sae,
    register_architecture,
)
from mmsae.sae.model.batchtopk import BatchTopKSAE
from mmsae.sae.model.jumprelu import JumpReLUSAE
from mmsae.sae.model.matryoshka import MatryoshkaBatchTopKSAE, matryoshka_widths
from mmsae.sae.model.relu import ReLUSAE
from mmsae.sae.model.topk import AuxKSAE, TopKSAE, geometric_median

__all__ = ["ARCHITECTURES", "NORMALIZATIONS", "SAE", "AuxKSAE", "BatchTopKSAE", "JumpReLUSAE", "LossOutput",
           "MatryoshkaBatchTopKSAE", "ReLUSAE", "SAEConfig", "TopKSAE", "build_sae", "geometric_median",
           "matryoshka_widths", "register_architecture"]
