"""OASIS over a unit-chunked Dask array of whole traces (:func:`deconvolve_blocks`): spikes and,
optionally, the denoised calcium of a second pass with other sparsity and decay settings.
"""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np

from somaflow.oasis.kernels import kernel_estimates, shared_kernel
from somaflow.oasis.params import DeconvolutionParams
from somaflow.oasis.solve import deconvolve


def deconvolve_blocks(dff: da.Array, fps: float, params: DeconvolutionParams,
                      calcium: DeconvolutionParams | None = None) -> da.Array:
    """OASIS on a unit-chunked ΔF/F array, each chunk holding whole traces.

    With ``params.g_scope == "shared"`` (and ``estimate_g``) the kernel is
    shared by all units, not by the units of a chunk: each chunk's
    :func:`kernel_estimates` are gathered first and :func:`shared_kernel`
    fixes it, so the result does not depend on the chunking.

    Parameters
    ----------
    dff : dask.array.Array
        (unit, frame) float64, one chunk along ``frame``.
    fps : float
        Frame rate (Hz).
    params : DeconvolutionParams
        The spikes' deconvolution (and the calcium's when ``calcium`` is None).
    calcium : DeconvolutionParams, optional
        A second pass for the denoised calcium
        (:meth:`~somaflow.oasis.CalciumParams.apply` of ``params``); a shared
        kernel is fixed from the same kernel estimates (each pass applies its
        own ``decay_correction_s``). ``None`` or equal to ``params``: one pass.
        The second pass costs about as much as the first (the estimates are
        not repeated).

    Returns
    -------
    dask.array.Array
        (2, unit, frame) float64: denoised calcium, spikes.
    """
    if calcium == params:
        calcium = None
    if params.estimate_g and params.g_scope == "shared":
        est = da.map_blocks(_kernel_block, dff, fps=fps, params=params, chunks=(dff.chunks[0], (2,)),
                            dtype=np.float64)
        params = dask.delayed(shared_kernel, pure=True)(est, fps, params)
        if calcium is not None and calcium.estimate_g and calcium.g_scope == "shared":
            calcium = dask.delayed(shared_kernel, pure=True)(est, fps, calcium)
    return da.map_blocks(_oasis_block, dff, fps=fps, params=params, calcium=calcium, new_axis=0,
                         chunks=((2,), *dff.chunks), dtype=np.float64)


def _kernel_block(dff: np.ndarray, *, fps: float, params: DeconvolutionParams) -> np.ndarray:
    """(unit, 2) AR(2) root estimates of rows holding whole traces."""
    if dff.shape[0] == 0:
        return np.zeros((0, 2))
    return kernel_estimates(dff, fps, params)


def _oasis_block(dff: np.ndarray, *, fps: float, params: DeconvolutionParams,
                 calcium: DeconvolutionParams | None) -> np.ndarray:
    """(2, unit, frame): OASIS denoised calcium and spikes of rows holding whole traces."""
    res = deconvolve(dff, fps, params=params)
    spikes = np.asarray(res.spikes, np.float64).reshape(dff.shape)
    if calcium is not None:
        res = deconvolve(dff, fps, params=calcium)
    return np.stack([np.asarray(res.calcium, np.float64).reshape(dff.shape), spikes])
