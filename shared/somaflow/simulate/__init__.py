"""Seeded, realistic calcium-imaging movies with ground truth.

Example::

    from somaflow.simulate import simulate, write_simulation
    sim = simulate("2p-small", seed=0)
    sim.movie.shape, sim.masks.shape   # (300, 128, 128), (35, 128, 128)
    write_simulation(sim, "out/sim")   # movie.tif, ground_truth.zarr, meta.json

Model (see :mod:`somaflow.simulate.scene`): irregular elliptical somata (some
with a dark nucleus) with partial overlaps; Poisson spikes with slow,
partly shared rate modulation; AR(1)/AR(2) dF/F calcium; silent cells visible by
their baseline only; a smooth, fluctuating neuropil plus each cell's own process
halo (2p); a drifting rank-2 background (2p) or drifting, fluctuating blobs,
out-of-focus neurons, vessels and vignetting (1p); photobleaching; rigid and
non-rigid motion applied to the clean movie; Poisson shot noise and Gaussian read
noise through a camera gain; uint16 output. Large presets stream chunk by chunk,
deterministically whatever the chunking (:func:`iter_movie_chunks`).
"""

from somaflow.simulate.model import (
    MAX_IN_MEMORY_BYTES,
    SHIFT_CONVENTION,
    TRACE_UNITS,
    Simulation,
    simulate,
)
from somaflow.simulate.params import SimulationParams, param_names
from somaflow.simulate.presets import PRESETS, list_presets, resolve_params
from somaflow.simulate.render import BLOCK, render_frames
from somaflow.simulate.stream import as_dask_array, iter_movie_chunks
from somaflow.simulate.write import SummaryAccumulator, write_simulation

__all__ = [
    "BLOCK",
    "MAX_IN_MEMORY_BYTES",
    "PRESETS",
    "SHIFT_CONVENTION",
    "TRACE_UNITS",
    "Simulation",
    "SimulationParams",
    "SummaryAccumulator",
    "as_dask_array",
    "iter_movie_chunks",
    "list_presets",
    "param_names",
    "render_frames",
    "resolve_params",
    "simulate",
    "write_simulation",
]
