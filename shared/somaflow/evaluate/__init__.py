"""Scoring predicted neurons against ground truth (``somaflow evaluate``).

* :func:`load_truth` / :func:`load_prediction` read a result zarr, a
  Neurofinder regions.json or an .npz into a :class:`Truth`.
* :func:`match_iou` (STNeuroNet Eq. 13-14), :func:`match_caiman` and
  :func:`match_neurofinder` pair masks in three published conventions.
* :func:`estimate_offset` finds a global integer shift between mask sets.
* :func:`evaluate` computes everything as a JSON-serialisable dict;
  :func:`format_report` prints it as a table.
"""

from somaflow.evaluate.groundtruth import (
    Truth,
    load_prediction,
    load_truth,
    masks_from_regions,
    regions_from_masks,
)
from somaflow.evaluate.matching import (
    Matching,
    SparseMasks,
    match_caiman,
    match_iou,
    match_neurofinder,
    overlaps,
)
from somaflow.evaluate.metrics import EvaluateParams, evaluate, format_report
from somaflow.evaluate.offset import estimate_offset, refine_offset, shift_masks
from somaflow.evaluate.traces import (
    SPIKE_SIGMA_FRAMES,
    bin_frames,
    pearson_rows,
    spike_correlations,
    trace_correlations,
)

__all__ = [
    "SPIKE_SIGMA_FRAMES",
    "EvaluateParams",
    "Matching",
    "SparseMasks",
    "Truth",
    "bin_frames",
    "estimate_offset",
    "evaluate",
    "format_report",
    "load_prediction",
    "load_truth",
    "masks_from_regions",
    "match_caiman",
    "match_iou",
    "match_neurofinder",
    "overlaps",
    "pearson_rows",
    "refine_offset",
    "regions_from_masks",
    "shift_masks",
    "spike_correlations",
    "trace_correlations",
]
