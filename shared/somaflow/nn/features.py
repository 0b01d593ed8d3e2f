"""Classifier inputs of candidate units (3CNet, 3CNet+, LSTM).

:func:`cnet_input` / :func:`cnet_inputs`, :func:`masked_mean_images`,
:func:`trace_vector`, :func:`lstm_windows` / :func:`stack_windows` and
:func:`candidate_examples` (all three for N units).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from somaflow.errors import InputError, ParameterError
from somaflow.nn.targets import check_masks, mask_centroids
from somaflow.robust import abs_diff_noise_sd, robust_sd

#: 3CNet's input side (pixels) and trace samples (92²)
CNET_SIZE = 92


CNET_TRACE = CNET_SIZE * CNET_SIZE


def robust_zscore(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """``(x − median) / noise`` along ``axis``, float32.

    ``noise`` is the white-noise SD from first differences,
    ``median(|Δx|) / (0.6745 √2)`` — transients barely move it, so a trace
    is in units of its noise — falling back to 1.4826 · MAD of the values,
    then to 1, when it is 0.
    """
    a = np.moveaxis(np.asarray(x, np.float64), axis, -1)
    med = np.median(a, axis=-1, keepdims=True)
    if a.shape[-1] > 1:
        scale = abs_diff_noise_sd(a, axis=-1)[..., None]
    else:
        scale = np.zeros_like(med)
    mad = robust_sd(a, axis=-1, keepdims=True)
    scale = np.where(scale > 0, scale, np.where(mad > 0, mad, 1.0))
    return np.moveaxis((a - med) / scale, -1, axis).astype(np.float32)


def resample(x: np.ndarray, length: int) -> np.ndarray:
    """Resample the last axis to ``length`` samples.

    Shorter outputs average the samples of ``length`` equal bins (no
    aliasing of transients); longer outputs interpolate linearly between
    sample centres. float64.
    """
    a = np.asarray(x, np.float64)
    n = a.shape[-1]
    if length < 1:
        raise ParameterError(f"resample length must be ≥ 1, got {length}.")
    if n == length:
        return a.copy()
    if n == 0:
        raise InputError("cannot resample an empty trace.")
    if length < n:
        edges = np.round(np.linspace(0, n, length + 1)).astype(int)
        csum = np.concatenate([np.zeros(a.shape[:-1] + (1,)), np.cumsum(a, axis=-1)], axis=-1)
        return (csum[..., edges[1:]] - csum[..., edges[:-1]]) / np.diff(edges)
    src = (np.arange(n) + 0.5) / n
    dst = (np.arange(length) + 0.5) / length
    flat = a.reshape(-1, n)
    return np.stack([np.interp(dst, src, row) for row in flat]).reshape(a.shape[:-1] + (length,))


def cnet_input(image: np.ndarray, mask: np.ndarray, trace: np.ndarray) -> np.ndarray:
    """One candidate as 3CNet's 92 × 92 × 2 input (Kim et al., channels first).

    Channel 0 — the candidate's ROI image (its footprint or spatial filter)
    cropped to 92 × 92 px centred on the mask's centroid, zero-padded where
    the window leaves the frame, and zero-centred: the mean of the in-frame
    pixels is subtracted; we also divide by their SD (not in the paper) so
    images in ADU, ΔF/F or footprint units look alike. Padding stays 0.

    Channel 1 — 8464 = 92² samples from the middle of the trace, robustly
    z-scored (:func:`robust_zscore`; the paper does not say how it scaled
    traces), reshaped row-major. A trace shorter than 8464 samples is
    repeated end to end (``numpy.resize``) up to 8464 — short simulator and
    lab sessions would otherwise be mostly padding.

    Parameters
    ----------
    image : numpy.ndarray
        (H, W) real.
    mask : numpy.ndarray
        (H, W) bool, non-empty.
    trace : numpy.ndarray
        (T,) real, T ≥ 1.

    Returns
    -------
    numpy.ndarray
        (2, 92, 92) float32.
    """
    image = np.asarray(image, np.float64)
    mask = np.asarray(mask, bool)
    trace = np.asarray(trace, np.float64).ravel()
    if image.ndim != 2 or mask.shape != image.shape:
        raise InputError(
            f"cnet_input needs an (H, W) image and a mask of the same shape, got {image.shape}, {mask.shape}."
        )
    if not mask.any():
        raise InputError("cnet_input: the candidate's mask is empty; drop empty candidates first.")
    if trace.size == 0:
        raise InputError("cnet_input: the candidate's trace is empty.")
    out = np.zeros((2, CNET_SIZE, CNET_SIZE), np.float32)
    cy, cx = (int(round(v)) for v in mask_centroids(mask[None])[0])
    h = CNET_SIZE // 2
    y0, x0 = cy - h, cx - h
    ys0, ys1 = max(0, y0), min(image.shape[0], y0 + CNET_SIZE)
    xs0, xs1 = max(0, x0), min(image.shape[1], x0 + CNET_SIZE)
    patch = image[ys0:ys1, xs0:xs1]
    sd = float(patch.std())
    out[0, ys0 - y0 : ys1 - y0, xs0 - x0 : xs1 - x0] = (patch - patch.mean()) / (
        sd if sd > 0 else 1.0
    )
    z = robust_zscore(trace)
    if z.size >= CNET_TRACE:
        start = (z.size - CNET_TRACE) // 2
        z = z[start : start + CNET_TRACE]
    else:
        z = np.resize(z, CNET_TRACE)
    out[1] = z.reshape(CNET_SIZE, CNET_SIZE)
    return out


def masked_mean_images(mean: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """ROI images of units without footprints: the mean image near each mask.

    The mean image minus its median, inside each mask dilated by 2 px, 0
    elsewhere: what 3CNet's image channel shows for a detector's units, at
    inference (:func:`somaflow.classify.cnet.candidate_inputs`) and in
    training (:func:`simulated_candidate_set`).

    Parameters
    ----------
    mean : numpy.ndarray
        (H, W) mean image.
    masks : numpy.ndarray
        (N, H, W) bool.

    Returns
    -------
    numpy.ndarray
        (N, H, W) float32.
    """
    masks = check_masks(masks, "masked_mean_images")
    mean = np.asarray(mean, np.float32)
    if mean.shape != masks.shape[1:]:
        raise InputError(f"masked_mean_images: a {mean.shape} mean image for {masks.shape[1:]} masks.")
    centred = mean - np.median(mean)
    out = np.zeros(masks.shape, np.float32)
    h, w = mean.shape
    for i, m in enumerate(masks):
        ys, xs = np.nonzero(m.any(axis=1))[0], np.nonzero(m.any(axis=0))[0]
        if not ys.size:
            continue
        # dilate inside the mask's bounding box plus the 2-px reach, not the whole frame
        box = (slice(max(0, ys[0] - 2), min(h, ys[-1] + 3)), slice(max(0, xs[0] - 2), min(w, xs[-1] + 3)))
        near = ndimage.binary_dilation(m[box], iterations=2)
        out[i][box] = np.where(near, centred[box], 0)
    return out


def cnet_inputs(images: np.ndarray, masks: np.ndarray, traces: np.ndarray) -> np.ndarray:
    """:func:`cnet_input` of N candidates: (N, H, W) images (or one shared (H, W) image),
    (N, H, W) masks, (N, T) traces → (N, 2, 92, 92) float32."""
    masks = check_masks(masks, "cnet_inputs")
    images = np.asarray(images)
    traces = np.asarray(traces)
    n = len(masks)
    if len(traces) != n or (images.ndim == 3 and len(images) != n):
        raise InputError(
            f"cnet_inputs: {n} masks but {len(traces)} traces / {images.shape} images."
        )
    out = np.zeros((n, 2, CNET_SIZE, CNET_SIZE), np.float32)
    for i in range(n):
        out[i] = cnet_input(images[i] if images.ndim == 3 else images, masks[i], traces[i])
    return out


def trace_vector(trace: np.ndarray, length: int = 512) -> np.ndarray:
    """The CNet3Plus trace branch's input: the whole trace at a fixed length, in noise units.

    Resampled to ``length`` samples (bin means when shorter, linear
    interpolation when longer: :func:`resample`), then robustly z-scored
    (:func:`robust_zscore`, after resampling so the unit is the noise of a
    resampled sample).

    Parameters
    ----------
    trace : numpy.ndarray
        (..., T) real.
    length : int
        Output samples.

    Returns
    -------
    numpy.ndarray
        (..., length) float32.
    """
    return robust_zscore(resample(trace, length))


def lstm_windows(
    trace: np.ndarray,
    window: int = 100,
    n_windows: int | None = None,
    *,
    fps: float | None = None,
    target_fps: float = 10.0,
) -> np.ndarray:
    """A trace cut into z-scored windows for the LSTM seed classifier (sc-CNMF).

    sc-CNMF classifies windows of T₀ = 100 samples at 10 Hz: with ``fps``
    given, the trace is first resampled to ``target_fps``. It is then
    robustly z-scored (:func:`robust_zscore`) as a whole and cut into
    windows of ``window`` samples: by default non-overlapping from the
    start, plus one window aligned to the end when a remainder is left, so
    every sample is in a window; with ``n_windows``, that many windows with
    evenly spaced starts (overlapping when needed). A trace shorter than a
    window is padded with zeros (its median) to one window.

    Parameters
    ----------
    trace : numpy.ndarray
        (T,) real.
    window : int
        Samples per window.
    n_windows : int, optional
        Number of windows.
    fps : float, optional
        The trace's frame rate (Hz); None: no resampling.
    target_fps : float
        Rate the windows are cut at (Hz).

    Returns
    -------
    numpy.ndarray
        (W, window) float32.
    """
    x = np.asarray(trace, np.float64).ravel()
    if x.size == 0:
        raise InputError("lstm_windows: the trace is empty.")
    if window < 1 or (n_windows is not None and n_windows < 1):
        raise ParameterError(
            f"lstm_windows: window and n_windows must be ≥ 1, got {window}, {n_windows}."
        )
    if fps is not None and not math.isclose(fps, target_fps):
        x = resample(x, max(1, int(round(x.size * target_fps / fps))))
    z = robust_zscore(x)
    if z.size < window:
        z = np.concatenate([z, np.zeros(window - z.size, np.float32)])
    last = z.size - window
    if n_windows is None:
        starts = list(range(0, last + 1, window))
        if starts[-1] != last:
            starts.append(last)
    else:
        starts = np.round(np.linspace(0, last, n_windows)).astype(int).tolist()
    return np.stack([z[s : s + window] for s in starts]).astype(np.float32)


def stack_windows(windows: Sequence[np.ndarray], n_windows: int | None = None) -> np.ndarray:
    """Windows of several traces as one (N, W, window) array.

    Traces with fewer windows than ``W`` (default: the most any trace has)
    repeat their own windows cyclically, which leaves a max over windows —
    the LSTM classifier's verdict — unchanged; traces with more keep their
    first ``W``.
    """
    if not len(windows):
        return np.zeros((0, n_windows or 1, 100), np.float32)
    w = n_windows or max(len(a) for a in windows)
    return np.stack([np.asarray(a, np.float32)[np.arange(w) % len(a)] for a in windows])


def candidate_examples(
    footprints: np.ndarray,
    masks: np.ndarray,
    traces: np.ndarray,
    *,
    fps: float,
    trace_length: int = 512,
    window: int = 100,
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Classifier inputs of N units: (N, 2, 92, 92), (N, trace_length), N × (W, window).

    Parameters
    ----------
    footprints : numpy.ndarray
        (N, H, W) the units' ROI images (footprints).
    masks : numpy.ndarray
        (N, H, W) bool, non-empty.
    traces : numpy.ndarray
        (N, T) their traces (``dff`` of a result).
    fps : float
        Frame rate of the traces (the LSTM windows are cut at 10 Hz).
    """
    masks = check_masks(masks, "candidate_examples")
    traces = np.asarray(traces, np.float32)
    images = cnet_inputs(footprints, masks, traces)
    vectors = (
        trace_vector(traces, trace_length)
        if len(traces)
        else np.zeros((0, trace_length), np.float32)
    )
    windows = [lstm_windows(t, window, fps=fps) for t in traces]
    return images, vectors.astype(np.float32), windows

