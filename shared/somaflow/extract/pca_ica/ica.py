"""The ICA step: spatio-temporal independent components of the principal components.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import xarray as xr

from somaflow.extract.pca_ica.params import PcaIcaParams

log = logging.getLogger(__name__)


def spatiotemporal_ica(pcs: xr.Dataset, n_ics: int, params: PcaIcaParams) -> xr.Dataset:
    """Spatio-temporal skewness ICA of principal components (CellSort's fixed point).

    Parameters
    ----------
    pcs : xarray.Dataset
        ``temporal`` (component, frame) and ``spatial`` (component, y, x)
        singular vectors with orthonormal rows, as from
        :func:`principal_components`.
    n_ics : int
        ICs sought, at most the number of components; 0 gives empty outputs.
    params : PcaIcaParams
        Uses ``mu``, ``max_ica_iterations``, ``ica_tolerance``, ``seed``.

    Returns
    -------
    xarray.Dataset
        ``temporal`` (ic, frame) float64 — IC time courses, zero mean, unit
        variance; ``spatial`` (ic, y, x) float64 — IC images, unit norm;
        ``skewness`` (ic) float64 of the time courses. Signed to positive
        skewness over the concatenated samples; sorted by decreasing
        ``skewness``. Attr ``iterations``.
    """
    temporal = np.asarray(pcs["temporal"].values, np.float64)
    spatial_img = np.asarray(pcs["spatial"].values, np.float64)
    k, n_rows = temporal.shape
    grid = spatial_img.shape[1:]
    spatial = spatial_img.reshape(k, -1)
    n_ics = min(int(n_ics), k)
    if n_ics == 0:
        return xr.Dataset(
            {
                "temporal": (("ic", "frame"), np.zeros((0, n_rows))),
                "spatial": (("ic", "y", "x"), np.zeros((0, *grid))),
                "skewness": (("ic",), np.zeros(0)),
            },
            attrs={"iterations": 0},
        )
    sig = temporal - temporal.mean(axis=1, keepdims=True)
    mu = params.mu
    x = np.concatenate([(1 - mu) * spatial, mu * sig], axis=1) / math.sqrt(1 - 2 * mu + 2 * mu * mu)
    b = _symmetric_orthogonalize(np.random.default_rng(params.seed).standard_normal((k, n_ics)))
    n_samples = x.shape[1]
    iterations = 0
    converged = False
    while iterations < params.max_ica_iterations and not converged:
        iterations += 1
        new = _symmetric_orthogonalize(x @ ((x.T @ b) ** 2) / n_samples)
        converged = 1.0 - float(np.min(np.abs(np.sum(new * b, axis=0)))) < params.ica_tolerance
        b = new
    if not converged:
        log.warning("pca-ica: the ICA did not converge in %d iterations; raise max_ica_iterations "
                    "or ica_tolerance", params.max_ica_iterations)
    w = b.T  # (ic, component), orthonormal rows
    sign = np.where(_skewness(w @ x) < 0, -1.0, 1.0)
    w = w * sign[:, None]
    ic_time = w @ sig
    ic_time /= np.maximum(ic_time.std(axis=1, keepdims=True), np.finfo(np.float64).tiny)
    skew = _skewness(ic_time)
    order = np.argsort(-skew, kind="stable")
    return xr.Dataset(
        {
            "temporal": (("ic", "frame"), ic_time[order]),
            "spatial": (("ic", "y", "x"), (w @ spatial)[order].reshape(n_ics, *grid)),
            "skewness": (("ic",), skew[order]),
        },
        attrs={"iterations": iterations},
    )


def _symmetric_orthogonalize(b: np.ndarray) -> np.ndarray:
    """``B (BᵀB)^{-1/2}``: the nearest matrix with orthonormal columns."""
    u, _, vt = np.linalg.svd(b, full_matrices=False)
    return u @ vt


def _skewness(rows: np.ndarray) -> np.ndarray:
    """Sample skewness of each row of a 2-D array (0 for a constant row)."""
    c = rows - rows.mean(axis=1, keepdims=True)
    m2 = np.mean(c**2, axis=1)
    m3 = np.mean(c**3, axis=1)
    return np.divide(m3, m2**1.5, out=np.zeros_like(m3), where=m2 > 0)

