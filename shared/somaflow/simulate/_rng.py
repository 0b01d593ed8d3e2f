"""Named, independent random streams derived from one seed.

Each part of the simulation draws from its own stream so that changing one part
(say the number of blobs) leaves the others as they were, and the noise of a
block of frames depends only on the seed and the block index, never on how the
movie is chunked.
"""

from __future__ import annotations

import numpy as np

#: fixed stream identifiers; never renumber, only append
STREAMS = {
    "placement": 1,
    "shape": 2,
    "activity": 3,
    "neuropil": 4,
    "background": 5,
    "blobs": 6,
    "out_of_focus": 7,
    "vessels": 8,
    "motion": 9,
    "noise": 10,
    "brightness": 11,
}


def rng_for(seed: int, stream: str, *index: int) -> np.random.Generator:
    """A generator for ``stream`` (and optional integer ``index``) under ``seed``."""
    if seed < 0:
        raise ValueError("seed must be a non-negative integer")
    return np.random.default_rng(np.random.SeedSequence([int(seed), STREAMS[stream], *map(int, index)]))
