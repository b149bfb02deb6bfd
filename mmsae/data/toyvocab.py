"""The toy world's vocabulary (mmsae.data.toyworld): its concept words and every word its texts use.

Data only, in one place: the world draws its scenes and questions from these words, the premise check
(mmsae.evaluation.premise) and the explanation scores (mmsae.interpret.explain) look for them, the toy model's
tokenizer is built from VOCAB_WORDS. The order is the order scenes are drawn in.
"""

from __future__ import annotations

COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("square", "circle", "triangle")
SIDES = ("left", "right")
VOCAB_WORDS = sorted(
    set(COLOURS) | set(SHAPES) | set(SIDES)
    | {"what", "color", "shape", "is", "the", "on", "describe", "?", "a", "or"}
)

__all__ = ["COLOURS", "SHAPES", "SIDES", "VOCAB_WORDS"]
