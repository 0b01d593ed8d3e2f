"""Motion correction: rigid and piecewise-rigid (NoRMCorre-style) registration.

Three pure, lazy steps on ``(frame, y, x)`` movies, plus a convenience wrapper:

* :func:`compute_template` — a reference image refined iteratively from an
  evenly spaced subset of frames (only that subset is read);
* :func:`estimate_shifts` — per-frame rigid shifts and, in ``"piecewise"`` mode,
  per-patch shifts, computed frame chunk by frame chunk (memory does not grow
  with the movie length);
* :func:`apply_shifts` — the registered float32 movie, frame-chunked and lazy;
* :func:`correct_motion` wires the three; :func:`crop_border` optionally cuts the
  margin that motion leaves without data.

Sign convention
---------------
``shifts[t] = (dy, dx)`` is the displacement of the tissue in raw frame ``t``
relative to the template: ``frame_t(y, x) ≈ template(y - dy, x - dx)``. This is
the true motion as the simulator records it (:data:`somaflow.simulate.SHIFT_CONVENTION`).
Registering a frame samples it at ``(y + dy, x + dx)``, i.e. applies ``-shift``:
``scipy.ndimage.shift(frame, -shifts[t])`` for rigid motion. Per-patch shifts
follow the same convention at each patch centre; between centres the
displacement field is the spline through them (:func:`shifts_at`).

Method
------
*Matching.* For a frame spectrum ``F`` and a template spectrum ``T`` the
cross-power ``F·conj(T)`` is divided by its magnitude to the power
``whitening`` (1 = phase correlation, 0 = plain cross-correlation), multiplied
by the band-pass ``W(f) = exp(-2π²σs²|f|²) · (1 - exp(-2π²σh²|f|²))`` and
transformed back. The maximum of that correlation surface within the search
radius gives the integer shift; an upsampled DFT around it (Guizar-Sicairos et
al. 2008, as :func:`skimage.registration.phase_cross_correlation` with
``upsample_factor``) on a grid of ``1 / upsample_factor`` px, plus a parabola
through the grid maximum, gives the sub-pixel shift. ``σs`` (``smooth_sigma``)
suppresses pixel noise; ``σh`` (``highpass_sigma``) removes what subtracting a
Gaussian blur of that σ removes (CaImAn's ``gSig_filt`` idea), which 1p data
needs because out-of-focus background and vignetting would otherwise anchor
the match. Filtering in the frequency domain costs nothing extra: the band-pass
is a weight on the cross-power.

*Borders.* Circular correlation sees a jump where an image's opposite borders
differ; that jump does not move with the image and pulls the shift toward 0.
So frame and template are both tapered to 0 at their borders by a
raised-cosine ramp (``max_shift`` wide, between 1/8 and 1/4 of the side). A
taper fixed in the frame would itself bias the shift (toward 0 when both
images carry it, toward the texture under the ramp when only one does), so the
frame's taper follows the content: a first pass finds the shift with the taper
in place, a second pass repeats the match with the frame's taper moved by that
shift, where the two windowed images are the same content and their
correlation is symmetric about the true shift.

*Piecewise-rigid* (NoRMCorre-style). The frame is cut into overlapping
patches of ``patch_size`` px spaced about ``patch_size - patch_overlap`` apart
(the last ending at the frame's edge). Starting from the rigid shift, the frame
is warped with the current displacement field (bilinear, on the estimation
grid), each patch's residual shift against the same template patch (both
tapered in place, whitening ``patch_whitening``) is measured and added to the
field at its centre; three such rounds. Rounds matter: a patch measures the
displacement averaged over the patch, weighted by its texture, not the value
at its centre, and measuring the residual of an already registered patch
removes most of that error (and the taper's bias, which vanishes with the
residual). Then the whole field is refined jointly (Gauss-Newton /
Lucas-Kanade, ``refine_iterations`` steps): parameterised exactly as it is
applied (the spline through the patch-centre values), it minimises the squared
difference between the warped frame and the template over all pixels, both
high-passed (``refine_highpass``, no low-pass), with the template's gradient
as the Jacobian. This removes what is left of the patch-averaging bias (the
patch estimate flattens the field by ~10 % at central patches) and uses every
pixel with the right model; on the simulator's 2p-nonrigid preset it lowered
the per-patch error from ~0.28 to ~0.21 px. Patch deviations from the rigid shift are clipped to
``max_deviation``. A patch takes the rigid shift when the template
has little texture there (band-passed energy below ``min_patch_contrast`` ×
the median patch's) or when its correlation peak is below
``min_patch_correlation`` × the whole-frame peak. The field between patch
centres is a separable cubic B-spline through the centre values (quadratic /
linear for 3 / 2 patches per axis), as ``scipy.ndimage.zoom`` upsamples a grid,
with ``mode="nearest"`` beyond the outermost centres; it is applied with
:func:`scipy.ndimage.map_coordinates`. In this mode ``shifts`` is the spatial
mean of that field.

Estimation can run on a ``downsample`` × ``downsample`` binned copy (faster,
slightly less precise); shifts are always reported in full-resolution pixels
and applied to the full movie.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import dask.array as da
import numpy as np
import scipy.fft
import xarray as xr
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy import ndimage

from somaflow.errors import InputError, ParameterError
from somaflow.io.chunks import plan_frame_chunks

log = logging.getLogger(__name__)

#: sign convention of every shift this module returns
SHIFT_CONVENTION = (
    "shifts[t] = (dy, dx) is the displacement of the tissue in raw frame t relative to the "
    "template: frame_t(y, x) = template(y - dy, x - dx); registering applies -shifts[t] "
    "(scipy.ndimage.shift(frame_t, -shifts[t]))"
)

#: memory one task may use when a numpy-backed movie is split into frame chunks (bytes)
DEFAULT_MEMORY_BUDGET = 256 * 2**20

#: float32 working memory per inner batch of frames inside a block (bytes)
_BATCH_BYTES = 48 * 2**20

#: ``"auto"`` mode: consecutive frames per sampled run of :func:`nonrigid_deviation`
AUTO_RUN_FRAMES = 5

#: ``"auto"`` mode: standard errors below its estimate at which the deviation's covariance is read
AUTO_CONFIDENCE = 2.0

#: match-and-warp rounds of the piecewise estimate (see _patch_deviations)
_PATCH_ROUNDS = 3

#: relative Tikhonov damping of the whole-field refinement (see _refine_field)
_REFINE_RIDGE = 1e-3

_BORDER_MODES = {
    "nearest": ("nearest", 0.0),
    "reflect": ("reflect", 0.0),
    "zero": ("constant", 0.0),
    "nan": ("constant", float("nan")),
}


# ----------------------------------------------------------------------------- parameters
class MotionParams(BaseModel):
    """Parameters of motion correction.

    All lengths are in full-resolution pixels of the input movie.

    Attributes
    ----------
    mode : {"none", "rigid", "piecewise", "auto"}
        ``"none"`` skips registration (zero shifts, the movie passes through as
        float32); ``"rigid"`` estimates one shift per frame; ``"piecewise"`` adds
        per-patch shifts (NoRMCorre-style); ``"auto"`` registers piecewise only
        when the movie's non-rigid motion (:func:`nonrigid_deviation`) exceeds
        ``auto_threshold``, rigidly otherwise (:func:`resolve_mode`).
    auto_threshold : float
        ``"auto"`` mode: the non-rigid deviation (px) above which the movie is
        registered piecewise. On the simulator's tuning seeds 1100–1101 the
        rigid 2p presets (2p-small, 2p-lowsnr) measured 0–0.04 px, 2p-medium
        (0.6 px non-rigid field) 0.63 and 2p-nonrigid 1.14–1.22 (1.24 at 3000
        frames); Neurofinder 00 (real, little motion) 0.18; a movie of pure
        Gaussian noise 0.12.
    auto_frames : int
        ``"auto"`` mode: frames that measure it, in runs of
        ``AUTO_RUN_FRAMES`` consecutive frames evenly spaced over the movie.
    max_shift : float
        Largest rigid shift searched along each axis (px).
    upsample_factor : int
        Sub-pixel resolution: shifts are found in steps of ``1 / upsample_factor`` px.
    template_frames : int
        Frames, evenly spaced over the movie, that build the template.
    template_iterations : int
        Register-and-average rounds after the initial mean of those frames (0 = plain
        mean). In ``"piecewise"`` mode the last round registers piecewise.
    patch_size : int
        Side of the square patches (px), piecewise mode.
    patch_overlap : int
        Overlap of neighbouring patches (px), ``< patch_size``; patches are spaced
        about ``patch_size - patch_overlap`` apart and the last one ends at the edge.
    max_deviation : float
        Largest deviation of a patch shift from the frame's rigid shift (px).
    highpass_sigma : float
        σ (px) of the Gaussian blur whose content is removed before matching
        (a high-pass); 0 turns it off. Needed for 1p data.
    smooth_sigma : float
        σ (px) of the Gaussian low-pass applied before matching, against pixel noise.
    whitening : float
        The cross-power spectrum is divided by its magnitude to this power: 1 is
        pure phase correlation (every frequency counts the same), 0 plain
        cross-correlation (strong frequencies dominate). The default 0.6 was the
        most accurate on the simulator's 2p and 1p presets.
    patch_whitening : float
        The same for the patch matches. Patches hold fewer pixels, so noise
        matters more: on the 2p presets less whitening (0.3) was more accurate,
        on 1p (dominated by smooth background) 0.6.
    refine_iterations : int
        Piecewise mode: Gauss-Newton (Lucas-Kanade) steps that refine the whole
        spline field against the template over all pixels jointly, after the
        patch rounds (0 = off).
    refine_highpass : float
        σ (px) of the Gaussian blur subtracted from frame and template before
        that refinement (no low-pass). Slow intensity changes (cells firing,
        neuropil, background) bias a least-squares fit; edges carry the shift.
        0 turns it off.
    min_patch_contrast : float
        A patch whose band-passed template energy is below this fraction of the
        median patch's always takes the rigid shift.
    min_patch_correlation : float
        A patch whose correlation peak in a frame is below this fraction of the
        frame's whole-image peak takes the rigid shift in that frame (with less
        whitening, patch peaks normally exceed the frame's; a patch that lost its
        signal drops to ~0.1 of it).
    downsample : int
        Estimate on ``downsample`` × ``downsample`` binned frames (1 = full resolution).
    interpolation_order : {1, 3}
        Spline order when the shifts are applied (1 bilinear, 3 cubic).
    border : {"nearest", "reflect", "zero", "nan"}
        Value of pixels that the shift moves in from outside the frame: the
        nearest edge pixel, a mirror image, 0, or NaN (to mask them later).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: Literal["none", "rigid", "piecewise", "auto"] = Field("rigid", description="registration model")
    auto_threshold: float = Field(0.4, gt=0, description="auto mode: piecewise above this non-rigid deviation (px)")
    auto_frames: int = Field(200, ge=10, description="auto mode: frames that measure the non-rigid deviation")
    max_shift: float = Field(10.0, gt=0, description="largest rigid shift per axis (px)")
    upsample_factor: int = Field(10, ge=1, le=1000, description="sub-pixel steps per px")
    template_frames: int = Field(300, ge=1, description="frames that build the template")
    template_iterations: int = Field(3, ge=0, le=20, description="template refinement rounds")
    patch_size: int = Field(64, ge=8, description="patch side (px), piecewise mode")
    patch_overlap: int = Field(16, ge=0, description="overlap of neighbouring patches (px)")
    max_deviation: float = Field(3.0, gt=0, description="largest patch deviation from rigid (px)")
    highpass_sigma: float = Field(0.0, ge=0, description="high-pass Gaussian sigma (px); 0 = off")
    smooth_sigma: float = Field(1.0, ge=0, description="low-pass Gaussian sigma (px); 0 = off")
    whitening: float = Field(
        0.6, ge=0, le=1, description="cross-power divided by |cross-power|**whitening"
    )
    patch_whitening: float = Field(
        0.3, ge=0, le=1, description="whitening exponent of the patch matches"
    )
    refine_iterations: int = Field(
        2, ge=0, le=10, description="whole-field Gauss-Newton steps after the patch rounds"
    )
    refine_highpass: float = Field(
        4.0, ge=0, description="high-pass Gaussian sigma of the whole-field refinement (px)"
    )
    min_patch_contrast: float = Field(0.1, ge=0, le=1, description="patch texture floor")
    min_patch_correlation: float = Field(0.5, ge=0, le=1, description="patch peak floor")
    downsample: int = Field(1, ge=1, le=8, description="binning factor for estimation")
    interpolation_order: Literal[1, 3] = Field(3, description="spline order when applying")
    border: Literal["nearest", "reflect", "zero", "nan"] = Field(
        "nearest", description="fill of pixels shifted in from outside the frame"
    )

    @model_validator(mode="after")
    def _check_patches(self) -> MotionParams:
        if self.patch_overlap >= self.patch_size:
            raise ValueError(
                f"patch_overlap ({self.patch_overlap}) must be smaller than patch_size "
                f"({self.patch_size}); e.g. patch_overlap = patch_size // 4."
            )
        if self.mode in ("piecewise", "auto") and self.patch_size < 4 * self.max_deviation:
            raise ValueError(
                f"patch_size ({self.patch_size}) must be at least 4 x max_deviation "
                f"({self.max_deviation}) so a patch can hold the deviation it searches; "
                "enlarge patch_size or reduce max_deviation."
            )
        if self.patch_size // self.downsample < 8:
            raise ValueError(
                f"patch_size / downsample = {self.patch_size}/{self.downsample} leaves patches "
                "under 8 px; enlarge patch_size or reduce downsample."
            )
        return self

    @classmethod
    def for_movie(
        cls,
        fps: float,
        modality: str,
        neuron_radius: float,
        shape: tuple[int, ...],
        **overrides: object,
    ) -> MotionParams:
        """Defaults for a movie.

        Parameters
        ----------
        fps : float
            Frame rate (Hz); accepted for a uniform API (the defaults do not depend on it).
        modality : {"2p", "1p"}
            Imaging modality.
        neuron_radius : float
            Typical soma radius ``r`` (px), > 0.
        shape : tuple of int
            ``(frame, y, x)`` or ``(y, x)``.
        **overrides
            Field values replacing the derived ones.

        Returns
        -------
        MotionParams
            ``mode="piecewise"`` for 2p, ``"rigid"`` for 1p (as CaImAn's CNMF-E
            pipeline: after the high-pass, a 1p patch holds little texture and its
            shift is noisy; piecewise 1p registration is available by override,
            with ``patch_whitening`` = 0.6 rather than 2p's 0.3); ``max_shift`` = max(6, 8 % of the smaller side);
            ``patch_size`` = max(12 r, smaller side / 4) rounded up to a multiple of 8 and
            at most the smaller side, ``patch_overlap`` = a quarter of it (NoRMCorre
            uses a third; on the simulator a quarter was more accurate than a half,
            and cheaper); ``max_deviation``
            = max(3, 0.75 r); ``highpass_sigma`` = 2 r for 1p (removes the
            out-of-focus background, as CaImAn's ``gSig_filt``), 0 for 2p;
            ``refine_highpass`` = 0.75 r (on the simulator's non-rigid 2p and 1p
            presets 0.6-0.8 r was best, 2 r or no high-pass much worse); the
            other fields keep their defaults.

        Raises
        ------
        ParameterError
            Unknown modality, a non-positive radius or a bad shape.
        """
        if modality not in ("2p", "1p"):
            raise ParameterError(f"modality must be '2p' or '1p', got {modality!r}.")
        if not neuron_radius > 0:
            raise ParameterError(
                f"neuron_radius must be positive (px), got {neuron_radius!r}; give the typical "
                "soma radius in pixels."
            )
        if len(shape) not in (2, 3) or any(int(n) <= 0 for n in shape):
            raise ParameterError(f"shape must be (frame, y, x) or (y, x) > 0, got {shape!r}.")
        ny, nx = int(shape[-2]), int(shape[-1])
        side = min(ny, nx)
        r = float(neuron_radius)
        patch = int(8 * math.ceil(max(12 * r, side / 4) / 8))
        patch = max(min(patch, side), 8)
        one_photon = modality == "1p"
        values: dict[str, object] = {
            "mode": "rigid" if one_photon else "piecewise",
            "max_shift": float(max(6, round(0.08 * side))),
            "patch_size": patch,
            "patch_overlap": patch // 4,
            "max_deviation": round(max(3.0, 0.75 * r), 2),
            "highpass_sigma": round(2.0 * r, 2) if one_photon else 0.0,
            "patch_whitening": 0.6 if one_photon else 0.3,
            "refine_highpass": round(0.75 * r, 2),
        }
        values["max_deviation"] = min(float(values["max_deviation"]), patch / 4)
        values.update(overrides)
        try:
            return cls(**values)
        except ValueError as exc:
            raise ParameterError(f"invalid motion parameters: {exc}") from exc


