"""The three lazy steps of registration on ``(frame, y, x)`` movies — :func:`compute_template`,
:func:`estimate_shifts`, :func:`apply_shifts` — their wrapper :func:`correct_motion`, and
:func:`crop_border` / :func:`shifts_at` on their results.
"""

from __future__ import annotations

import logging
import math

import dask.array as da
import numpy as np
import xarray as xr

from somaflow.errors import InputError, ParameterError
from somaflow.frames import check_movie, whole_frames
from somaflow.preprocess.motion.apply import _apply_block
from somaflow.preprocess.motion.geometry import _geometry, _spline_matrix
from somaflow.preprocess.motion.matching import _estimate_block
from somaflow.preprocess.motion.params import DEFAULT_MEMORY_BUDGET, SHIFT_CONVENTION, MotionParams

log = logging.getLogger(__name__)


def compute_template(movie: xr.DataArray, p: MotionParams) -> xr.DataArray:
    """Reference image for registration, refined from a subset of frames.

    ``min(p.template_frames, frames)`` evenly spaced frames are read (only those),
    averaged, registered to that mean, and re-averaged after registration,
    ``p.template_iterations`` times (the last round piecewise when
    ``p.mode == "piecewise"``). The registered frames are filled at the border
    with the nearest edge pixel whatever ``p.border`` says, so the template has
    no NaN.

    Parameters
    ----------
    movie : xarray.DataArray
        (frame, y, x), integer or float, numpy- or dask-backed.
    p : MotionParams
        Stage parameters.

    Returns
    -------
    xarray.DataArray
        (y, x) float32, numpy-backed, in the movie's units; ``y``/``x`` coordinates
        of ``movie`` kept. attrs: ``template_frames`` (frames used),
        ``template_iterations``.

    Raises
    ------
    InputError
        ``movie`` does not have dims (frame, y, x) or is not real-valued.
    """
    check_movie(movie, "motion correction", min_side=8)
    n_frames = int(movie.sizes["frame"])
    idx = np.unique(np.round(np.linspace(0, n_frames - 1, min(p.template_frames, n_frames))))
    idx = idx.astype(np.int64)
    data = movie.data
    subset = data[idx] if isinstance(data, da.Array) else da.from_array(np.asarray(data[idx]))
    # persisted once: on a distributed cluster the frames stay on the workers and every
    # template round refers to them (a few keys) instead of shipping them in its graph
    subset = subset.rechunk({0: 32, 1: -1, 2: -1}).persist()
    template = np.asarray(subset.mean(axis=0, dtype=np.float64).compute(), np.float32)
    frames = xr.DataArray(subset, dims=("frame", "y", "x"))
    iterations = p.template_iterations if p.mode != "none" else 0
    for it in range(iterations):
        mode = "piecewise" if (p.mode == "piecewise" and it == iterations - 1) else "rigid"
        p_it = p.model_copy(update={"mode": mode, "border": "nearest"})
        tmpl = xr.DataArray(template, dims=("y", "x"))
        shifts_ds = estimate_shifts(frames, tmpl, p_it).compute()
        new = apply_shifts(frames, shifts_ds, p_it).mean("frame", dtype=np.float64)
        new = np.asarray(new.values, dtype=np.float32)
        log.info(
            "template round %d/%d (%s, %d frames): mean |shift| %.2f px, template change %.3g",
            it + 1,
            iterations,
            mode,
            len(idx),
            float(np.abs(shifts_ds["shifts"].values).mean()),
            float(np.abs(new - template).mean() / (np.abs(template).mean() + 1e-12)),
        )
        template = new
    coords = {k: movie.coords[k] for k in ("y", "x") if k in movie.coords}
    return xr.DataArray(
        template,
        dims=("y", "x"),
        coords=coords,
        name="template",
        attrs={"template_frames": len(idx), "template_iterations": iterations},
    )


