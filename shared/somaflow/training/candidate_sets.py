"""Classifier training sets: candidates a method found on simulated sessions,
labelled against the ground truth (:func:`simulated_candidate_set`,
:func:`label_candidates`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import dask
import numpy as np
from scipy.optimize import linear_sum_assignment

from somaflow.errors import ParameterError
from somaflow.evaluate import match_iou, overlaps
from somaflow.nn.features import CNET_SIZE, candidate_examples, masked_mean_images
from somaflow.nn.targets import check_masks
from somaflow.params import RunParams
from somaflow.session import find_units
from somaflow.training.detector_sets import detection_summary_images, sim_movie, simulate_session

log = logging.getLogger(__name__)


def label_candidates(
    candidate_masks: np.ndarray,
    truth_masks: np.ndarray,
    *,
    iou: float = 0.5,
    one_to_one: bool = True,
    containment: float | None = None,
) -> np.ndarray:
    """Label candidates 1 (a true cell) or 0 by matching them to ground truth.

    A candidate and a true cell match when their IoU is ≥ ``iou`` (and, with
    ``containment``, also when one lies inside the other: at least that
    fraction of the smaller mask's pixels inside the larger, STNeuroNet
    Eq. 13–14). With ``one_to_one`` the Hungarian assignment that maximises
    the number of such pairs, then their total IoU (with ``containment``,
    :func:`~somaflow.evaluate.match_iou`'s, where a contained pair costs 0),
    gives each true cell at most one candidate (a second candidate on the same cell is labelled 0,
    as an evaluation counts it a false positive).

    The shipped classifiers are trained on the default, IoU alone: a small
    candidate wholly inside a cell is 0. ``containment=1.0`` gives instead
    exactly the units :func:`somaflow.evaluate.evaluate` counts as true
    positives (its matching, :func:`~somaflow.evaluate.match_iou`, accepts
    exact containment at distance 0); ``bench_cnn.py`` reports accuracy
    against both.

    Parameters
    ----------
    candidate_masks : numpy.ndarray
        (N, H, W) bool.
    truth_masks : numpy.ndarray
        (M, H, W) bool, same H, W.
    iou : float
        IoU threshold in (0, 1].
    one_to_one : bool
        False: every candidate that matches some true cell is 1.
    containment : float or None
        Fraction in (0, 1] of the smaller mask inside the larger that makes a
        match regardless of IoU (1.0: exact containment, the evaluator's
        default). None (default): IoU alone.

    Returns
    -------
    numpy.ndarray
        (N,) int64 in {0, 1}.
    """

    if not 0 < iou <= 1:
        raise ParameterError(f"iou must be in (0, 1], got {iou}.")
    if containment is not None and not 0 < containment <= 1:
        raise ParameterError(f"containment must be in (0, 1] or None, got {containment}.")
    cand = check_masks(candidate_masks, "label_candidates")
    truth = check_masks(truth_masks, "label_candidates")
    labels = np.zeros(len(cand), np.int64)
    if len(cand) == 0 or len(truth) == 0:
        return labels
    if containment is not None and one_to_one:
        labels[np.asarray(match_iou(cand, truth, iou, containment=containment).pred, np.int64)] = 1
        return labels
    ov = overlaps(cand, truth)
    ok = ov.iou >= iou
    if containment is not None:
        ok |= ov.contained(containment)
    pred, true, score = ov.pred[ok], ov.true[ok], ov.iou[ok]
    if not one_to_one:
        labels[np.unique(pred)] = 1
        return labels
    if pred.size == 0:
        return labels
    rows, r_inv = np.unique(pred, return_inverse=True)
    cols, c_inv = np.unique(true, return_inverse=True)
    big = float(min(len(rows), len(cols)) + 1)  # any pair beats no pair
    cost = np.full((len(rows), len(cols)), big)
    cost[r_inv, c_inv] = 1.0 - score
    ri, ci = linear_sum_assignment(cost)
    labels[rows[ri[cost[ri, ci] < big]]] = 1
    return labels


@dataclass(frozen=True)
class CandidateSet:
    """Classifier examples: candidates a method found, labelled against ground truth.

    Iterating gives ``images, traces, windows, labels`` (so it unpacks as a
    4-tuple).

    Attributes
    ----------
    images : numpy.ndarray
        (N, 2, 92, 92) float32 :func:`cnet_input` (3CNet).
    traces : numpy.ndarray
        (N, L) float32 :func:`trace_vector` (the 3CNet+ trace branch).
    windows : list of numpy.ndarray
        N arrays (W_i, 100) of :func:`lstm_windows`; :func:`stack_windows`
        makes one array.
    labels : numpy.ndarray
        (N,) int64: 1 = matched a true cell (IoU ≥ 0.5, Hungarian).
    active : numpy.ndarray
        (N,) int64: 1 = matched a true cell that fires (the LSTM's label).
    session : numpy.ndarray
        (N,) int64 index into ``sessions`` (for splits by session).
    sessions : list of dict
        ``preset``, ``seed``, ``n_candidates``, ``n_truth``, ``method``.
    best_iou : numpy.ndarray
        (N,) float32, each candidate's highest IoU with any true cell (0 when
        it overlaps none): how far from the labels' 0.5 boundary it lies.
    evaluator_labels : numpy.ndarray
        (N,) int64: 1 = a true positive as :func:`somaflow.evaluate.evaluate`
        counts it (IoU ≥ 0.5 or exact containment; ``label_candidates(...,
        containment=1.0)``). Not used for training.
    """

    images: np.ndarray
    traces: np.ndarray
    windows: list[np.ndarray]
    labels: np.ndarray
    active: np.ndarray
    session: np.ndarray
    sessions: list[dict[str, Any]]
    best_iou: np.ndarray
    evaluator_labels: np.ndarray

    def __iter__(self) -> Iterator[Any]:
        return iter((self.images, self.traces, self.windows, self.labels))


def simulated_candidate_set(
    presets: Sequence[str],
    seeds: Sequence[int],
    *,
    method: str = "cnmf",
    n_frames: int | None = None,
    overrides: Mapping[str, Any] | None = None,
    params: Mapping[str, Any] | None = None,
    iou: float = 0.5,
    trace_length: int = 512,
    window: int = 100,
) -> CandidateSet:
    """Classifier examples: the library's own extraction on simulated sessions.

    Each (preset, seed) is simulated without motion and run through
    :func:`somaflow.extract.find_units` with ``method`` and
    ``RunParams.for_movie`` defaults, on the summary images of the
    detection movie (:func:`detection_summary_images`), on dask's threaded
    scheduler. Every unit found — accepted or not — is a candidate: its ROI
    image is its footprint (for a method without footprints,
    :func:`masked_mean_images`, as at inference), its trace its ``dff``; labels come from
    :func:`label_candidates` against all true cells (``labels``) and against
    the firing ones (``active``).

    Parameters
    ----------
    presets, seeds : sequence
    method : {"cnmf", "local-maxima", "pca-ica"}
    n_frames : int, optional
        Override the presets' frame count.
    overrides : mapping, optional
        More simulator overrides.
    params : mapping, optional
        Run-parameter overrides (as ``somaflow run --params``) on top of the
        ``RunParams.for_movie`` defaults, e.g. ``{"cnmf": {"add_silent": False}}``.
    iou : float
        Matching threshold of a positive label.
    trace_length, window : int
        Lengths of :func:`trace_vector` and the :func:`lstm_windows`.

    Returns
    -------
    CandidateSet
        Unpacks as ``images, traces, windows, labels``.
    """

    imgs, vecs, wins, labels, active, session, sessions, best_iou, ev_labels = [], [], [], [], [], [], [], [], []
    for preset in presets:
        for seed in seeds:
            t0 = time.perf_counter()
            sim = simulate_session(preset, seed, n_frames, overrides)
            fps, modality, r = sim.meta["fps"], sim.meta["modality"], sim.meta["neuron_radius"]
            movie = sim_movie(sim).astype(np.float32)
            movie = movie.chunk({"frame": min(100, movie.sizes["frame"])})
            p = RunParams.for_movie(fps, modality, r, {**(params or {}), "method": method},
                                   shape=tuple(movie.shape))
            with dask.config.set(scheduler="threads"):
                images = detection_summary_images(movie, fps, modality, r)
                units, traces = find_units(movie, images, p)
            masks = np.asarray(units["masks"].values, bool)
            keep = masks.reshape(len(masks), -1).any(axis=1)
            masks = masks[keep]
            if "footprints" in units:
                fp = np.asarray(units["footprints"].values, np.float32)[keep]
            else:  # as classify.cnet.candidate_inputs does at inference
                fp = masked_mean_images(np.asarray(images["mean_image"].values, np.float32), masks)
            dff = np.asarray(traces["dff"].values, np.float32)[keep]
            im, vec, win = candidate_examples(
                fp, masks, dff, fps=fps, trace_length=trace_length, window=window
            )
            truth = np.asarray(sim.masks, bool)
            firing = np.asarray(sim.active, bool)
            imgs.append(im)
            vecs.append(vec)
            wins.extend(win)
            labels.append(label_candidates(masks, truth, iou=iou))
            best_iou.append(_best_iou(masks, truth))
            ev_labels.append(label_candidates(masks, truth, iou=iou, containment=1.0))
            active.append(label_candidates(masks, truth[firing], iou=iou))
            session.append(np.full(len(masks), len(sessions), np.int64))
            sessions.append(
                {
                    "preset": str(preset),
                    "seed": int(seed),
                    "method": method,
                    "n_candidates": int(len(masks)),
                    "n_truth": int(len(truth)),
                }
            )
            log.info(
                "%d %s candidates from %s seed %d (%d cells) in %.1f s",
                len(masks),
                method,
                preset,
                seed,
                int(labels[-1].sum()),
                time.perf_counter() - t0,
            )
    return CandidateSet(
        images=np.concatenate(imgs) if imgs else np.zeros((0, 2, CNET_SIZE, CNET_SIZE), np.float32),
        traces=np.concatenate(vecs) if vecs else np.zeros((0, trace_length), np.float32),
        windows=wins,
        labels=np.concatenate(labels) if labels else np.zeros(0, np.int64),
        active=np.concatenate(active) if active else np.zeros(0, np.int64),
        session=np.concatenate(session) if session else np.zeros(0, np.int64),
        sessions=sessions,
        best_iou=np.concatenate(best_iou) if best_iou else np.zeros(0, np.float32),
        evaluator_labels=np.concatenate(ev_labels) if ev_labels else np.zeros(0, np.int64),
    )


def _best_iou(candidate_masks: np.ndarray, truth_masks: np.ndarray) -> np.ndarray:
    """(N,) float32 highest IoU of each candidate with any true mask (0: overlaps none)."""

    best = np.zeros(len(candidate_masks), np.float64)
    if len(candidate_masks) and len(truth_masks):
        ov = overlaps(candidate_masks, truth_masks)
        np.maximum.at(best, ov.pred, ov.iou)
    return best.astype(np.float32)

