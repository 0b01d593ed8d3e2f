"""The probability threshold of a detector, chosen on validation sessions (:func:`threshold_scores`,
:func:`choose_threshold`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from somaflow.detect.postprocess.fusion import fuse_batches
from somaflow.detect.postprocess.masks import masks_from_centroids, probability_to_masks
from somaflow.detect.postprocess.params import DEFAULT_CANDIDATES, PostprocessParams
from somaflow.errors import InputError, ParameterError
from somaflow.evaluate.matching import match_iou

log = logging.getLogger(__name__)


def threshold_scores(
    probs: Sequence[np.ndarray],
    truths: Sequence[np.ndarray],
    params: PostprocessParams,
    candidates: Sequence[float] | np.ndarray = DEFAULT_CANDIDATES,
    images: Sequence[np.ndarray] | None = None,
) -> np.ndarray:
    """Mean F1 (IoU ≥ 0.5, :func:`somaflow.evaluate.match_iou`) of each threshold.

    Parameters
    ----------
    probs : sequence of numpy.ndarray
        One probability map per session: ``(y, x)``, or ``(batch, y, x)`` for
        several temporal batches whose masks are fused by :func:`fuse_batches`.
    truths : sequence of numpy.ndarray
        ``(n, y, x)`` bool ground-truth masks per session.
    params : PostprocessParams
        Everything but ``threshold`` is used as given.
    candidates : array_like of float
        Thresholds to try, each in (0, 1).
    images : sequence of numpy.ndarray, optional
        ``(y, x)`` summary image per session: the maps are then centroid maps
        and the masks come from :func:`masks_from_centroids`.

    Returns
    -------
    numpy.ndarray
        ``(len(candidates),)`` float64 mean F1 over the sessions.

    Raises
    ------
    InputError
        No sessions, or ``probs``, ``truths`` (and ``images``) differ in length.
    ParameterError
        No candidates, or a candidate outside (0, 1).
    """
    cands = np.asarray(candidates, dtype=np.float64).ravel()
    if cands.size == 0 or not np.all((cands > 0) & (cands < 1)):
        raise ParameterError(
            f"threshold candidates must be a non-empty list of values in (0, 1), got {cands.tolist()}."
        )
    if len(probs) == 0 or len(probs) != len(truths) or (images is not None and len(images) != len(probs)):
        raise InputError(
            f"choose_threshold needs one probability map and one truth mask stack per session "
            f"(and one image each in centroid mode); got {len(probs)} maps, {len(truths)} truths"
            + ("" if images is None else f", {len(images)} images") + "."
        )
    base = params.model_dump()
    scores = np.zeros(cands.size)
    for k, t in enumerate(cands):
        p = PostprocessParams(**{**base, "threshold": float(t)})
        f1 = [
            match_iou(_session_masks(prob, None if images is None else images[s], p), truths[s]).f1
            for s, prob in enumerate(probs)
        ]
        scores[k] = float(np.mean(f1))
    return scores


def choose_threshold(
    probs: Sequence[np.ndarray],
    truths: Sequence[np.ndarray],
    params: PostprocessParams,
    candidates: Sequence[float] | np.ndarray = DEFAULT_CANDIDATES,
    images: Sequence[np.ndarray] | None = None,
) -> float:
    """The probability threshold with the best mean F1 on labelled data (STNeuroNet).

    Parameters are those of :func:`threshold_scores`. When several candidates
    reach the best mean F1, the middle one of them (in sorted order) is
    returned: the most robust choice on a plateau.

    Returns
    -------
    float
        The chosen threshold, one of ``candidates``.
    """
    cands = np.asarray(candidates, dtype=np.float64).ravel()
    scores = threshold_scores(probs, truths, params, cands, images)
    best = np.flatnonzero(scores >= scores.max() - 1e-12)
    tied = np.sort(cands[best])
    choice = float(tied[(tied.size - 1) // 2])
    log.info(
        "threshold by mean F1: %s -> %.3g",
        ", ".join(f"{t:.3g}: {s:.3f}" for t, s in zip(cands, scores, strict=True)), choice,
    )
    return choice


def _session_masks(prob: np.ndarray, image: np.ndarray | None, params: PostprocessParams) -> np.ndarray:
    """Masks of one session's map (``(y, x)`` or ``(batch, y, x)``, fused)."""
    arr = np.asarray(prob)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise InputError(
            f"a probability map must be (y, x) or (batch, y, x), got shape {arr.shape}."
        )
    if image is None:
        per_batch = [probability_to_masks(b, params) for b in arr]
    else:
        per_batch = [masks_from_centroids(b, image, params) for b in arr]
    return per_batch[0] if len(per_batch) == 1 else fuse_batches(per_batch, params)

