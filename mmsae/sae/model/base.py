"""The shared base of every SAE architecture: SAEConfig, the LossOutput of a training step, the
architecture registry (`register_architecture`, `build_sae`) and the `SAE` class (parameters, init,
input normalisation, encode/decode plumbing, the sparse paths, training hooks, save-time folding).
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mmsae.sae.model.sparse import SelectedPreGrad, SparseDecode, bag_offsets

if TYPE_CHECKING:
    from mmsae.params import TrainSaeParams

NORMALIZATIONS = ("none", "constant_norm_rescale")


@dataclass
class SAEConfig:
    """What defines an SAE's shape and input handling (the SAELens cfg.json core, our names)."""

    d_in: int
    d_sae: int
    architecture: str = "relu"
    dtype: str = "float32"
    device: str = "cpu"
    apply_b_dec_to_input: bool = False  # the SAE-V release does not subtract b_dec from the input
    normalize_activations: str = "none"  # "none" | "constant_norm_rescale"
    metadata: dict[str, Any] = field(default_factory=dict)  # model_name, hook_name, hook_layer, ...
    k: int | None = None  # topk: active latents per token (SAELens TopKSAEConfig.k); batchtopk, matryoshka: the mean

    def __post_init__(self) -> None:
        if self.normalize_activations not in NORMALIZATIONS:
            raise ValueError(f"normalize_activations must be one of {NORMALIZATIONS}, got {self.normalize_activations!r}")
        if self.d_in < 1 or self.d_sae < 1:
            raise ValueError(f"d_in and d_sae must be positive, got {self.d_in}, {self.d_sae}")
        if self.k is not None and not 1 <= self.k <= self.d_sae:
            raise ValueError(f"k must be in [1, d_sae={self.d_sae}], got {self.k}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class LossOutput(NamedTuple):
    loss: torch.Tensor  # scalar: what is minimised (relu: mse + l1_coefficient * sparsity; topk: see TopKSAE.loss)
    mse: torch.Tensor  # scalar: mean over tokens of the squared error summed over d (normalised space)
    sparsity: torch.Tensor  # scalar: mean over tokens of sum_i f_i ||W_dec,i||_2 (topk: reported, not minimised)
    codes: torch.Tensor  # [n, d_sae] (topk: detached; the loss goes through the sparse decoder)
    x_in: torch.Tensor  # [n, d_in] the SAE's input (normalised space)
    x_hat_in: torch.Tensor  # [n, d_in] its reconstruction (normalised space)
    aux: torch.Tensor | None = None  # scalar auxiliary loss before its coefficient (topk: AuxK); None if none


ARCHITECTURES: dict[str, type[SAE]] = {}


def register_architecture(name: str):
    """Class decorator: make an SAE subclass available under `name` (config `train_sae.architecture`)."""

    def deco(cls: type[SAE]) -> type[SAE]:
        if name in ARCHITECTURES:
            raise ValueError(f"architecture {name!r} registered twice")
        cls.architecture = name
        ARCHITECTURES[name] = cls
        return cls

    return deco


def build_sae(cfg: SAEConfig, seed: int | None = 0) -> SAE:
    """Instantiate `cfg.architecture` (initialised with `seed`, or left uninitialised if None)."""
    if cfg.architecture not in ARCHITECTURES:
        raise KeyError(f"unknown SAE architecture {cfg.architecture!r} (have {sorted(ARCHITECTURES)})")
    return ARCHITECTURES[cfg.architecture](cfg, seed=seed)


class SAE(nn.Module):
    """Base class: parameters W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in].

    Subclasses define `activation(pre)` (pre-activations -> codes) and may override `loss`.
    """

    architecture: ClassVar[str] = ""
    weight_names: ClassVar[tuple[str, ...]] = ("W_enc", "b_enc", "W_dec", "b_dec")
    init_decoder_norm: ClassVar[float] = 0.1  # norm of the W_dec rows at init
    default_apply_b_dec_to_input: ClassVar[bool] = False  # train_sae.apply_b_dec_to_input: null -> this
    # the train_sae key of the coefficient that the loop warms up (l1_warmup_steps) and passes to `loss` as
    # l1_coefficient (relu: l1_coefficient; jumprelu: l0_coefficient); None: loss() takes no coefficient
    sparsity_param: ClassVar[str | None] = "l1_coefficient"
    uses_k: ClassVar[bool] = False  # cfg.k / train_sae.k: active latents per token (or their batch mean)
    loss_definition: ClassVar[str] = ""

    def __init__(self, cfg: SAEConfig, seed: int | None = 0) -> None:
        super().__init__()
        self.cfg = cfg
        dtype = getattr(torch, cfg.dtype)
        self.W_enc = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_sae, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype))
        self.W_dec = nn.Parameter(torch.zeros(cfg.d_sae, cfg.d_in, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, dtype=dtype))
        self.input_scale: float = 1.0
        if seed is not None:
            self.reset_parameters(seed)

    # ---- init -------------------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        """W_dec rows: random directions of norm `init_decoder_norm` (relu: 0.1, method.md section 2; topk: 1);
        W_enc = W_dec^T; biases 0.

        Drawn on CPU from a seeded generator, so the init is the same on every device.
        """
        gen = torch.Generator().manual_seed(seed)
        w = torch.randn(self.cfg.d_sae, self.cfg.d_in, generator=gen, dtype=torch.float64)
        w = self.init_decoder_norm * w / w.norm(dim=1, keepdim=True)
        self.W_dec.copy_(w.to(self.W_dec))
        self.W_enc.copy_(w.T.to(self.W_enc))
        self.b_enc.zero_()
        self.b_dec.zero_()

    # ---- input handling ----------------------------------------------------------------------------
    def input_factor(self, x: torch.Tensor) -> torch.Tensor | float:
        """Multiplier taking raw x to the SAE's input space: per token [..., 1] or a scalar."""
        if self.cfg.normalize_activations == "constant_norm_rescale":
            norm = x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            return (math.sqrt(self.cfg.d_in) * self.input_scale) / norm
        return self.input_scale

    # ---- the architecture --------------------------------------------------------------------------
    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def pre_activations(self, x_in: torch.Tensor) -> torch.Tensor:
        """(x_in [- b_dec]) W_enc + b_enc [..., d_sae], the bias added inside the GEMM (F.linear -> addmm).

        With apply_b_dec_to_input and a b_dec that needs a gradient, the matmul runs on x_in - b_dec.detach()
        and b_dec reaches the result through an exactly-zero term (b_dec - b_dec.detach()) W_enc: the forward
        is unchanged, while b_dec's gradient becomes -(sum_t g_t) W_enc^T ([d_sae] x [d_sae, d_in]) instead of
        autograd's input gradient g W_enc^T ([n, d_sae] x [d_sae, d_in]), a third dense matmul per step.
        """
        if not self.cfg.apply_b_dec_to_input:
            return F.linear(x_in, self.W_enc.T, self.b_enc)
        if not (self.b_dec.requires_grad and torch.is_grad_enabled()):
            return F.linear(x_in - self.b_dec, self.W_enc.T, self.b_enc)
        zero = self.b_dec - self.b_dec.detach()
        return F.linear(x_in - self.b_dec.detach(), self.W_enc.T, self.b_enc - zero @ self.W_enc)

    def encode_normalised(self, x_in: torch.Tensor) -> torch.Tensor:
        return self.activation(self.pre_activations(x_in))

    def decode_normalised(self, f: torch.Tensor) -> torch.Tensor:
        return F.linear(f, self.W_dec.T, self.b_dec)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Codes of raw activations x [..., d_in] -> [..., d_sae]."""
        return self.encode_normalised(x * self.input_factor(x))

    def decode(self, f: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruction in raw space. With per-token normalisation, pass the original x (its norms)."""
        y = self.decode_normalised(f)
        if self.cfg.normalize_activations == "constant_norm_rescale":
            if x is None:
                raise ValueError("decode() of a constant_norm_rescale SAE needs the original x for its norms")
            return y / self.input_factor(x)
        return y / self.input_scale

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction of x in raw space, codes)."""
        factor = self.input_factor(x)
        f = self.encode_normalised(x * factor)
        return self.decode_normalised(f) / factor, f

    def decoder_norms(self) -> torch.Tensor:
        return self.W_dec.norm(dim=1)

    # ---- sparse paths: active (token, latent) pairs instead of dense [n, d_sae] codes ----------------
    def selected(self, values: torch.Tensor, x_in: torch.Tensor, tokens: torch.Tensor,
                 latents: torch.Tensor) -> torch.Tensor:
        """`values` [nnz] = pre-activations of x_in [n, d_in] at (tokens, latents), taken from the dense
        GEMM without a graph, given the gradient of that selection through SelectedPreGrad: the backward
        never touches the other latents. `tokens` must be sorted."""
        if not torch.is_grad_enabled():
            return values
        b_dec = self.b_dec if self.cfg.apply_b_dec_to_input else None
        return SelectedPreGrad.apply(values, x_in, self.W_enc, self.b_enc, b_dec, tokens, latents)

    def gather_rows(self, values: torch.Tensor, tokens: torch.Tensor, latents: torch.Tensor, n: int) -> torch.Tensor:
        """Per token t < n: sum_j values[j] W_dec[latents[j]] over its pairs -> [n, d_in], without b_dec:
        O(nnz d_in), not an [n, d_sae] x [d_sae, d_in] GEMM (SparseDecode). Each token's pairs are one run
        (tokens sorted), its latents ascending."""
        # values may be bf16 under autocast (train_sae.precision); embedding_bag wants the weight's dtype
        values, offsets = values.to(self.W_dec.dtype), bag_offsets(tokens, n)
        if torch.is_grad_enabled() and (values.requires_grad or self.W_dec.requires_grad):
            return SparseDecode.apply(values, self.W_dec, tokens, latents, offsets)
        return F.embedding_bag(latents, self.W_dec, offsets, per_sample_weights=values, mode="sum")

    # ---- training hooks (see the module docstring) -------------------------------------------------
    def configure_training(self, params: TrainSaeParams) -> None:
        """Take architecture-specific training options from the train_sae config slice."""

    @torch.no_grad()
    def init_from_batch(self, x: torch.Tensor) -> None:
        """Data-dependent init from the first training batch (raw x); fresh runs only, before step 0."""

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """Called after backward(), before gradient clipping and the optimizer step."""

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Called after the optimizer step (constraints on the weights)."""

    def training_details(self) -> dict[str, Any]:
        """Training options in SAELens' cfg names, written to cfg.json metadata.training_architecture_details
        (SAELens keeps there what its inference class does not need); empty: none."""
        return {}

    def loss(self, x: torch.Tensor, l1_coefficient: float, dead_mask: torch.Tensor | None = None) -> LossOutput:
        """Paper Eq. 1-3: mean_t ||x_t - x_hat_t||^2 + lambda * mean_t sum_i f_ti ||W_dec,i||_2.

        x: [n, d_in] raw activations. dead_mask [d_sae] (latents dead in training) is unused here.
        """
        x_in = x * self.input_factor(x)
        return self._dense_loss(x_in, self.encode_normalised(x_in), l1_coefficient)

    def _dense_loss(self, x_in: torch.Tensor, f: torch.Tensor, l1_coefficient: float) -> LossOutput:
        x_hat_in = self.decode_normalised(f)
        mse = (x_hat_in - x_in).pow(2).sum(-1).mean()
        # a matrix-vector product: no [n, d_sae] temporary forward, and a matvec for the norms' gradient
        sparsity = (f @ self.decoder_norms()).mean()
        return LossOutput(mse + l1_coefficient * sparsity, mse, sparsity, f, x_in, x_hat_in)

    # ---- save-time transforms ----------------------------------------------------------------------
    @torch.no_grad()
    def fold_input_scale(self) -> SAE:
        """A copy reading raw activations: W_enc * s, W_dec / s, b_dec / s, input_scale 1.

        Exact in the sense that encode/forward of the copy equal those of self up to float rounding: the
        pre-activations (x - b_dec / s)(s W_enc) + b_enc are unchanged (b_enc is not scaled), so ReLU and
        TopK select and output the same codes; only the decoder rows change norm (topk: 1 / s).
        """
        out = copy.deepcopy(self)
        s = self.input_scale
        if s != 1.0:
            out.W_enc.mul_(s)
            out.W_dec.div_(s)
            out.b_dec.div_(s)
        out.input_scale = 1.0
        return out

    def weights(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name).detach() for name in self.weight_names}

