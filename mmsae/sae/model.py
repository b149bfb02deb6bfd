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

Training hooks (no-ops in the base class, so the ReLU path is unchanged): `configure_training(params)`,
`init_from_batch(x)` (fresh runs, before step 0), `before_optimizer_step()` (after backward, before
gradient clipping) and `after_optimizer_step()`; `train.optimizer_step` calls them in that order.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

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
    k: int | None = None  # topk only: active latents per token (SAELens TopKSAEConfig.k)

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


@torch.no_grad()
def geometric_median(x: torch.Tensor, max_iter: int = 200, tol: float = 1e-7) -> torch.Tensor:
    """argmin_y sum_t ||x_t - y||_2 over the rows of x [n, d], by Weiszfeld's iteration (float64).

    Starts at the mean; distances are clamped at 1e-12 (a row equal to the iterate gets a large finite
    weight instead of a division by zero). Stops when an update moves by < tol * (1 + ||y||). Deterministic.
    """
    xd = x.reshape(-1, x.shape[-1]).double()
    y = xd.mean(0)
    for _ in range(max_iter):
        w = 1.0 / (xd - y).norm(dim=1).clamp_min(1e-12)
        y_new = (w[:, None] * xd).sum(0) / w.sum()
        moved = float((y_new - y).norm())
        y = y_new
        if moved < tol * (1.0 + float(y.norm())):
            break
    return y.to(x.dtype)


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
    uses_l1: ClassVar[bool] = True  # whether loss() uses l1_coefficient
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
        GEMM without a graph, given the gradient of that selection through _SelectedPreGrad: the backward
        never touches the other latents. `tokens` must be sorted."""
        if not torch.is_grad_enabled():
            return values
        b_dec = self.b_dec if self.cfg.apply_b_dec_to_input else None
        return _SelectedPreGrad.apply(values, x_in, self.W_enc, self.b_enc, b_dec, tokens, latents)

    def gather_rows(self, values: torch.Tensor, tokens: torch.Tensor, latents: torch.Tensor, n: int) -> torch.Tensor:
        """Per token t < n: sum_j values[j] W_dec[latents[j]] over its pairs -> [n, d_in], without b_dec:
        O(nnz d_in), not an [n, d_sae] x [d_sae, d_in] GEMM (_SparseDecode). Each token's pairs are one run
        (tokens sorted), its latents ascending."""
        # values may be bf16 under autocast (train_sae.precision); embedding_bag wants the weight's dtype
        values, offsets = values.to(self.W_dec.dtype), _bag_offsets(tokens, n)
        if torch.is_grad_enabled() and (values.requires_grad or self.W_dec.requires_grad):
            return _SparseDecode.apply(values, self.W_dec, tokens, latents, offsets)
        return F.embedding_bag(latents, self.W_dec, offsets, per_sample_weights=values, mode="sum")

    # ---- training hooks (see the module docstring) -------------------------------------------------
    def configure_training(self, params: dict[str, Any]) -> None:
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


@register_architecture("relu")
class ReLUSAE(SAE):
    """Standard SAE (SAELens "standard"): f = ReLU(x W_enc + b_enc), trained with decoder-norm-weighted L1."""

    loss_definition: ClassVar[str] = (
        "mean_t ||x_t - x_hat_t||^2 + l1_coefficient * mean_t sum_i f_ti ||W_dec,i||_2 (SAE input space)")

    def __init__(self, cfg: SAEConfig, seed: int | None = 0) -> None:
        super().__init__(cfg, seed=seed)
        # A training step whose batch has at most this share of active (token, latent) pairs takes the
        # sparse path (`loss`); above it the five dense GEMMs are cheaper than the sparse products
        # (break-even ~0.16 on the CPU, d_in 256, d_sae 4096, batch 1024: perf/README.md).
        self.sparse_max_density: float = 0.125

    def configure_training(self, params: dict[str, Any]) -> None:
        """sparse_max_density (0: always dense)."""
        self.sparse_max_density = float(params.get("sparse_max_density", self.sparse_max_density))

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre)

    def loss(self, x: torch.Tensor, l1_coefficient: float, dead_mask: torch.Tensor | None = None) -> LossOutput:
        """SAE.loss (paper Eq. 1-3). In training, once at most `sparse_max_density` of the batch's codes are
        active (L0 << d_sae, as after the first steps of a real run), the step runs on the active pairs
        only: the decoder gathers their W_dec rows and the encoder's backward is taken at them
        (_SelectedPreGrad), 2 n d_in d_sae + O(nnz d_in) FLOPs instead of 10 n d_in d_sae. Same values and
        gradients as the dense path (ReLU'(pre) = 0 wherever pre <= 0), up to float rounding."""
        if not torch.is_grad_enabled():
            return super().loss(x, l1_coefficient, dead_mask)
        x_in = x * self.input_factor(x)
        pre = self.pre_activations(x_in)
        with torch.no_grad():
            active = pre > 0
            sparse = int(torch.count_nonzero(active)) <= self.sparse_max_density * active.numel()
        if not sparse:
            return self._dense_loss(x_in, torch.relu(pre), l1_coefficient)
        with torch.no_grad():
            tokens, latents = active.nonzero(as_tuple=True)  # row-major: each token's pairs are one run
            codes = torch.relu(pre)
        values = self.selected(pre.detach()[tokens, latents], x_in, tokens, latents)  # all > 0: ReLU is the identity
        x_hat_in = self.gather_rows(values, tokens, latents, len(x_in)) + self.b_dec
        mse = (x_hat_in - x_in).pow(2).sum(-1).mean()
        sparsity = (values * self.decoder_norms()[latents]).sum() / len(x_in)
        return LossOutput(mse + l1_coefficient * sparsity, mse, sparsity, codes, x_in, x_hat_in)


class _SelectedPreGrad(torch.autograd.Function):
    """Pre-activations at selected (token, latent) pairs, flat [nnz], with a sparse backward.

    Forward returns `values` (computed by the dense encoder GEMM, unchanged). `tokens` [nnz] (sorted:
    each token's pairs are one run) and `latents` [nnz] say where each value sits in the [n, d_sae]
    pre-activations. Backward treats them as values[j] = x_c[tokens[j]] . W_enc[:, latents[j]] +
    b_enc[latents[j]], x_c = x_in (- b_dec), and returns for incoming gradients g [nnz]: W_enc = G^T x_c
    with G the [n, d_sae] matrix holding g at the pairs (a sparse x dense product, O(nnz d_in)); b_enc =
    g summed per latent; b_dec = -W_enc b_enc-gradient (a matvec); x_in (only if it needs one) = per token
    sum_j g[j] W_enc[:, latents[j]] (F.embedding_bag). Autograd through the dense GEMM would cost an
    [d_in, n] x [n, d_sae] matmul for W_enc and an [n, d_sae] x [d_sae, d_in] one for b_dec.
    """

    @staticmethod
    def forward(ctx, values: torch.Tensor, x_in: torch.Tensor, w_enc: torch.Tensor, b_enc: torch.Tensor,
                b_dec: torch.Tensor | None, tokens: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x_c = x_in - b_dec if b_dec is not None else x_in
        ctx.save_for_backward(x_c, w_enc, tokens, latents)
        return values.clone()

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x_c, w_enc, tokens, latents = ctx.saved_tensors
        d, d_sae = w_enc.shape
        g = g.to(w_enc.dtype)  # fp32 weights: the sparse product runs in their dtype
        x2 = x_c.reshape(-1, d)
        n = len(x2)
        grad_x = grad_w = grad_b = grad_bdec = None
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            grad_b = g.new_zeros(d_sae).index_add_(0, latents, g)
        if ctx.needs_input_grad[2]:
            gt = torch.sparse_coo_tensor(torch.stack([latents, tokens]), g, (d_sae, n), check_invariants=False)
            grad_w = torch.sparse.mm(gt, x2.to(w_enc.dtype)).T
        if ctx.needs_input_grad[4]:
            grad_bdec = -(w_enc @ grad_b)
        if ctx.needs_input_grad[1]:
            rows = F.embedding_bag(latents, w_enc.T.contiguous(), _bag_offsets(tokens, n), per_sample_weights=g,
                                   mode="sum")
            grad_x = rows.reshape(x_c.shape).to(x_c.dtype)
        return None, grad_x, grad_w, grad_b if ctx.needs_input_grad[3] else None, grad_bdec, None, None


def _bag_offsets(tokens: torch.Tensor, n: int) -> torch.Tensor:
    """F.embedding_bag offsets of n bags from the sorted bag (token) index of each entry."""
    counts = torch.bincount(tokens, minlength=n)
    return torch.cumsum(counts, 0) - counts


class _SparseDecode(torch.autograd.Function):
    """Per token t < n: sum_j values[j] W_dec[latents[j]] over its pairs (tokens[j] = t) -> [n, d_in].

    Forward: F.embedding_bag. Backward, for incoming gradients g [n, d_in]: W_dec = G^T g with G the
    [n, d_sae] codes (a sparse x dense product, torch.sparse.mm on COO), values = g W_dec^T sampled at the
    pairs (an SDDMM, torch.sparse.sampled_addmm on CSR). embedding_bag's own backward took ~1.8x as
    long on the CPU (perf/README.md). Each token's pairs must be one run with its latents ascending (CSR column order).
    """

    @staticmethod
    def forward(ctx, values: torch.Tensor, w_dec: torch.Tensor, tokens: torch.Tensor, latents: torch.Tensor,
                offsets: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(values, w_dec, tokens, latents, offsets)
        return F.embedding_bag(latents, w_dec, offsets, per_sample_weights=values, mode="sum")

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        values, w_dec, tokens, latents, offsets = ctx.saved_tensors
        n, d_sae = len(offsets), w_dec.shape[0]
        g = g.contiguous()
        grad_values = grad_w = None
        if ctx.needs_input_grad[0]:
            crow = torch.cat([offsets, offsets.new_full((1,), len(latents))])
            with warnings.catch_warnings():  # torch warns that CSR support is "beta"
                warnings.simplefilter("ignore")
                pattern = torch.sparse_csr_tensor(crow, latents, g.new_zeros(len(latents)), (n, d_sae),
                                                  check_invariants=False)
            grad_values = torch.sparse.sampled_addmm(pattern, g, w_dec.T, beta=0.0).values()
        if ctx.needs_input_grad[1]:
            gt = torch.sparse_coo_tensor(torch.stack([latents, tokens]), values, (d_sae, n), check_invariants=False)
            grad_w = torch.sparse.mm(gt, g)
        return grad_values, grad_w, None, None, None


@register_architecture("topk")
class TopKSAE(SAE):
    """TopK SAE (Gao et al. 2024; OpenAI sparse_autoencoder, EleutherAI sparsify; SAELens "topk").

    Codes: f = TopK_k(ReLU((x_in - b_dec) W_enc + b_enc)): the k largest ReLU'd pre-activations per token
    are kept, all others are 0 (fewer than k are > 0 when fewer than k pre-activations are positive).
    b_dec is subtracted only if cfg.apply_b_dec_to_input (train_sae defaults it to true for topk; a
    loaded SAELens file keeps its own setting). Decoding gathers the k selected rows of W_dec
    (`decode_sparse`, F.embedding_bag) instead of multiplying by the dense [n, d_sae] codes, and the
    encoder's backward touches only the k selected columns of W_enc (`selected`, _SelectedPreGrad).

    Training (train_sae): W_dec rows are unit norm at init and after every optimizer step, and the
    gradient component parallel to each row is removed before the step (sparsify). b_dec starts at the
    geometric median of the first batch (in the SAE input space). l1_coefficient is ignored: the sparsity
    is the k of TopK. See `loss` for the objective and AuxK.
    """

    init_decoder_norm: ClassVar[float] = 1.0
    default_apply_b_dec_to_input: ClassVar[bool] = True
    uses_l1: ClassVar[bool] = False
    loss_definition: ClassVar[str] = (
        "sum_t ||x_t - x_hat_t||^2 / sum_t ||x_t - mean_batch(x)||^2 (batch FVU, SAE input space) + "
        "aux_coefficient * min(n_dead / aux_k, 1) * sum_t ||e_t - e_hat_t||^2 / (same denominator), "
        "e = x - x_hat (detached), e_hat = the reconstruction of e by the top min(aux_k, n_dead) dead latents "
        "(no b_dec); no L1 term")

    def __init__(self, cfg: SAEConfig, seed: int | None = 0) -> None:
        if cfg.k is None:
            raise ValueError("a topk SAE needs cfg.k (active latents per token)")
        super().__init__(cfg, seed=seed)
        self.k: int = int(cfg.k)
        self.aux_k: int = min(cfg.d_sae, max(1, cfg.d_in // 2))  # set by configure_training
        self.aux_coefficient: float = 1.0 / 32

    # ---- training hooks ----------------------------------------------------------------------------
    def configure_training(self, params: dict[str, Any]) -> None:
        """aux_k (null -> d_in // 2, the heuristic of Gao et al. App. B.1, sparsify and SAELens; at most
        d_sae) and aux_coefficient (Gao et al.: 1/32)."""
        aux_k = params.get("aux_k")
        self.aux_k = min(self.cfg.d_sae, int(aux_k) if aux_k is not None else max(1, self.cfg.d_in // 2))
        self.aux_coefficient = float(params.get("aux_coefficient", self.aux_coefficient))

    @torch.no_grad()
    def init_from_batch(self, x: torch.Tensor) -> None:
        """b_dec = geometric median of the batch in the SAE input space (Gao et al.; sparsify)."""
        x_in = x * self.input_factor(x)
        self.b_dec.copy_(geometric_median(x_in).to(self.b_dec))

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """Remove from each W_dec row's gradient its component along the row (g -= (g.w / w.w) w)."""
        g, w = self.W_dec.grad, self.W_dec
        if g is not None:
            g.sub_(((g * w).sum(1, keepdim=True) / (w * w).sum(1, keepdim=True).clamp_min(1e-30)) * w)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Renormalise every W_dec row to unit norm."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    # ---- the architecture --------------------------------------------------------------------------
    def encode_sparse(self, x_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(values [..., k], indices [..., k], pre-activations [..., d_sae]) of SAE-space inputs.

        TopK_k(ReLU(pre)) = ReLU(TopK_k(pre)) (ReLU is monotone; they differ only in which zero-valued
        slots are listed), so ReLU runs on the k selected values, not on all d_sae pre-activations
        (one [n, d_sae] pass less forward and backward). The pre-activations are returned raw.
        """
        pre = self.pre_activations(x_in)
        with torch.no_grad():
            values, indices = self._top(pre, self.k)
        return torch.relu(self._selected_k(values, x_in, indices)), indices, pre

    @staticmethod
    def _top(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, indices) of the k largest per row, indices ascending (the sparse decoder's CSR order)."""
        values, indices = scores.topk(k, dim=-1, sorted=False)
        indices, order = indices.sort(dim=-1)
        return values.gather(-1, order), indices

    @staticmethod
    def _pairs(indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, latents) [n k] of per-token latent indices [..., k], tokens sorted."""
        kk = indices.shape[-1]
        n = indices.numel() // kk
        return torch.arange(n, device=indices.device).repeat_interleave(kk), indices.reshape(-1)

    def _selected_k(self, values: torch.Tensor, x_in: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """`selected` for k values per token ([..., k] in and out)."""
        if not torch.is_grad_enabled():
            return values
        tokens, latents = self._pairs(indices)
        return self.selected(values.reshape(-1), x_in, tokens, latents).reshape(values.shape)

    @staticmethod
    def _dense(values: torch.Tensor, indices: torch.Tensor, d_sae: int) -> torch.Tensor:
        return values.new_zeros(*values.shape[:-1], d_sae).scatter(-1, indices, values)

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        values, indices = pre.topk(self.k, dim=-1, sorted=False)
        return self._dense(torch.relu(values), indices, pre.shape[-1])

    def _gather_rows(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """sum_j values[..., j] W_dec[indices[..., j]] -> [..., d_in], without b_dec."""
        tokens, latents = self._pairs(indices)
        out = self.gather_rows(values.reshape(-1), tokens, latents, indices[..., 0].numel())
        return out.reshape(*values.shape[:-1], self.cfg.d_in)

    def decode_sparse(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """SAE-space reconstruction from (values, indices) [..., k]: equals decode_normalised(dense codes)."""
        return self._gather_rows(values, indices) + self.b_dec

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction of x in raw space, dense codes); decodes through the sparse decoder."""
        factor = self.input_factor(x)
        values, indices, _ = self.encode_sparse(x * factor)
        return self.decode_sparse(values, indices) / factor, self._dense(values, indices, self.cfg.d_sae)

    def auxk_loss(self, pre: torch.Tensor, residual: torch.Tensor, dead_mask: torch.Tensor | None,
                  total_variance: torch.Tensor, x_in: torch.Tensor | None = None) -> torch.Tensor:
        """AuxK (Gao et al. 2024 sec. A.2; sparsify's normalisation and scale).

        With n_dead = |dead| > 0 and k_aux = min(aux_k, n_dead): e_hat_t = sum of the k_aux largest ReLU'd
        pre-activations among the dead latents times their W_dec rows (no b_dec);
        AuxK = min(n_dead / aux_k, 1) * sum_t ||e_t - e_hat_t||^2 / total_variance, e = residual (detached).
        0 when dead_mask is None or no latent is dead. Gradients reach W_enc, b_enc (b_dec if applied to
        the input) and the dead rows of W_dec only. `pre`: the raw pre-activations of encode_sparse; with
        `x_in` (the SAE input they came from) the selected values get the sparse backward of `selected`,
        otherwise the gradient flows through `pre` (dense).
        """
        if dead_mask is None:
            return pre.new_zeros(())
        n_dead = int(dead_mask.sum())
        if n_dead == 0:
            return pre.new_zeros(())
        k_aux = min(self.aux_k, n_dead)
        scale = min(n_dead / self.aux_k, 1.0)
        if x_in is None:
            candidates = pre.masked_fill(~dead_mask.to(pre.device), -math.inf)  # live latents never selected
            values, indices = self._top(candidates, k_aux)
        else:
            with torch.no_grad():
                candidates = pre.masked_fill(~dead_mask.to(pre.device), -math.inf)
                values, indices = self._top(candidates, k_aux)
            values = self._selected_k(values, x_in, indices)
        e_hat = self._gather_rows(torch.relu(values), indices)
        return scale * (e_hat - residual.detach()).pow(2).sum() / total_variance

    def loss(self, x: torch.Tensor, l1_coefficient: float = 0.0, dead_mask: torch.Tensor | None = None) -> LossOutput:
        """FVU + aux_coefficient * AuxK, in the SAE input space (x_in = x * input_factor(x)), x [n, d_in].

        FVU = sum_t ||x_in,t - x_hat_in,t||^2 / sum_t ||x_in,t - mean_t(x_in)||^2, both sums over the batch
        (the batch-centred fraction of variance unexplained, sparsify's l2 loss; the denominator depends on
        the data only and is clamped at 1e-12). AuxK: `auxk_loss` with dead_mask = latents that have not fired
        for dead_window training tokens. l1_coefficient is ignored (TopK: no L1 term).
        LossOutput.mse and .sparsity are reported as for relu; .aux is AuxK before aux_coefficient.
        """
        x_in = x * self.input_factor(x)
        values, indices, pre = self.encode_sparse(x_in)
        x_hat_in = self.decode_sparse(values, indices)
        sq = (x_hat_in - x_in).pow(2).sum(-1)
        total_variance = (x_in - x_in.mean(0)).pow(2).sum().detach().clamp_min(1e-12)
        fvu = sq.sum() / total_variance
        aux = self.auxk_loss(pre, x_in - x_hat_in, dead_mask, total_variance, x_in)
        with torch.no_grad():
            sparsity = (values * self.decoder_norms()[indices]).sum(-1).mean()
            codes = self._dense(values.detach(), indices, self.cfg.d_sae)
        return LossOutput(fvu + self.aux_coefficient * aux, sq.mean(), sparsity, codes, x_in, x_hat_in, aux)
