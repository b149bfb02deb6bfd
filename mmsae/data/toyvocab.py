"""The toy world's vocabulary (mmsae.data.toyworld): its concept words and every word its texts use.

Data only, in one place: the world draws its scenes and questions from these words, the premise check
(mmsae.evaluation.premise) and the explanation scores (mmsae.interpret.explain) look for them, the toy model's
tokenizer is built from VOCAB_WORDS. The order is the order scenes are drawn in.
"""

from __future__ import annotations

COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("square", "circle", "triangle")
SIDES = ("left", "right")
CONCEPTS = frozenset(COLOURS) | frozenset(SHAPES) | frozenset(SIDES)
# Fluent responses that do not help (the `unhelpful` corruption, and the poor response of a preference
# pair): generic refusals, vague non-answers. None names a colour, shape or side.
UNHELPFUL = (
    "i can not tell",
    "it is hard to say",
    "it is an object",
    "it is a shape",
    "there are two objects",
    "it is a shape with a color",
)
# The alignment setting's questions and multi-word answers (mmsae.data.toyworld.ALIGN_PHRASINGS)
ALIGN_WORDS = {"which", "side", "object", "next", "to", "describe", "it", "a", "is", "the", "on"}
VOCAB_WORDS = sorted(
    CONCEPTS
    | {"what", "color", "shape", "is", "the", "on", "describe", "?", "a", "or"}
    | ALIGN_WORDS
    | {w for phrase in UNHELPFUL for w in phrase.split()}
)

__all__ = ["ALIGN_WORDS", "COLOURS", "CONCEPTS", "SHAPES", "SIDES", "UNHELPFUL", "VOCAB_WORDS"]
