"""Score's SAE pass (offdist's reconstruction error on image tokens) per image token, at real widths.

`mmsae.scoring.offdist.image_stats` on a synthetic store (perf/_data.py) with a random SAE: by default
d_in 4096, d_sae 65,536, TopK k 64, as the LLaVA-NeXT-7B preset. Reports wall and CPU seconds per image
token (best of --reps passes) and the peak RSS. The store is written once into --work.

    PYTHONPATH=. .venv/bin/python perf/score_sae.py --samples 4 --tokens 600 --image-tokens 512
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import OUT, add_common_args, machine, peak_rss_mb, setup, timed_reps  # noqa: E402
from _data import write_store  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p, "score_sae")
    p.add_argument("--d-in", type=int, default=4096)
    p.add_argument("--d-sae", type=int, default=65536)
    p.add_argument("--architecture", default="topk", choices=("topk", "relu"))
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--tokens", type=int, default=600, help="tokens per sample")
    p.add_argument("--image-tokens", type=int, default=512, help="image tokens per sample")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--work", default=str(OUT / "score_sae"))
    args = p.parse_args(argv)
    dev = setup(args.threads, args.device)

    from mmsae.activations import ActivationStore
    from mmsae.sae.model import SAEConfig, build_sae
    from mmsae.scoring import ScoringContext, offdist

    work = Path(args.work) / f"d{args.d_in}_n{args.samples}x{args.tokens}"
    store = ActivationStore(work) if (work / "tokens.parquet").exists() else write_store(
        work, args.samples, args.d_in, args.seed, tokens_per_sample=args.tokens, image_tokens=args.image_tokens)
    cfg = SAEConfig(d_in=args.d_in, d_sae=args.d_sae, architecture=args.architecture,
                    k=args.k if args.architecture == "topk" else None, apply_b_dec_to_input=args.architecture == "topk")
    sae = build_sae(cfg, seed=None).eval()  # filled in place below: the seeded init's temporaries take GBs at this size
    with torch.no_grad():
        g = torch.Generator().manual_seed(args.seed)
        sae.W_dec.normal_(generator=g)
        sae.W_dec.div_(sae.W_dec.norm(dim=1, keepdim=True))
        sae.W_enc.copy_(sae.W_dec.T)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    sae = sae.to(dev)
    ids = sorted(store.tokens["sample_id"].astype(str).unique())
    n_image = int((store.tokens["modality"] == "image").sum())

    def one() -> None:
        ctx = ScoringContext(ids, store=store, layer=0, sae=sae)
        offdist.image_stats(ctx)

    t = timed_reps(one, dev, args.reps)
    out = {"bench": "score_sae", "d_in": args.d_in, "d_sae": args.d_sae, "architecture": args.architecture,
           "k": args.k, "image_tokens": n_image, "s_per_image_token": t["best_s"] / n_image,
           "cpu_s_per_image_token": t["cpu_s"] / n_image, "peak_rss_mb": peak_rss_mb(),
           "machine": machine(dev, args.threads)}
    print(f"score SAE pass: {out['s_per_image_token'] * 1e3:.2f} ms / image token (best wall), "
          f"{out['cpu_s_per_image_token'] * 1e3:.2f} ms CPU; {n_image} image tokens; d {args.d_in} x {args.d_sae} "
          f"{args.architecture}; peak RSS {out['peak_rss_mb']:.0f} MB; {args.threads} thread(s) on {dev}")
    return out


if __name__ == "__main__":
    import json

    res = main()
    Path(res.get("json", OUT / "score_sae.json")).parent.mkdir(parents=True, exist_ok=True)
    (OUT / "score_sae.json").write_text(json.dumps(res, indent=2))
