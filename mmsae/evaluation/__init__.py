"""Evaluation: how well scores filter (auroc), the method's premise (premise), the filtering curve
(curve), the model benchmarks (benchmarks, llava_bench) and the per-sample reference scores (baselines).
The stages: premise, curve, benchmark (in benchmarks) and baseline_scores (in baselines) each live in
the module named here, as its STAGE, Inputs and run.

Import from the submodules; this package re-exports nothing, so importing one concern does not load
the others (the benchmarks need torch, the AUROC tables do not).
"""
