"""Training an SAE on an extracted activation store, resumable and bit-reproducible.

Tokens: the rows of `layer` whose modality is in scope (`all` = image + text = SAE-V, `text` = SAE),
plus special tokens if `include_special`. A stable hash of sample_id holds out `eval_fraction` of the
SAMPLES (all their tokens) for evaluation.

Batches: the store's rows are cut into groups of >= `buffer_chunks` zarr chunks (extended until a group
holds at least one batch of training tokens). Each epoch visits the groups in an order drawn from
(seed, epoch) and shuffles each group's training tokens with an RNG seeded by (seed, epoch, group);
batches never straddle groups and a group's remainder (< batch_size tokens) is skipped that epoch. The
batch at step s is therefore a pure function of (seed, s), memory is bounded by one group (plus one
prefetched), and a resumed run sees exactly the batches an uninterrupted run sees. The store may be
one zarr array or the parts of a sharded extraction: rows are rows either way.

On CUDA: the prefetch thread moves the next group to the GPU (store dtype, pinned memory, a side
stream) while the SAE steps on the current one, and `train_sae.precision` picks bf16 autocast / TF32 /
strict fp32 for the SAE forward; weights, Adam state and checkpoints stay fp32. CPU runs are fp32.

Checkpoints (every `checkpoint_every` steps and at the end of training) go to
`checkpoint_dir/step-XXXXXXXX/` = state.safetensors (weights, Adam moments and step counts, dead-latent
counters) + state.json (step, input scale, loss curve, compatibility key), written atomically. A rerun
with the same params and store resumes from the latest one; nothing is ever unpickled.

Architectures come from the registry in mmsae.sae.model (`train_sae.architecture`). A step is
`optimizer_step`: backward, the SAE's `before_optimizer_step` hook (topk: remove the decoder-gradient
component parallel to the rows), gradient clipping, Adam, `after_optimizer_step` (topk: unit-norm decoder
rows; batchtopk, matryoshka_batchtopk: also the threshold's EMA step; jumprelu: thresholds kept >= 0). A
fresh run calls `init_from_batch` on the batch of step 0 (topk family: b_dec = geometric median). The loss
gets `dead_mask` = latents that have not fired for `dead_window` training tokens (topk family: AuxK) and the
warmed-up coefficient named by the SAE's `sparsity_param` (relu: l1_coefficient, jumprelu: l0_coefficient);
the counters and the SAE's buffers (batchtopk's threshold) are checkpointed, so a resumed run stays
bit-identical.

Modules: tokens (the train / held-out split), batches (the batch stream), step (schedules, precision,
one optimizer step), checkpoint, loop (`train_sae`), pretrained (`import_sae`). The stage train_sae
itself (options, artifact folder, manifest) is mmsae.sae.train.
"""

from mmsae.sae.training.batches import BatchSchedule
from mmsae.sae.training.checkpoint import CHECKPOINT_FORMAT, latest_checkpoint, save_checkpoint
from mmsae.sae.training.loop import train_sae
from mmsae.sae.training.pretrained import import_sae
from mmsae.sae.training.step import PRECISIONS, l1_at, lr_at, optimizer_step, precision_context
from mmsae.sae.training.tokens import SCOPES, TokenSplit, select_tokens

__all__ = ["CHECKPOINT_FORMAT", "PRECISIONS", "SCOPES", "BatchSchedule", "TokenSplit", "import_sae", "l1_at",
           "latest_checkpoint", "lr_at", "optimizer_step", "precision_context", "save_checkpoint", "select_tokens",
           "train_sae"]
