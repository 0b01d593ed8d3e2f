"""Masks of the temporal batches of a movie fused into one set (:func:`fuse_batches`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from scipy import sparse
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from somaflow.detect.postprocess.params import PostprocessParams
from somaflow.errors import InputError
from somaflow.evaluate.matching import MaskLike, SparseMasks, as_sparse

log = logging.getLogger(__name__)


def fuse_batches(batches: Sequence[MaskLike], params: PostprocessParams) -> np.ndarray:
    """STNeuroNet's neuron fusion of masks found in several temporal batches.

    1. Masks (from any batches) whose centres of mass are closer than
       ``fusion_distance`` are one neuron: groups are formed by complete
       linkage (every two masks of a group are closer than the distance, so
       a chain of neighbours is not merged into one neuron) among the masks a
       KD-tree finds within the distance of each other. Each group keeps the
       mask whose area is closest to the group's mean area (ties: the earliest).
    2. A kept mask ``m_i`` that covers another kept mask ``m_j``,
       ``|m_i ∩ m_j| / |m_j| > fusion_overlap`` (STNeuroNet Eq. 3), is
       removed. Masks are visited from the largest down and a mask is removed
       when it covers a mask not removed yet, so of two near-identical masks
       (each covers the other) the larger goes and the smaller stays.

    Empty masks are ignored. The work is a KD-tree query and one sparse
    product over the overlapping pairs: O(N log N) in the number of masks.

    Parameters
    ----------
    batches : sequence of numpy.ndarray or SparseMasks
        One ``(n_i, y, x)`` bool stack of masks per temporal batch (e.g. from
        :func:`probability_to_masks`), or its
        :class:`~somaflow.evaluate.matching.SparseMasks` (a long movie's many
        batches then need no dense stacks), all with the same ``(y, x)``.
    params : PostprocessParams
        ``fusion_distance`` and ``fusion_overlap`` are used.

    Returns
    -------
    numpy.ndarray
        ``(m, y, x)`` bool masks, one per neuron, ordered by the batch and
        position of the first mask of each group.

    Raises
    ------
    InputError
        No batches, a stack that is not 3-D, or stacks of different ``(y, x)``.
    """
    if not len(batches):
        raise InputError("fuse_batches needs at least one batch of masks; pass a list of (n, y, x) stacks.")
    sparse_batches = []
    for k, b in enumerate(batches):
        if not isinstance(b, SparseMasks) and np.ndim(b) != 3:
            raise InputError(
                f"batch {k} has shape {np.shape(b)}; every batch must be an (n, y, x) stack of masks."
            )
        sm = as_sparse(b)
        if sparse_batches and sm.shape != sparse_batches[0].shape:
            raise InputError(
                f"batch {k} is {sm.shape[0]}x{sm.shape[1]} (y, x) but batch 0 is "
                f"{sparse_batches[0].shape[0]}x{sparse_batches[0].shape[1]}; all batches must come from the same "
                "field of view."
            )
        sparse_batches.append(sm)
    shape = sparse_batches[0].shape
    matrix = sparse.vstack([sm.matrix for sm in sparse_batches], format="csr")
    areas = np.concatenate([sm.areas for sm in sparse_batches])
    centroids = np.concatenate([sm.centroids for sm in sparse_batches]).reshape(-1, 2)
    nonempty = np.flatnonzero(areas > 0)
    if nonempty.size == 0:
        return np.zeros((0, *shape), dtype=bool)

    groups = _fusion_groups(centroids[nonempty], params.fusion_distance)
    reps = _group_representatives(groups, areas[nonempty])
    chosen = nonempty[reps]
    kept = _drop_covering(matrix[chosen], areas[chosen], params.fusion_overlap)
    final = chosen[kept]
    log.info(
        "neuron fusion: %d masks from %d batches -> %d neurons -> %d after removing covering masks",
        nonempty.size, len(sparse_batches), chosen.size, final.size,
    )
    return matrix[final].astype(bool).toarray().reshape(final.size, *shape)


def _fusion_groups(centroids: np.ndarray, distance: float) -> np.ndarray:
    """(n,) group label per mask: complete-linkage clusters of centroids closer than ``distance``."""
    n = len(centroids)
    pairs = cKDTree(centroids).query_pairs(r=distance, output_type="ndarray")
    if pairs.size:
        d = np.hypot(*(centroids[pairs[:, 0]] - centroids[pairs[:, 1]]).T)
        pairs = pairs[d < distance]
    graph = sparse.coo_array((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    groups = np.arange(n)  # singletons keep their own index
    order = np.argsort(comp, kind="stable")
    bounds = np.flatnonzero(np.diff(comp[order])) + 1
    for members in np.split(order, bounds):
        if members.size < 2:
            continue
        if members.size == 2:
            groups[members] = members[0]
            continue
        tree = linkage(centroids[members], method="complete")
        # clusters whose members are all pairwise closer than `distance`
        sub = fcluster(tree, t=np.nextafter(distance, 0.0), criterion="distance")
        for c in np.unique(sub):
            m = members[sub == c]
            groups[m] = m.min()
    return groups


def _group_representatives(groups: np.ndarray, areas: np.ndarray) -> np.ndarray:
    """Index of the member whose area is closest to its group's mean, one per group, by group."""
    order = np.lexsort((np.arange(groups.size), groups))
    g = groups[order]
    bounds = np.flatnonzero(np.diff(g)) + 1
    starts = np.concatenate([[0], bounds])
    sums = np.add.reduceat(areas[order].astype(np.float64), starts)
    counts = np.diff(np.concatenate([starts, [g.size]]))
    mean = np.repeat(sums / counts, counts)
    dev = np.abs(areas[order] - mean)
    # smallest deviation per group, ties to the earliest mask
    key = np.lexsort((order, dev, g))
    first = np.concatenate([[True], g[key][1:] != g[key][:-1]])
    return order[key[first]]  # in group order (a group's label is its first member)


def _drop_covering(matrix: sparse.csr_array, areas: np.ndarray, overlap: float) -> np.ndarray:
    """Indices (sorted) of the masks kept after removing those that cover another kept mask."""
    n = matrix.shape[0]
    inter = sparse.coo_array(matrix @ matrix.T)
    i, j, v = inter.row, inter.col, inter.data
    sel = (i != j) & (v > overlap * areas[j])
    i, j = i[sel], j[sel]
    if i.size == 0:
        return np.arange(n)
    covered: dict[int, np.ndarray] = {}
    order = np.argsort(i, kind="stable")
    bounds = np.flatnonzero(np.diff(i[order])) + 1
    for chunk in np.split(order, bounds):
        covered[int(i[chunk[0]])] = j[chunk]
    removed = np.zeros(n, dtype=bool)
    for k in np.lexsort((np.arange(n), -areas)):  # largest first, ties by index
        cov = covered.get(int(k))
        if cov is not None and (~removed[cov]).any():
            removed[k] = True
    return np.flatnonzero(~removed)

