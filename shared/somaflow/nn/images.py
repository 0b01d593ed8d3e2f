"""Summary-image input of the image detectors (2D U-Net, mean-image ConvNet), numpy only:
:func:`summary_channels`, :func:`mean_channel`, :func:`robust_normalize`.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from somaflow.errors import InputError
from somaflow.robust import robust_sd

#: channels of :func:`summary_channels`, in order
SUMMARY_CHANNELS = ("mean_image", "max_image", "correlation_image", "pnr_image")


def robust_normalize(img: np.ndarray, clip: float | None = 20.0) -> np.ndarray:
    """``(img − median) / (1.4826 · MAD)`` clipped to ``[-clip, clip]``, float32.

    The scale falls back to the SD when the MAD is 0, and to 1 when both are
    (a constant image becomes 0). Non-finite pixels become 0.
    """
    a = np.asarray(img, np.float64)
    finite = np.isfinite(a)
    vals = a[finite]
    if vals.size == 0:
        return np.zeros(a.shape, np.float32)
    med = float(np.median(vals))
    scale = float(robust_sd(vals))
    if not scale > 0:
        scale = float(vals.std()) or 1.0
    out = np.where(finite, (a - med) / scale, 0.0)
    if clip is not None:
        out = np.clip(out, -clip, clip)
    return out.astype(np.float32)


def _image(images: xr.Dataset, name: str) -> np.ndarray:
    if name not in images:
        raise InputError(
            f"summary images lack {name!r}; pass the output of somaflow.preprocess.summary.summary_images "
            "(or detection_summary_images)."
        )
    img = np.asarray(images[name].values)
    if img.ndim != 2:
        raise InputError(f"{name} must be a (y, x) image, got shape {img.shape}.")
    return img


def summary_channels(images: xr.Dataset, *, clip: float | None = 20.0) -> np.ndarray:
    """The 2D U-Net's input: mean, max, correlation and PNR images, robustly normalised.

    Each image is mapped to robust z-scores (:func:`robust_normalize`:
    median 0, MAD-derived SD 1, clipped), so offsets and gains that differ
    between microscopes, labs and modalities vanish.

    Parameters
    ----------
    images : xarray.Dataset
        Summary images with ``mean_image``, ``max_image``,
        ``correlation_image``, ``pnr_image`` (y, x).
    clip : float or None
        Clip to ``[-clip, clip]`` robust SDs.

    Returns
    -------
    numpy.ndarray
        (4, H, W) float32 in the order of :data:`SUMMARY_CHANNELS`.
    """
    return np.stack([robust_normalize(_image(images, n), clip) for n in SUMMARY_CHANNELS])


def mean_channel(images: xr.Dataset, *, clip: float | None = 20.0) -> np.ndarray:
    """The mean-image ConvNet's input: (1, H, W) float32, the normalised mean image."""
    return robust_normalize(_image(images, "mean_image"), clip)[None]

