"""What the human-facing outputs share (the run report, mmsae.report, and the feature browser,
mmsae.interpret.browser): the HTML escape every piece of data-set text goes through, and one colour
per token modality."""

from __future__ import annotations

import html
from typing import Any

MODALITY_COLOURS = {"overall": "#555555", "text": "#1f77b4", "image": "#ff7f0e", "special": "#2ca02c"}


def esc(value: Any) -> str:
    """str(value) with &, <, >, " and ' escaped: safe in element text and in quoted attributes."""
    return html.escape(str(value), quote=True)


__all__ = ["MODALITY_COLOURS", "esc"]