def estimate_shifts(movie: xr.DataArray, template: xr.DataArray, p: MotionParams) -> xr.Dataset:
    """Per-frame (and per-patch) shifts of a movie relative to a template, lazily.

    Each frame chunk is registered independently against the template (passed
    to every task as one small array) with ``dask.array.blockwise``, so memory
    depends on the chunk size, not on the movie length. See the module
    docstring for the method and the sign convention.

    Parameters
    ----------
    movie : xarray.DataArray
        (frame, y, x), integer or float, numpy- or dask-backed. Dask chunks are
        kept along frames and merged to whole frames; numpy input is cut into
        frame chunks planned from :data:`DEFAULT_MEMORY_BUDGET`.
    template : xarray.DataArray
        (y, x), same frame size, e.g. from :func:`compute_template`.
    p : MotionParams
        Stage parameters.

    Returns
    -------
    xarray.Dataset
        Dask-backed variables:

        ``shifts`` (frame, axis) float32
            rigid displacement (dy, dx) of each frame, px (axis = ["y", "x"]);
            in piecewise mode the whole-frame (rigid) part.
        ``correlation`` (frame) float32
            height of the whole-frame correlation peak, 1 = a perfect match.

        and in ``"piecewise"`` mode:

        ``patch_shifts`` (frame, patch_y, patch_x, axis) float32
            displacement (dy, dx) at each patch centre, px.
        ``patch_fallback`` (frame, patch_y, patch_x) bool
            True where the patch took the rigid shift (too little texture or
            too weak a peak).

        Coordinates ``patch_y`` / ``patch_x`` are the patch centres in pixel
        indices (float32). attrs: ``shift_convention``, ``motion_params``
        (JSON), ``frame_shape`` ([y, x]). In ``"none"`` mode the shifts are zero
        and the movie is not read.

    Raises
    ------
    InputError
        ``movie`` or ``template`` has the wrong dims or frame size.
    """
    check_movie(movie, "motion correction", min_side=8)
    if p.mode == "auto":
        raise ParameterError(
            "estimate_shifts needs a registration model; resolve motion.mode 'auto' first "
            "(resolve_mode(movie, p) gives the parameters and the template)."
        )
    ny, nx = int(movie.sizes["y"]), int(movie.sizes["x"])
    tmpl = _template_array(template, (ny, nx))
    data = whole_frames(movie, memory_budget=DEFAULT_MEMORY_BUDGET)
    n_frames = data.shape[0]
    geom = _geometry(p, (ny, nx))
    gy, gx = len(geom.centers[0]), len(geom.centers[1])
    if p.mode == "none":
        packed = da.zeros((n_frames, 3), dtype=np.float32, chunks=(data.chunks[0], 3))
    else:
        n_out = 3 + (3 * gy * gx if p.mode == "piecewise" else 0)
        packed = da.blockwise(
            _estimate_block,
            "tk",
            data,
            "tyx",
            da.from_array(tmpl, chunks=-1),
            "yx",
            new_axes={"k": n_out},
            concatenate=True,
            dtype=np.float32,
            meta=np.empty((0, 0), dtype=np.float32),
            p=p,
        )
    frame_coord = {"frame": movie.coords["frame"]} if "frame" in movie.coords else {}
    variables: dict[str, xr.DataArray] = {
        "shifts": xr.DataArray(
            packed[:, :2], dims=("frame", "axis"), coords={**frame_coord, "axis": ["y", "x"]}
        ),
        "correlation": xr.DataArray(packed[:, 2], dims=("frame",), coords=frame_coord),
    }
    if p.mode == "piecewise":
        patches = packed[:, 3:].reshape(n_frames, gy, gx, 3)
        pcoords = {**frame_coord, "patch_y": geom.centers[0], "patch_x": geom.centers[1]}
        variables["patch_shifts"] = xr.DataArray(
            patches[..., :2],
            dims=("frame", "patch_y", "patch_x", "axis"),
            coords={**pcoords, "axis": ["y", "x"]},
        )
        variables["patch_fallback"] = xr.DataArray(
            patches[..., 2] > 0.5, dims=("frame", "patch_y", "patch_x"), coords=pcoords
        )
    return xr.Dataset(
        variables,
        attrs={
            "shift_convention": SHIFT_CONVENTION,
            "motion_params": p.model_dump_json(),
            "frame_shape": [ny, nx],
        },
    )


