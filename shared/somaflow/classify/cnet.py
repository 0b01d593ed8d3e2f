"""The 3CNet cell / not-cell verdict, folded into any method's ``score`` and ``accepted``.

Every unit becomes a 92×92×2 candidate (its footprint image around the
centroid, and its trace; :func:`candidate_inputs`), the classifier gives the
probability that it is a cell, and:

* ``cnn_score`` (unit) holds that probability;
* ``score`` becomes the geometric mean of the method's score and ``cnn_score``;
* ``accepted`` requires ``cnn_score >= threshold`` as well as the method's own
  quality tests.

The same :func:`candidate_inputs` builds the training examples
(:func:`somaflow.training.candidate_sets.simulated_candidate_set`), so what the classifier sees
at inference is what it was trained on. torch is not imported here.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import xarray as xr
from pydantic import BaseModel, ConfigDict, Field

from somaflow.errors import ParameterError
from somaflow.inference import get_backend
from somaflow.nn.features import candidate_examples, masked_mean_images
from somaflow.nn.ood import out_of_distribution

log = logging.getLogger(__name__)

CLASSIFIERS = ("none", "3cnet", "3cnet-plus")


class ClassifyParams(BaseModel):
    """Settings of the classification stage."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    classifier: str = Field("none", description=f"one of {', '.join(CLASSIFIERS)}; 'none' keeps the method's verdict")
    weights: str = Field("default", description="checkpoint path/URL, or 'default' for the shipped weights")
    threshold: float = Field(0.5, gt=0, lt=1, description="cell probability needed to accept a unit")
    inference: str = Field("local", exclude=True,
                           description="where the model runs: 'local' or http://HOST:PORT (as CnnParams.inference)")
    ood_check: bool = Field(True, description="warn when the candidates look unlike the training data")

    def model_post_init(self, __context: object) -> None:
        if self.classifier not in CLASSIFIERS:

            raise ParameterError(f"classify.classifier {self.classifier!r} is not one of {', '.join(CLASSIFIERS)}.")


def candidate_inputs(units: xr.Dataset, traces: xr.Dataset, images: xr.Dataset,
                     model: str) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """The classifier's input for every unit.

    Parameters
    ----------
    units : xarray.Dataset
        ``masks`` (unit, y, x), and ``footprints`` when the method has them
        (otherwise the mean image inside a dilated mask stands in).
    traces : xarray.Dataset
        ``dff`` (unit, frame).
    images : xarray.Dataset
        ``mean_image`` (y, x).
    model : {"3cnet", "3cnet-plus"}

    Returns
    -------
    ndarray (unit, 2, 92, 92), or tuple of (unit, 1, 92, 92) and (unit, 512)
        float32.
    """

    n = units.sizes["unit"]
    ny, nx = int(units.sizes["y"]), int(units.sizes["x"])
    fps = float(traces.attrs.get("fps", 10.0))
    mean = None if "footprints" in units else np.asarray(images["mean_image"].values, np.float32)
    # blocks of units: a dense (unit, y, x) float32 stack of a large field costs gigabytes
    per = max(1, _BLOCK_BYTES // (4 * ny * nx))
    xs, vecs = [], []
    for i in range(0, n, per):
        block = slice(i, min(n, i + per))
        masks = np.asarray(units["masks"][block].values, bool)
        dff = np.asarray(traces["dff"][block].values, np.float32)
        if mean is None:
            rois = np.asarray(units["footprints"][block].values, np.float32)
        else:
            rois = masked_mean_images(mean, masks)
        x_b, vec_b, _ = candidate_examples(rois, masks, dff, fps=fps)
        xs.append(x_b)
        vecs.append(vec_b)
    if not xs:
        x, vec, _ = candidate_examples(np.zeros((0, ny, nx), np.float32), np.zeros((0, ny, nx), bool),
                                       np.zeros((0, traces.sizes["frame"]), np.float32), fps=fps)
    else:
        x, vec = np.concatenate(xs), np.concatenate(vecs)
    if model == "3cnet-plus":
        return x[:, :1], vec
    return x


#: bytes of one block of units' dense ROI images in :func:`candidate_inputs`
_BLOCK_BYTES = 64 << 20


def classify_units(units: xr.Dataset, traces: xr.Dataset, images: xr.Dataset,
                   p: ClassifyParams, *, modality: str | None = None) -> xr.Dataset:
    """Per-unit classifier verdict and the updated ``score`` and ``accepted``.

    Returns
    -------
    xarray.Dataset
        ``cnn_score``, ``score``, ``accepted`` (unit); attrs ``classifier``
        (JSON: model, weights, threshold) and ``ood_warnings`` (JSON list).
        With ``classifier="none"`` the method's own ``score`` and
        ``accepted`` pass through and ``cnn_score`` is NaN.
    """
    n = units.sizes["unit"]
    score = (np.asarray(units["score"].values, np.float32) if "score" in units
             else np.ones(n, np.float32))
    accepted = np.asarray(units["accepted"].values, bool) if "accepted" in units else np.ones(n, bool)
    cnn = np.full(n, np.nan, np.float32)
    warnings: list[str] = []
    if p.classifier != "none" and n:
        backend = get_backend(p.inference)
        x = candidate_inputs(units, traces, images, p.classifier)
        cnn = backend.predict(p.classifier, p.weights, x)
        score = np.sqrt(np.clip(score, 0, 1) * cnn).astype(np.float32)
        accepted = accepted & (cnn >= p.threshold)
        log.info("%s: %d of %d units judged cells", p.classifier, int((cnn >= p.threshold).sum()), n)
        if p.ood_check:

            meta = backend.metadata(p.classifier, p.weights)
            stats = meta.get("input_stats")
            stats = json.loads(stats) if isinstance(stats, str) else (stats or {})
            warnings = out_of_distribution({"modality": modality}, stats)
    ds = xr.Dataset({"cnn_score": ("unit", cnn), "score": ("unit", score), "accepted": ("unit", accepted)},
                    coords={"unit": units["unit"].values})
    ds.attrs["classifier"] = json.dumps({"model": p.classifier, "weights": p.weights, "threshold": p.threshold})
    ds.attrs["ood_warnings"] = json.dumps(warnings)
    return ds