# ----------------------------------------------------------------------------- public API
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
    _validate(movie)
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
    _validate(movie)
    if p.mode == "auto":
        raise ParameterError(
            "estimate_shifts needs a registration model; resolve motion.mode 'auto' first "
            "(resolve_mode(movie, p) gives the parameters and the template)."
        )
    ny, nx = int(movie.sizes["y"]), int(movie.sizes["x"])
    tmpl = _template_array(template, (ny, nx))
    data = _frame_chunked(movie)
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
    _validate(movie)
    data = _frame_chunked(movie)
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
            out = da.blockwise(
                _apply_block,
                "tyx",
                data,
                "tyx",
                rigid,
                "ta",
                patch,
                "tija",
                concatenate=True,
                dtype=np.float32,
                meta=np.empty((0, 0, 0), dtype=np.float32),
                p=p,
                centers=centers,
            )
        else:
            out = da.blockwise(
                _apply_block,
                "tyx",
                data,
                "tyx",
                rigid,
                "ta",
                concatenate=True,
                dtype=np.float32,
                meta=np.empty((0, 0, 0), dtype=np.float32),
                p=p,
            )
    return xr.DataArray(
        out, dims=("frame", "y", "x"), coords=movie.coords, attrs=dict(movie.attrs), name=movie.name
    )