def apply_shifts(movie: xr.DataArray, shifts_ds: xr.Dataset, p: MotionParams) -> xr.DataArray:
    """Register a movie with estimated shifts, lazily.

    Every frame is resampled at ``(y + dy(y, x), x + dx(y, x))`` (i.e. moved by
    ``-shift``): one ``(dy, dx)`` per frame in ``"rigid"`` mode
    (:func:`scipy.ndimage.shift`), a cubic-spline field through the patch
    centres in ``"piecewise"`` mode (:func:`scipy.ndimage.map_coordinates`),
    both with spline order ``p.interpolation_order`` and border fill ``p.border``.

    Parameters
    ----------
    movie : xarray.DataArray
        (frame, y, x), integer or float, numpy- or dask-backed.
    shifts_ds : xarray.Dataset
        From :func:`estimate_shifts` on this movie: ``shifts`` (frame, axis), and
        ``patch_shifts`` (frame, patch_y, patch_x, axis) with centre coordinates
        ``patch_y``/``patch_x`` for piecewise mode.
    p : MotionParams
        Stage parameters; ``p.mode`` picks the model applied (``"auto"``: the
        one ``shifts_ds`` holds; ``"none"`` only
        converts to float32).

    Returns
    -------
    xarray.DataArray
        (frame, y, x) float32, dask-backed, chunked along frames like the input;
        coordinates and attrs of ``movie`` kept.

    Raises
    ------
    InputError
        Wrong dims, or ``shifts_ds`` has another number of frames.
    ParameterError
        ``p.mode == "piecewise"`` but ``shifts_ds`` has no ``patch_shifts``.
    """
    check_movie(movie, "motion correction", min_side=8)
    data = whole_frames(movie, memory_budget=DEFAULT_MEMORY_BUDGET)
    n_frames, ny, nx = data.shape
    if p.mode == "none":
        out = data.astype(np.float32)
    else:
        if "shifts" not in shifts_ds or shifts_ds["shifts"].sizes.get("frame") != n_frames:
            raise InputError(
                f"shifts_ds must hold 'shifts' (frame, axis) for the movie's {n_frames} frames; "
                "estimate them on this movie with estimate_shifts."
            )
        tchunks = data.chunks[0]
        rigid = _dask_of(shifts_ds["shifts"].transpose("frame", "axis")).rechunk((tchunks, 2))
        rigid = rigid.astype(np.float32)
        # "auto": the model the shifts were estimated with (resolve_mode)
        if p.mode == "piecewise" or (p.mode == "auto" and "patch_shifts" in shifts_ds):
            if "patch_shifts" not in shifts_ds:
                raise ParameterError(
                    "mode='piecewise' needs per-patch shifts but shifts_ds has no 'patch_shifts'; "
                    "estimate them with a piecewise MotionParams, or apply with mode='rigid'."
                )
            ps = shifts_ds["patch_shifts"].transpose("frame", "patch_y", "patch_x", "axis")
            centers = (
                np.asarray(ps["patch_y"].values, dtype=np.float64),
                np.asarray(ps["patch_x"].values, dtype=np.float64),
            )
            patch = _dask_of(ps).astype(np.float32).rechunk((tchunks, -1, -1, 2))
            field: tuple = (patch, "tija")
            extra = {"centers": centers}
        else:
            field, extra = (), {}
        out = da.blockwise(_apply_block, "tyx", data, "tyx", rigid, "ta", *field, concatenate=True,
                           dtype=np.float32, meta=np.empty((0, 0, 0), dtype=np.float32), p=p, **extra)
    return xr.DataArray(
        out, dims=("frame", "y", "x"), coords=movie.coords, attrs=dict(movie.attrs), name=movie.name
    )


