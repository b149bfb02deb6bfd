"""Settling samples one by one as a stream of code batches (or store blocks) moves past them.

codes.parquet is written in store-row order and a sample's tokens are contiguous in the store, so each
sample's codes form one run of the stream: its per-sample result can be settled as soon as the stream has
moved past it, and only the open sample's data are held beyond the batch. Every pass that settles this way
raises `Unsorted` (or returns False) when a settled sample comes back; `streamed` then takes the
whole-pool pass, which gives the same result.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np

from mmsae.features import iter_codes

if TYPE_CHECKING:
    from mmsae.scoring.context import ScoringContext


class Unsorted(Exception):
    """A sample's codes are not one run of the stream: settle nothing early, take the whole-pool pass."""


def streamed(pass_fn: Callable[..., dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """`pass_fn(stream=True)`, settling sample by sample; the whole-pool pass when codes are out of order."""
    try:
        return pass_fn(stream=True)
    except Unsorted:
        return pass_fn(stream=False)


class CoocStream:
    """The co-occurring (sample, feature) keys (sample << 32 | feature, present on >= 1 text and >= 1 image
    token) of a stream of code batches in which each sample's codes form one run, as in codes.parquet
    (ordered by row; a sample's tokens are contiguous in the store). A sample is settled as soon as the
    stream has moved past it, so besides the result only the open sample's (text and image) keys are
    held, not every active pair of the data. `add` returns False once a settled sample comes back."""

    def __init__(self, n: int) -> None:
        self.settled = np.zeros(n, bool)
        self.open = -1  # the sample the last batch ended in (-1: none, or not scored)
        self.text, self.image = np.zeros(0, np.int64), np.zeros(0, np.int64)  # the open sample's keys
        self.done: list[np.ndarray] = []

    def add(self, sample: np.ndarray, text_keys: np.ndarray, image_keys: np.ndarray) -> bool:
        """One batch: `sample` = every code's sample index in stream order (-1 = not scored, every code,
        filtered or not), text_keys / image_keys = the batch's unique keys. False if a sample comes back."""
        if not len(sample):
            return True
        present = np.unique(sample[sample >= 0])
        if self.settled[present].any():
            return False
        last = int(sample[-1])
        self.settled[present] = True
        if self.open >= 0:
            self.settled[self.open] = True
        if last >= 0:
            self.settled[last] = False
        text, image = np.union1d(self.text, text_keys), np.union1d(self.image, image_keys)
        t_open, i_open = (text >> 32) == last, (image >> 32) == last
        self.done.append(np.intersect1d(text[~t_open], image[~i_open], assume_unique=True))
        self.text, self.image, self.open = text[t_open], image[i_open], last
        return True

    def finish(self) -> np.ndarray:
        """The sorted co-occurring keys (as np.intersect1d of all text and all image keys gives them)."""
        self.done.append(np.intersect1d(self.text, self.image, assume_unique=True))
        self.text, self.image = np.zeros(0, np.int64), np.zeros(0, np.int64)
        keys = np.concatenate(self.done)
        self.done.clear()  # the result is of the size of the data (samples x their features): one copy at a time
        if len(keys) > 1 and (keys[1:] < keys[:-1]).any():  # settled in store order, sorted when ids follow it
            keys.sort()
        return keys


def sample_groups(ctx: ScoringContext, columns: Sequence[str], stream: bool
                  ) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray]]:
    """(codes columns, sample, side, token_id) of the codes, batch by batch. With `stream`, each
    group holds whole samples: the rows of the sample a batch ends in are carried to the next one, so
    only one sample's codes are held beyond the batch (codes.parquet is in row order, a sample's tokens
    contiguous). Raises Unsorted when a sample comes back after the stream moved past it."""
    cols = list(dict.fromkeys(["row", *columns]))
    settled = np.zeros(ctx.n, bool)
    carry: tuple | None = None
    for b in iter_codes(ctx.need("codes", "consistency"), cols, ctx.batch_rows):
        s, side, tid = ctx.code_tokens(b)
        if not stream:
            yield b, s, side, tid
            continue
        if carry is not None:
            b = {c: np.concatenate([carry[0][c], b[c]]) for c in cols}
            s, side, tid = (np.concatenate([x, y]) for x, y in zip(carry[1:], (s, side, tid), strict=True))
            carry = None
        if not len(s):
            continue
        present = np.unique(s[s >= 0])
        if settled[present].any():
            raise Unsorted
        settled[present] = True
        last = int(s[-1])
        if last >= 0:  # the open sample may go on in the next batch
            settled[last] = False
            op = s == last
            carry = ({c: v[op] for c, v in b.items()}, s[op], side[op], tid[op])
            done = ~op
            b, s, side, tid = {c: v[done] for c, v in b.items()}, s[done], side[done], tid[done]
        yield b, s, side, tid
    if carry is not None:
        yield carry
