"""Seeds derived from tuples of integers, so that every random stream in the data layer is a
pure function of (run seed, epoch, rank, worker, position) and nothing else: no global RNG
state, no dependence on which process happens to run the code."""
from __future__ import annotations

import random

import numpy as np

_MASK = (1 << 63) - 1


def derive_seed(*parts: int) -> int:
    """A 64-bit seed mixed from the parts (negative parts are allowed)."""
    words = [int(p) & _MASK for p in parts]
    lo, hi = np.random.SeedSequence(words).generate_state(2, dtype=np.uint32)
    return (int(hi) << 32) | int(lo)


def sample_rng(stream_seed: int, position: int) -> random.Random:
    """The RNG of one sample: seeded by its stream and its position in that stream.
    Cheaper than ``derive_seed`` (it runs once per sample) and still collision-free, since
    (stream_seed, position) maps to a distinct integer."""
    return random.Random((stream_seed << 40) | position)
