"""Parameters of motion correction (:class:`MotionParams`) and the constants of the method.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from somaflow.errors import ParameterError

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
#: frames whose smaller side reaches this (px) are registered on 2x2-binned copies by default
DOWNSAMPLE_SIDE = 384


#: relative Tikhonov damping of the whole-field refinement (see _refine_field)
_REFINE_RIDGE = 1e-3


_BORDER_MODES = {
    "nearest": ("nearest", 0.0),
    "reflect": ("reflect", 0.0),
    "zero": ("constant", 0.0),
    "nan": ("constant", float("nan")),
}


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
    downsample: int = Field(1, ge=1, le=8, description="binning factor for estimation (2p >= 384 px: 2)")
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
            presets 0.6-0.8 r was best, 2 r or no high-pass much worse);
            ``downsample`` = 2 for 2p where the smaller side is at least
            :data:`DOWNSAMPLE_SIDE` px (on a 512x512 ``2p-large`` movie, seed 3,
            120 frames: piecewise estimation 477 -> 76 CPU ms per frame, patch
            RMS error 0.090 -> 0.109 px; rigid 54 -> 28 ms, 0.061 -> 0.063 px),
            1 below and for 1p (not measured there: the Neurofinder 00 excerpt,
            512 x 256, and 2p-medium, 256 x 256, keep full resolution); the other fields
            keep their defaults.

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
            "downsample": 2 if (side >= DOWNSAMPLE_SIDE and not one_photon) else 1,
        }
        values["max_deviation"] = min(float(values["max_deviation"]), patch / 4)
        values.update(overrides)
        try:
            return cls(**values)
        except ValueError as exc:
            raise ParameterError(f"invalid motion parameters: {exc}") from exc