def nonrigid_deviation(movie: xr.DataArray, template: xr.DataArray, p: MotionParams) -> float:
    """How far a movie's motion is from rigid: RMS of its persistent patch deviations (px).

    ``p.auto_frames`` frames, in runs of ``AUTO_RUN_FRAMES`` consecutive frames
    evenly spaced over the movie, are registered piecewise against
    ``template`` (patch matches, without the whole-field refinement). Each
    patch's shift has the frame's mean over its patches removed (a common
    shift is rigid motion, or the rigid match's own error), then its median
    over the sampled frames (the template's own geometry). The
    measure is the square root of the deviations' lag-one autocovariance:
    the mean over consecutive frame pairs of a run, and over patches that
    found a match in both (not ``patch_fallback``), of the dot product of
    the two frames' deviations. A deformation persists from one frame to the
    next and enters at its full RMS; a patch's matching error is independent
    from frame to frame and averages out, so a motionless movie, a rigid one
    or one without structure (pure noise) measures near 0 whatever its
    noise. The covariance is read ``AUTO_CONFIDENCE`` standard errors below
    its estimate (the runs' means are its independent samples), so a movie
    whose matches are mostly error (pure noise: several px each) does not
    measure a deformation by chance. A deformation that changes completely
    between consecutive frames is not seen (and piecewise registration could
    not follow it either). 0 when no pair of matches exists.

    Parameters
    ----------
    movie : xarray.DataArray
        (frame, y, x), integer or float, numpy- or dask-backed.
    template : xarray.DataArray
        (y, x), e.g. the rigid :func:`compute_template`.
    p : MotionParams
        Stage parameters; the patch geometry and ``auto_frames`` are read.

    Returns
    -------
    float
        Deviation in pixels.
    """
    n = int(movie.sizes["frame"])
    run = min(AUTO_RUN_FRAMES, n)
    n_runs = max(1, min(p.auto_frames, n) // run)
    starts = np.unique(np.round(np.linspace(0, n - run, n_runs)).astype(np.int64))
    idx = (starts[:, None] + np.arange(run)[None, :]).ravel()
    # the patch matches alone: the whole-field refinement costs as much again and barely moves them
    # (0.84 against 0.86 px on a 512x512 2p-large movie, in 14 s instead of 23 s on 2 cores)
    check = p.model_copy(update={"mode": "piecewise", "refine_iterations": 0})
    ds = estimate_shifts(movie.isel(frame=idx), template, check).compute()
    dev = ds["patch_shifts"].values.astype(np.float64) - ds["shifts"].values[:, None, None, :]
    ok = ~ds["patch_fallback"].values
    if not ok.any():
        return 0.0
    dev = np.where(ok[..., None], dev, np.nan)
    with warnings.catch_warnings():  # a frame or patch without matches stays NaN and is left out below
        warnings.simplefilter("ignore", RuntimeWarning)
        # the frame's common part is a rigid shift (or the rigid match's own error), not a deformation
        dev = dev - np.nanmean(dev, axis=(1, 2), keepdims=True)
        dev = dev - np.nanmedian(dev, axis=0, keepdims=True)
    dev = dev.reshape(len(starts), run, *dev.shape[1:])
    ok = ok.reshape(len(starts), run, *ok.shape[1:])
    pair = ok[:, :-1] & ok[:, 1:]
    if not pair.any():
        return 0.0
    prod = np.where(pair, (dev[:, :-1] * dev[:, 1:]).sum(-1), 0.0)
    per_run = pair.reshape(len(pair), -1).sum(1)
    runs = per_run > 0
    cov = float(prod.sum() / per_run.sum())
    # runs lie far apart: their means are independent samples of the covariance
    run_cov = prod.reshape(len(prod), -1).sum(1)[runs] / per_run[runs]
    se = float(run_cov.std(ddof=1) / math.sqrt(runs.sum())) if runs.sum() > 1 else 0.0
    return float(np.sqrt(max(cov - AUTO_CONFIDENCE * se, 0.0)))


def resolve_mode(movie: xr.DataArray, p: MotionParams) -> tuple[MotionParams, xr.DataArray]:
    """The registration model a movie gets, and its template.

    For ``p.mode`` other than ``"auto"``: ``p`` and :func:`compute_template`.
    For ``"auto"``: the rigid template, then :func:`nonrigid_deviation`
    against it; above ``p.auto_threshold`` the parameters become
    ``"piecewise"`` and the template is recomputed as piecewise mode builds
    it, otherwise they become ``"rigid"`` and the template is kept. The
    template's attrs record ``nonrigid_deviation`` (px) and ``motion_mode``.

    Returns
    -------
    params : MotionParams
        ``p`` with ``mode`` resolved (never ``"auto"``).
    template : xarray.DataArray
        (y, x) float32, as :func:`compute_template` returns.
    """
    if p.mode != "auto":
        return p, compute_template(movie, p)
    rigid = p.model_copy(update={"mode": "rigid"})
    template = compute_template(movie, rigid)
    deviation = nonrigid_deviation(movie, template, rigid)
    chosen = rigid
    if deviation > p.auto_threshold:
        chosen = p.model_copy(update={"mode": "piecewise"})
        template = compute_template(movie, chosen)
    log.info("motion mode auto: non-rigid deviation %.2f px (threshold %.2f) -> %s",
             deviation, p.auto_threshold, chosen.mode)
    template.attrs.update(nonrigid_deviation=deviation, motion_mode=chosen.mode)
    return chosen, template


def registration_model(shifts_ds: xr.Dataset, default: str) -> dict[str, Any]:
    """The model a shifts dataset was estimated with (``"auto"`` resolved).

    Parameters
    ----------
    shifts_ds : xarray.Dataset
        :func:`estimate_shifts`' output (its ``motion_params`` attr), as stored.
    default : str
        The mode to report when the dataset does not record one (``"none"``).

    Returns
    -------
    dict
        ``{"mode": ...}``, plus ``"nonrigid_deviation"`` (px, 3 decimals) where
        ``auto`` measured it (a ``nonrigid_deviation`` attr).
    """
    out: dict[str, Any] = {"mode": default}
    if "motion_params" in shifts_ds.attrs:
        out["mode"] = json.loads(shifts_ds.attrs["motion_params"]).get("mode", default)
    if "nonrigid_deviation" in shifts_ds.attrs:
        out["nonrigid_deviation"] = round(float(shifts_ds.attrs["nonrigid_deviation"]), 3)
    return out


def correct_motion(movie: xr.DataArray, p: MotionParams) -> tuple[xr.DataArray, xr.Dataset]:
    """Template, shifts and registered movie in one call.

    The template is computed now (it reads ``p.template_frames`` frames); the
    shifts and the registered movie are lazy and share their graph, so
    computing both together (``dask.compute(corrected, shifts_ds)``, or writing
    the corrected movie after ``shifts_ds = shifts_ds.persist()``) reads every
    frame chunk once.

    Parameters
    ----------
    movie : xarray.DataArray
        (frame, y, x), integer or float, numpy- or dask-backed.
    p : MotionParams
        Stage parameters.

    Returns
    -------
    corrected : xarray.DataArray
        (frame, y, x) float32, lazy; see :func:`apply_shifts`.
    shifts_ds : xarray.Dataset
        See :func:`estimate_shifts`; the template is added as ``template`` (y, x) float32.
    """
    p, template = resolve_mode(movie, p)
    shifts_ds = estimate_shifts(movie, template, p)
    corrected = apply_shifts(movie, shifts_ds, p)
    shifts_ds["template"] = template.drop_vars([c for c in template.coords if c not in ("y", "x")])
    return corrected, shifts_ds


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
    _validate(movie)
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


# ----------------------------------------------------------------------------- validation
def _validate(movie: xr.DataArray) -> None:
    if tuple(movie.dims) != ("frame", "y", "x"):
        raise InputError(
            f"motion correction needs a movie with dims ('frame', 'y', 'x'), got {tuple(movie.dims)}. "
            "Transpose or rename it (movie.transpose('frame', 'y', 'x'))."
        )
    if not (np.issubdtype(movie.dtype, np.integer) or np.issubdtype(movie.dtype, np.floating)):
        raise InputError(f"movie dtype {movie.dtype} is not a real number type; convert it to float32.")
    if movie.sizes["frame"] < 1 or movie.sizes["y"] < 8 or movie.sizes["x"] < 8:
        raise InputError(
            f"motion correction needs at least 1 frame of at least 8x8 px, got {dict(movie.sizes)}."
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
        raise InputError("template holds NaN or inf; compute it with compute_template.")
    return arr


def _frame_chunked(movie: xr.DataArray) -> da.Array:
    """The movie as a dask array of whole frames (frame chunks kept or planned)."""
    data = movie.data
    if not isinstance(data, da.Array):
        arr = np.asarray(data)
        n = plan_frame_chunks(arr.shape, 4, DEFAULT_MEMORY_BUDGET)
        return da.from_array(arr, chunks=(n, -1, -1))
    if data.numblocks[1] != 1 or data.numblocks[2] != 1:
        data = data.rechunk({1: -1, 2: -1})
    return data


def _dask_of(arr: xr.DataArray) -> da.Array:
    data = arr.data
    return data if isinstance(data, da.Array) else da.from_array(np.asarray(data), chunks=-1)


# ----------------------------------------------------------------------------- geometry
@dataclass(frozen=True, eq=False)
class _Geometry:
    """Everything about the matching that depends only on the parameters and frame size.

    Lengths are in prepared (binned) pixels unless the name says otherwise.
    """

    k: int  # binning factor
    pshape: tuple[int, int]  # binned frame shape
    max_shift: float  # largest rigid shift
    radius: int  # coarse rigid search radius
    ramp: tuple[int, int]  # width of the frame's border taper along y, x
    patch_ramp: tuple[int, int]  # width of the patches' border taper along y, x
    weight: np.ndarray  # (Yp, Xp//2+1) float32, band-pass on the rfft2 grid
    patch: tuple[int, int]  # patch shape
    starts: tuple[np.ndarray, np.ndarray]  # patch start rows / columns
    centers: tuple[np.ndarray, np.ndarray]  # patch centres, full-resolution px (float32)
    patch_weight: np.ndarray  # (Py, Px//2+1) float32
    interp: tuple[np.ndarray, np.ndarray]  # (Yp, gy), (Xp, gx) spline weights, binned grid
    max_dev: float  # largest patch deviation from rigid
    dev_radius: int  # coarse patch search radius around the rigid shift


def _geometry(p: MotionParams, shape: tuple[int, int]) -> _Geometry:
    return _geometry_cached(p, (int(shape[0]), int(shape[1])))


@functools.lru_cache(maxsize=16)
def _geometry_cached(p: MotionParams, shape: tuple[int, int]) -> _Geometry:
    k = p.downsample
    yp, xp = shape[0] // k, shape[1] // k
    if min(yp, xp) < 8:
        raise ParameterError(
            f"frames of {shape[0]}x{shape[1]} px binned by downsample={k} leave fewer than 8 px; "
            "reduce downsample."
        )
    max_shift = p.max_shift / k
    radius = int(min(math.ceil(max_shift), (yp - 1) // 2, (xp - 1) // 2))
    ramp = (_ramp_width(yp, max_shift), _ramp_width(xp, max_shift))
    weight = _bandpass((yp, xp), p.smooth_sigma / k, p.highpass_sigma / k)

    py, px = min(p.patch_size // k, yp), min(p.patch_size // k, xp)
    patch_ramp = (_ramp_width(py, 0), _ramp_width(px, 0))
    stride = max(1, (p.patch_size - p.patch_overlap) // k)
    starts = (_patch_starts(yp, py, stride), _patch_starts(xp, px, stride))
    centers = tuple(
        (k * (s + (n - 1) / 2.0) + (k - 1) / 2.0).astype(np.float32)
        for s, n in zip(starts, (py, px), strict=True)
    )
    max_dev = p.max_deviation / k
    dev_radius = int(min(math.ceil(max_dev) + 1, (py - 1) // 2, (px - 1) // 2))
    patch_weight = _bandpass((py, px), p.smooth_sigma / k, p.highpass_sigma / k)
    interp = tuple(
        _spline_matrix(st + (n - 1) / 2.0, np.arange(length, dtype=np.float64))
        for st, n, length in zip(starts, (py, px), (yp, xp), strict=True)
    )
    return _Geometry(
        interp=interp,  # type: ignore[arg-type]
        k=k,
        pshape=(yp, xp),
        max_shift=max_shift,
        radius=radius,
        ramp=ramp,
        patch_ramp=patch_ramp,
        weight=weight,
        patch=(py, px),
        starts=starts,
        centers=centers,  # type: ignore[arg-type]
        patch_weight=patch_weight,
        max_dev=max_dev,
        dev_radius=dev_radius,
    )


def _patch_starts(length: int, size: int, stride: int) -> np.ndarray:
    """Start of each patch along one axis: evenly spread, the last one ending at the edge."""
    n = int(math.ceil((length - size) / stride)) + 1
    return np.round(np.linspace(0, length - size, n)).astype(np.int64)


def _ramp_width(n: int, width: float) -> int:
    """Taper ramp (px): ``width`` but at least an eighth and at most a quarter of the axis."""
    return int(max(1, min(max(math.ceil(width), n // 8), n // 4)))


def _taper(n: int, ramp: int, shift: np.ndarray) -> np.ndarray:
    """Border tapers along one axis, each moved by a (sub-pixel) shift.

    A raised-cosine ramp from 0 to 1 over ``ramp`` px at both ends of an axis of
    ``n`` px, evaluated at ``x - shift`` so it moves with the frame content
    (outside the moved axis it is 0).

    Returns
    -------
    ndarray, (len(shift), n) float32
    """
    u = np.arange(n)[None, :] - np.asarray(shift, dtype=np.float64)[:, None] + 0.5

    def rise(v: np.ndarray) -> np.ndarray:
        return 0.5 - 0.5 * np.cos(np.pi * np.clip(v / ramp, 0.0, 1.0))

    return (rise(u) * rise(n - u)).astype(np.float32)


def _taper2d(shape: tuple[int, int], ramp: tuple[int, int]) -> np.ndarray:
    """The border taper in place (shift 0), (Y, X) float32."""
    wy = _taper(shape[0], ramp[0], np.zeros(1))[0]
    wx = _taper(shape[1], ramp[1], np.zeros(1))[0]
    return np.outer(wy, wx)


def _bandpass(shape: tuple[int, int], smooth: float, highpass: float) -> np.ndarray:
    """Band-pass on the rfft2 grid (DC removed), float32."""
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.rfftfreq(shape[1])[None, :]
    f2 = fy**2 + fx**2
    w = np.exp(-2 * np.pi**2 * smooth**2 * f2)
    if highpass > 0:
        w = w * (1 - np.exp(-2 * np.pi**2 * highpass**2 * f2))
    w[0, 0] = 0.0
    return w.astype(np.float32)


def _multiplicity(nx: int) -> np.ndarray:
    """How often each rfft column appears in the full spectrum (1 for DC and Nyquist, else 2)."""
    mult = np.full(nx // 2 + 1, 2.0)
    mult[0] = 1.0
    if nx % 2 == 0:
        mult[-1] = 1.0
    return mult


def _spline_matrix(centers: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Interpolation weights (len(pos), len(centers)) from patch centres to positions.

    The patch-shift grid is upsampled as by ``scipy.ndimage.zoom``: a cubic
    B-spline (quadratic / linear with 3 / 2 centres, constant with 1) through
    the values at the centres, extended beyond the outermost centres with
    ``mode="nearest"`` (the grid is padded with its edge values, so the field
    levels off within about one patch spacing). Positions map to grid
    coordinates piecewise linearly between centres and linearly beyond them.
    Rows sum to 1 (a constant field stays constant).
    """
    g = len(centers)
    pos = np.asarray(pos, dtype=np.float64)
    if g == 1:
        return np.ones((len(pos), 1), dtype=np.float32)
    grid = np.arange(g, dtype=np.float64)
    u = np.interp(pos, centers, grid)
    lo, hi = pos < centers[0], pos > centers[-1]
    u[lo] = (pos[lo] - centers[0]) / (centers[1] - centers[0])
    u[hi] = g - 1 + (pos[hi] - centers[-1]) / (centers[-1] - centers[-2])
    order = min(3, g - 1)
    eye = np.eye(g)
    m = np.stack(
        [ndimage.map_coordinates(eye[j], u[None], order=order, mode="nearest") for j in range(g)],
        axis=1,
    )
    return (m / m.sum(axis=1, keepdims=True)).astype(np.float32)


# ----------------------------------------------------------------------------- estimation
def _estimate_block(block: np.ndarray, template: np.ndarray, *, p: MotionParams) -> np.ndarray:
    """``blockwise`` kernel: packed shifts of one frame chunk, see :func:`_estimate_frames`."""
    return _estimate_frames(block, template, p)


def _estimate_frames(frames: np.ndarray, template: np.ndarray, p: MotionParams) -> np.ndarray:
    """Register frames to a template.

    Parameters
    ----------
    frames : ndarray, (n, Y, X) real
    template : ndarray, (Y, X) real
    p : MotionParams
        ``mode`` is ``"rigid"`` or ``"piecewise"``.

    Returns
    -------
    ndarray, (n, 3) or (n, 3 + 3 gy gx) float32
        Per frame: rigid (dy, dx) px (piecewise: the field's spatial mean),
        whole-frame peak height, then for every patch (row-major) its (dy, dx)
        px and a fallback flag (1.0 = rigid used).
    """
    geom = _geometry(p, frames.shape[1:])
    tmpl = _bin(np.asarray(template, dtype=np.float32)[None], geom.k)[0]
    tmpl -= tmpl.mean()
    tspec = np.conj(scipy.fft.rfft2(tmpl * _taper2d(geom.pshape, geom.ramp)))
    piecewise = p.mode == "piecewise"
    if piecewise:
        tpatch = _patches(tmpl[None], geom)[0]
        tpatch -= tpatch.mean(axis=(-2, -1), keepdims=True)
        tpatch_spec = np.conj(scipy.fft.rfft2(tpatch * _taper2d(geom.patch, geom.patch_ramp)))
        energy = np.einsum("ijyx,yx->ij", np.abs(tpatch_spec) ** 2, geom.patch_weight)
        flat = energy < p.min_patch_contrast * np.median(energy)
        refine = _refine_reference(tmpl, p, geom) if p.refine_iterations else None
    gy, gx = len(geom.starts[0]), len(geom.starts[1])
    n_frames = frames.shape[0]
    out = np.zeros((n_frames, 3 + (3 * gy * gx if piecewise else 0)), dtype=np.float32)
    yp, xp = geom.pshape
    overlap = (gy * geom.patch[0] * gx * geom.patch[1]) / (yp * xp) if piecewise else 0.0
    refine_arrays = 8 if (piecewise and p.refine_iterations) else 0
    per_frame = yp * xp * 4 * (6 + 3 * overlap + refine_arrays) * geom.k**2
    batch = max(1, int(_BATCH_BYTES // per_frame))
    for b0 in range(0, n_frames, batch):
        sl = slice(b0, min(b0 + batch, n_frames))
        fb = _bin(np.asarray(frames[sl], dtype=np.float32), geom.k)
        fb -= fb.mean(axis=(1, 2), keepdims=True)
        n = fb.shape[0]
        rigid, peak = _match(
            fb,
            tspec,
            geom.weight,
            geom.ramp,
            np.zeros((n, 2)),
            geom.radius,
            p.upsample_factor,
            p.whitening,
            follow=True,
        )
        rigid = np.clip(rigid, -geom.max_shift, geom.max_shift)
        out[sl, :2] = rigid * geom.k
        out[sl, 2] = peak
        if not piecewise:
            continue
        dev, ppeak = _patch_deviations(fb, tpatch_spec, rigid, geom, p)
        fallback = flat[None] | (ppeak < p.min_patch_correlation * peak[:, None, None])
        dev[fallback] = 0.0
        if refine is not None:
            dev = _refine_field(fb, rigid, dev, fallback, refine, geom, p.refine_iterations)
        total = rigid[:, None, None, :] + dev
        # the rigid part of a piecewise estimate is the spatial mean of its field
        out[sl, :2] = geom.k * np.einsum("nijc,i,j->nc", total, *(m.mean(axis=0) for m in geom.interp))
        packed = np.concatenate([total * geom.k, fallback[..., None].astype(np.float64)], axis=-1)
        out[sl, 3:] = packed.reshape(n, -1)
    return out


def _match(
    images: np.ndarray,
    tconj: np.ndarray,
    weight: np.ndarray,
    ramp: tuple[int, int],
    guess: np.ndarray,
    radius: int,
    upsample_factor: int,
    whitening: float,
    follow: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Shift of each image relative to its template, within ``radius`` of a guess.

    The templates are expected tapered with the same border taper at shift 0.
    Each image's taper is placed at the guess; with ``follow`` a second pass
    repeats the match with the taper moved by the first estimate, so that both
    tapers sit on the same content and the windowed correlation is symmetric
    about the true shift (a taper fixed in the frame biases the shift toward
    the guess).

    Parameters
    ----------
    images : ndarray, (..., H, W) float32
        Mean-subtracted images.
    tconj : ndarray, complex, broadcastable to (..., H, W//2+1)
        Conjugate spectra of the tapered templates.
    weight : ndarray, (H, W//2+1) float32
        Band-pass.
    ramp : (int, int)
        Taper widths along each axis.
    guess : ndarray, (..., 2) float
        Expected shifts (px).
    radius : int
        Integer search radius around the rounded guess in the first pass.
    upsample_factor : int
        Sub-pixel steps per pixel.
    whitening : float
        Exponent of the cross-power normalisation, see :func:`_whiten`.
    follow : bool
        Run the second pass with the taper moved by the first estimate.

    Returns
    -------
    shifts : ndarray, (..., 2) float64
    peak : ndarray, (...) float64
        Normalised correlation peak, see :func:`_refine_peak`.
    """
    lead, shape = images.shape[:-2], images.shape[-2:]
    est = np.asarray(guess, dtype=np.float64).reshape(-1, 2)
    centre = np.round(est).astype(np.int64)
    passes = (min(upsample_factor, 4), upsample_factor) if follow else (upsample_factor,)
    for upsample in passes:
        wy = _taper(shape[0], ramp[0], est[:, 0]).reshape(*lead, shape[0], 1)
        wx = _taper(shape[1], ramp[1], est[:, 1]).reshape(*lead, 1, shape[1])
        rw = _whiten(scipy.fft.rfft2(images * wy * wx) * tconj, weight, whitening)
        rw = rw.reshape(-1, *rw.shape[-2:])
        coarse = _coarse_peak(rw, shape, centre, radius)
        est, peak = _refine_peak(rw, shape, coarse, upsample)
        centre, radius = np.round(est).astype(np.int64), 1
        del rw
    return est.reshape(*lead, 2), peak.reshape(lead)


def _bin(frames: np.ndarray, k: int) -> np.ndarray:
    """Mean over k x k pixel blocks, (n, Y, X) -> (n, Y // k, X // k) float32 (a copy)."""
    if k == 1:
        return np.array(frames, dtype=np.float32, copy=True)
    n, ny, nx = frames.shape
    yk, xk = ny // k, nx // k
    cut = frames[:, : yk * k, : xk * k].reshape(n, yk, k, xk, k)
    return cut.mean(axis=(2, 4), dtype=np.float32)


def _patches(frames: np.ndarray, geom: _Geometry) -> np.ndarray:
    """All patches of each frame, (n, Y, X) -> (n, gy, gx, Py, Px) float32 (a copy)."""
    (sy, sx), (py, px) = geom.starts, geom.patch
    rows = sy[:, None] + np.arange(py)  # (gy, py)
    cols = sx[:, None] + np.arange(px)  # (gx, px)
    return frames[:, rows[:, None, :, None], cols[None, :, None, :]]


def _patch_deviations(
    frames: np.ndarray,
    tpatch_spec: np.ndarray,
    rigid: np.ndarray,
    geom: _Geometry,
    p: MotionParams,
) -> tuple[np.ndarray, np.ndarray]:
    """Deviation of every patch's shift from the rigid shift, refined by warping.

    A patch match measures the displacement averaged over the patch, weighted by
    its texture; where the field varies within a patch that is not the value at
    the centre (it flattens the field by ~20 % for fields that vary over a few
    patches). So the estimate is refined: the frame is warped with the current
    field (bilinear, on the binned grid), the residual displacement of every
    patch is measured and added, :data:`_PATCH_ROUNDS` times; the residual
    shrinks each round, and with it the averaging error.

    Parameters
    ----------
    frames : ndarray, (n, Yp, Xp) float32
        Binned, mean-subtracted frames.
    tpatch_spec : ndarray, (gy, gx, Py, Px//2+1) complex
        Conjugate spectra of the template's tapered patches.
    rigid : ndarray, (n, 2)
        Rigid shifts (binned px).
    geom, p
        Geometry and parameters.

    Returns
    -------
    dev : ndarray, (n, gy, gx, 2) float64
        Deviation from ``rigid`` at each patch centre (binned px), clipped to
        ``max_deviation``.
    peak : ndarray, (n, gy, gx) float64
        Normalised correlation peak of each patch in the last round.
    """
    n = frames.shape[0]
    gy, gx = len(geom.starts[0]), len(geom.starts[1])
    field = np.broadcast_to(rigid[:, None, None, :], (n, gy, gx, 2)).astype(np.float64)
    radius = geom.dev_radius
    for _ in range(_PATCH_ROUNDS):
        patches = _patches(_warp(frames, field, geom.interp), geom)
        patches -= patches.mean(axis=(-2, -1), keepdims=True)
        res, peak = _match(
            patches,
            tpatch_spec,
            geom.patch_weight,
            geom.patch_ramp,
            np.zeros((n, gy, gx, 2)),
            radius,
            p.upsample_factor,
            p.patch_whitening,
            follow=False,
        )
        del patches
        dev = np.clip(field + res - rigid[:, None, None, :], -geom.max_dev, geom.max_dev)
        field = rigid[:, None, None, :] + dev
        radius = min(radius, 2)
    return field - rigid[:, None, None, :], peak


def _filter(images: np.ndarray, highpass: float) -> np.ndarray:
    """Images minus their Gaussian blur of σ ``highpass`` (mirrored at the edges), float32."""
    out = np.asarray(images, dtype=np.float32)
    if highpass > 0:
        out = out - ndimage.gaussian_filter(out, (0, highpass, highpass), mode="reflect")
    return out


@dataclass(frozen=True, eq=False)
class _RefineRef:
    """The template as the whole-field refinement uses it (binned pixels)."""

    tmpl: np.ndarray  # (Yp, Xp) high-passed template
    grad: np.ndarray  # (2, Yp, Xp) its gradient along y, x
    prods: np.ndarray  # (3, Yp, Xp) gradient products yy, yx, xx
    highpass: float  # σ of the high-pass (binned px)
    margin: float  # pixels sampled closer than this to the frame's edge are ignored


def _refine_reference(tmpl: np.ndarray, p: MotionParams, geom: _Geometry) -> _RefineRef:
    """High-passed template, its gradient and the gradient products, see :func:`_refine_field`."""
    highpass = p.refine_highpass / geom.k
    tf = _filter(tmpl[None], highpass)[0]
    grad = np.stack(np.gradient(tf)).astype(np.float32)
    prods = np.stack([grad[0] * grad[0], grad[0] * grad[1], grad[1] * grad[1]])
    return _RefineRef(tf, grad, prods, highpass, margin=2.0)


def _refine_field(
    frames: np.ndarray,
    rigid: np.ndarray,
    dev: np.ndarray,
    fixed: np.ndarray,
    ref: _RefineRef,
    geom: _Geometry,
    iterations: int,
) -> np.ndarray:
    """Gauss-Newton (Lucas-Kanade) refinement of the whole displacement field.

    The field is parameterised exactly as it is applied: its values at the
    patch centres, interpolated by the spline matrices ``geom.interp``. Each
    iteration warps the high-passed frame with the current field (bilinear,
    pixels sampled within ``ref.margin`` of the edge ignored), and solves the
    linearised least-squares problem ``min ||warped - T - ∇T · (M δ)||²`` over
    all pixels jointly, where ``T`` is the high-passed template and ``M`` the
    spline basis; ``field -= δ``. The Jacobian uses the template's gradient, so
    its only per-frame part is the validity mask. Parameters of patches that
    fell back to the rigid shift are held fixed (a large damping), the others
    get a small relative damping (:data:`_REFINE_RIDGE`).

    Parameters
    ----------
    frames : ndarray, (n, Yp, Xp) float32
        Binned, mean-subtracted frames.
    rigid : ndarray, (n, 2)
        Rigid shifts (binned px).
    dev : ndarray, (n, gy, gx, 2)
        Starting deviations from ``rigid`` at the patch centres (binned px).
    fixed : ndarray, (n, gy, gx) bool
        Patches whose value is not refined.
    ref, geom
        Template data and geometry.
    iterations : int
        Gauss-Newton steps.

    Returns
    -------
    ndarray, (n, gy, gx, 2) float64
        Refined deviations, clipped to ``max_deviation``.
    """
    n, ny, nx = frames.shape
    gy, gx = dev.shape[1:3]
    g = gy * gx
    my, mx = geom.interp
    my2 = (my[:, :, None] * my[:, None, :]).reshape(ny, gy * gy)
    mx2 = (mx[:, :, None] * mx[:, None, :]).reshape(nx, gx * gx)
    ff = _filter(frames, ref.highpass)
    field = rigid[:, None, None, :] + dev
    yy = np.arange(ny, dtype=np.float32)[:, None]
    xx = np.arange(nx, dtype=np.float32)[None, :]
    m = ref.margin
    damping = np.where(fixed.reshape(n, g), 1e6, _REFINE_RIDGE)
    damping = np.concatenate([damping, damping], axis=1)  # (n, 2g): y block, x block
    diag_idx = np.arange(2 * g)
    warped = np.empty_like(ff)
    for _ in range(iterations):
        dense = my @ np.moveaxis(field.astype(np.float32), -1, 1) @ mx.T  # (n, 2, Y, X)
        dense[:, 0] += yy
        dense[:, 1] += xx
        for b in range(n):
            ndimage.map_coordinates(ff[b], dense[b], output=warped[b], order=1, mode="nearest")
        valid = (
            (dense[:, 0] >= m)
            & (dense[:, 0] <= ny - 1 - m)
            & (dense[:, 1] >= m)
            & (dense[:, 1] <= nx - 1 - m)
        ).astype(np.float32)
        del dense
        r = valid * (warped - ref.tmpl)
        # J^T r, (n, 2, gy, gx): the gradient times the residual, projected on the basis
        jtr = np.stack(
            [
                np.matmul(my.T, ((r * ref.grad[c]).reshape(n * ny, nx) @ mx).reshape(n, ny, gx))
                for c in range(2)
            ],
            axis=1,
        )
        # J^T J, (n, 2g, 2g): blocks yy, yx, xx of sum w g_a g_b my_i my_k mx_j mx_l
        h = np.empty((n, 2, g, 2, g), dtype=np.float64)
        for c, (a, b2) in enumerate(((0, 0), (0, 1), (1, 1))):
            blk = ((valid * ref.prods[c]).reshape(n * ny, nx) @ mx2).reshape(n, ny, gx * gx)
            blk = np.matmul(my2.T, blk).reshape(n, gy, gy, gx, gx)
            blk = blk.transpose(0, 1, 3, 2, 4).reshape(n, g, g)
            h[:, a, :, b2, :] = blk
            if a != b2:
                h[:, b2, :, a, :] = np.swapaxes(blk, 1, 2)
        h = h.reshape(n, 2 * g, 2 * g)
        scale = np.einsum("nii->n", h)[:, None] / (2 * g) + np.finfo(np.float32).tiny
        h[:, diag_idx, diag_idx] += scale * damping
        step = np.linalg.solve(h, jtr.reshape(n, 2 * g, 1).astype(np.float64))[..., 0]
        step = np.moveaxis(step.reshape(n, 2, gy, gx), 1, -1)
        dev = np.clip(field - step - rigid[:, None, None, :], -geom.max_dev, geom.max_dev)
        field = rigid[:, None, None, :] + dev
    return field - rigid[:, None, None, :]


def _warp(
    frames: np.ndarray, field: np.ndarray, interp: tuple[np.ndarray, np.ndarray]
) -> np.ndarray:
    """Frames sampled bilinearly at ``(y, x) + spline(field)``, edges clamped, float32.

    ``field`` is (n, gy, gx, 2) displacement at the patch centres; ``interp`` the
    (Y, gy) and (X, gx) spline weights.
    """
    n, ny, nx = frames.shape
    my, mx = interp
    dense = my @ np.moveaxis(field.astype(np.float32), -1, 1) @ mx.T  # (n, 2, Y, X)
    dense[:, 0] += np.arange(ny, dtype=np.float32)[:, None]
    dense[:, 1] += np.arange(nx, dtype=np.float32)[None, :]
    out = np.empty_like(frames)
    for b in range(n):
        ndimage.map_coordinates(frames[b], dense[b], output=out[b], order=1, mode="nearest")
    return out


def _whiten(cross: np.ndarray, weight: np.ndarray, exponent: float) -> np.ndarray:
    """Cross-power spectrum divided by its magnitude ** exponent, times the band-pass (complex64)."""
    mag = np.abs(cross) ** exponent
    eps = 1e-6 * mag.mean(axis=(-2, -1), keepdims=True) + np.finfo(np.float32).tiny
    return (cross / (mag + eps) * weight).astype(np.complex64, copy=False)


def _coarse_peak(
    rw: np.ndarray, shape: tuple[int, int], centre: np.ndarray, radius: int
) -> np.ndarray:
    """Integer argmax of the correlation within ``radius`` of ``centre``.

    ``rw`` is (n, Y, X//2+1) (weighted, whitened cross-power); ``centre`` (n, 2) int.
    Returns (n, 2) int64 shifts (unwrapped, i.e. possibly negative).
    """
    corr = scipy.fft.irfft2(rw, s=shape)
    n = corr.shape[0]
    d = np.arange(-radius, radius + 1)
    rows = (centre[:, :1] + d) % shape[0]  # (n, w)
    cols = (centre[:, 1:] + d) % shape[1]
    win = corr[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
    flat = win.reshape(n, -1).argmax(axis=1)
    iy, ix = np.unravel_index(flat, win.shape[1:])
    return centre + np.stack([d[iy], d[ix]], axis=1)


def _refine_peak(
    rw: np.ndarray, shape: tuple[int, int], coarse: np.ndarray, upsample: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sub-pixel peak by an upsampled DFT around the integer peak.

    The correlation is evaluated on a (U, U) grid of step ``1/upsample`` px
    spanning ±0.75 px around ``coarse`` (Guizar-Sicairos et al. 2008), directly
    from the half spectrum ``rw`` with two batched matrix products.

    Returns
    -------
    shifts : ndarray, (n, 2) float64
    peak : ndarray, (n,) float64
        Correlation at the peak over its largest possible value (all phases
        aligned), in [-1, 1]; 1 for a perfect match.
    """
    half = math.ceil(0.75 * upsample) if upsample > 1 else 0
    off = np.arange(-half, half + 1) / upsample
    fy = np.fft.fftfreq(shape[0])
    fx = np.fft.rfftfreq(shape[1])
    py = coarse[:, :1] + off  # (n, U)
    px = coarse[:, 1:] + off
    ky = np.exp(2j * np.pi * py[:, :, None] * fy).astype(np.complex64)  # (n, U, Y)
    kx = np.exp(2j * np.pi * px[:, None, :] * fx[:, None]) * _multiplicity(shape[1])[:, None]
    kx = kx.astype(np.complex64)  # (n, Xh, U): the half spectrum stands for the full one
    corr = np.real(ky @ rw @ kx)  # (n, U, U)
    # every phase aligned would give the sum of the magnitudes: peaks are in [-1, 1]
    bound = np.einsum("nyx,x->n", np.abs(rw), _multiplicity(shape[1]).astype(np.float32))
    n, u = corr.shape[0], corr.shape[1]
    flat = corr.reshape(n, -1).argmax(axis=1)
    iy, ix = np.unravel_index(flat, (u, u))
    rows = np.arange(n)
    shifts = np.stack([py[rows, iy], px[rows, ix]], axis=1)
    if u >= 3:
        # a parabola through the fine-grid maximum and its two neighbours, per axis
        step = np.arange(-1, 2)
        iyc, ixc = np.clip(iy, 1, u - 2), np.clip(ix, 1, u - 2)
        along_y = corr[rows[:, None], iyc[:, None] + step, ix[:, None]]
        along_x = corr[rows[:, None], iy[:, None], ixc[:, None] + step]
        for axis, (i, ic, tri) in enumerate(((iy, iyc, along_y), (ix, ixc, along_x))):
            lo, mid, hi = tri.T
            curvature = lo - 2 * mid + hi
            ok = (i == ic) & (curvature < 0)
            frac = np.where(ok, 0.5 * (lo - hi) / np.where(ok, curvature, -1.0), 0.0)
            shifts[:, axis] += np.clip(frac, -0.5, 0.5) / upsample
    return shifts, corr.reshape(n, -1)[rows, flat] / np.maximum(bound, np.finfo(np.float32).tiny)


# ----------------------------------------------------------------------------- application
def _apply_block(
    block: np.ndarray,
    rigid: np.ndarray,
    patch: np.ndarray | None = None,
    *,
    p: MotionParams,
    centers: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """``blockwise`` kernel: one registered frame chunk, see :func:`_apply_frames`."""
    return _apply_frames(block, rigid, patch, p, centers)


def _apply_frames(
    frames: np.ndarray,
    rigid: np.ndarray,
    patch: np.ndarray | None,
    p: MotionParams,
    centers: tuple[np.ndarray, np.ndarray] | None,
) -> np.ndarray:
    """Resample frames at ``(y + dy, x + dx)``.

    Parameters
    ----------
    frames : ndarray, (n, Y, X) real
    rigid : ndarray, (n, 2)
        Used when ``patch`` is None.
    patch : ndarray, (n, gy, gx, 2) or None
        Patch-centre shifts; the field is the spline through ``centers``.
    p : MotionParams
        ``interpolation_order`` and ``border``.
    centers : (ndarray (gy,), ndarray (gx,)) or None
        Patch centres, px.

    Returns
    -------
    ndarray, (n, Y, X) float32
    """
    mode, cval = _BORDER_MODES[p.border]
    order = int(p.interpolation_order)
    n, ny, nx = frames.shape
    out = np.empty((n, ny, nx), dtype=np.float32)
    if patch is None:
        for b in range(n):
            ndimage.shift(
                np.asarray(frames[b], dtype=np.float32),
                -np.asarray(rigid[b], dtype=np.float64),
                output=out[b],
                order=order,
                mode=mode,
                cval=cval,
                prefilter=order > 1,
            )
        return out
    assert centers is not None
    my = _spline_matrix(np.asarray(centers[0], np.float64), np.arange(ny, dtype=np.float64))
    mx = _spline_matrix(np.asarray(centers[1], np.float64), np.arange(nx, dtype=np.float64))
    grid_y = np.arange(ny, dtype=np.float32)[:, None]
    grid_x = np.arange(nx, dtype=np.float32)[None, :]
    coords = np.empty((2, ny, nx), dtype=np.float32)
    for b in range(n):
        s = np.asarray(patch[b], dtype=np.float32)
        coords[0] = grid_y + my @ s[..., 0] @ mx.T
        coords[1] = grid_x + my @ s[..., 1] @ mx.T
        ndimage.map_coordinates(
            np.asarray(frames[b], dtype=np.float32),
            coords,
            output=out[b],
            order=order,
            mode=mode,
            cval=cval,
            prefilter=order > 1,
        )
    return out