def crop_border(movie: xr.DataArray, shifts_ds: xr.Dataset) -> xr.DataArray:
    """Cut the margin that registration filled from outside the frame.

    ``ceil(max |dy|)`` rows are removed from the top and the bottom and
    ``ceil(max |dx|)`` columns from the left and the right, the maxima taken over
    all frames of ``shifts`` and, when present, ``patch_shifts``. The shifts are
    computed if lazy (they are small). Optional: a cropped movie no longer has
    the input movie's pixel grid, which the result schema's masks need, so the
    pipeline does not crop by default.

    Parameters
    ----------
    movie : xarray.DataArray
        (frame, y, x) registered movie, any dtype.
    shifts_ds : xarray.Dataset
        From :func:`estimate_shifts`.

    Returns
    -------
    xarray.DataArray
        (frame, y - 2 my, x - 2 mx), a lazy slice of ``movie``; attrs gain
        ``crop`` = [my, mx].

    Raises
    ------
    InputError
        The crop would leave no pixels.
    """
    check_movie(movie, "motion correction", min_side=8)
    parts = [np.abs(np.asarray(shifts_ds["shifts"].transpose(..., "axis").values)).reshape(-1, 2)]
    if "patch_shifts" in shifts_ds:
        ps = shifts_ds["patch_shifts"].transpose(..., "axis").values
        parts.append(np.abs(np.asarray(ps)).reshape(-1, 2))
    peak = np.max(np.concatenate(parts), axis=0) if parts[0].size else np.zeros(2)
    my, mx = (int(math.ceil(float(v) - 1e-6)) for v in peak)
    ny, nx = int(movie.sizes["y"]), int(movie.sizes["x"])
    if 2 * my >= ny or 2 * mx >= nx:
        raise InputError(
            f"cropping {my} px (y) and {mx} px (x) from each side of a {ny}x{nx} movie leaves "
            "nothing; the shifts are implausibly large, check the registration."
        )
    out = movie.isel(y=slice(my, ny - my), x=slice(mx, nx - mx))
    out.attrs = {**movie.attrs, "crop": [my, mx]}
    return out


def shifts_at(shifts_ds: xr.Dataset, y: np.ndarray, x: np.ndarray) -> xr.DataArray:
    """Displacement at arbitrary pixel positions, as :func:`apply_shifts` uses it.

    Parameters
    ----------
    shifts_ds : xarray.Dataset
        From :func:`estimate_shifts`. With ``patch_shifts`` the separable cubic
        spline through the patch centres is evaluated; otherwise the rigid shift.
    y, x : array_like
        1-D pixel coordinates (px, may be fractional) along each axis; the
        result is on their grid.

    Returns
    -------
    xarray.DataArray
        (frame, y, x, axis) float32 displacement (dy, dx) in px, computed (numpy).
    """
    yy = np.atleast_1d(np.asarray(y, dtype=np.float64))
    xx = np.atleast_1d(np.asarray(x, dtype=np.float64))
    if "patch_shifts" in shifts_ds:
        ps = shifts_ds["patch_shifts"].transpose("frame", "patch_y", "patch_x", "axis")
        my = _spline_matrix(np.asarray(ps["patch_y"].values, np.float64), yy)
        mx = _spline_matrix(np.asarray(ps["patch_x"].values, np.float64), xx)
        field = np.einsum("yi,tija,xj->tyxa", my, np.asarray(ps.values, np.float32), mx)
    else:
        rigid = np.asarray(shifts_ds["shifts"].transpose("frame", "axis").values, np.float32)
        field = np.broadcast_to(rigid[:, None, None, :], (len(rigid), len(yy), len(xx), 2))
    return xr.DataArray(
        np.ascontiguousarray(field, dtype=np.float32),
        dims=("frame", "y", "x", "axis"),
        coords={"y": yy, "x": xx, "axis": ["y", "x"]},
    )



def _template_array(template: xr.DataArray | np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if isinstance(template, xr.DataArray) and tuple(template.dims) != ("y", "x"):
        raise InputError(
            f"template must have dims ('y', 'x'), got {tuple(template.dims)}; use compute_template."
        )
    arr = np.asarray(template, dtype=np.float32)
    if arr.shape != shape:
        raise InputError(
            f"template is {arr.shape} but the movie's frames are {shape}; compute the template "
            "from this movie with compute_template."
        )
    if not np.all(np.isfinite(arr)):
        raise InputError("the motion-correction template holds NaN or infinite values: the movie has "
                         "NaN/inf pixels. Fix or drop the bad frames in the input and rerun.")
    return arr



def _dask_of(arr: xr.DataArray) -> da.Array:
    data = arr.data
    return data if isinstance(data, da.Array) else da.from_array(np.asarray(data), chunks=-1)

