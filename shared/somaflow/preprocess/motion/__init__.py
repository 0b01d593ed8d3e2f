"""Motion correction: rigid and piecewise-rigid (NoRMCorre-style) registration.

Three pure, lazy steps on ``(frame, y, x)`` movies, plus a convenience wrapper:

* :func:`compute_template` — a reference image refined iteratively from an
  evenly spaced subset of frames (only that subset is read);
* :func:`estimate_shifts` — per-frame rigid shifts and, in ``"piecewise"`` mode,
  per-patch shifts, computed frame chunk by frame chunk (memory does not grow
  with the movie length);
* :func:`apply_shifts` — the registered float32 movie, frame-chunked and lazy;
* :func:`correct_motion` wires the three (with ``mode: auto``,
  :func:`resolve_mode` first); :func:`crop_border` optionally cuts the margin
  that motion leaves without data.

Modules: :mod:`~.params` (:class:`MotionParams`), :mod:`~.register` (the three
steps), :mod:`~.auto` (``mode: auto``), :mod:`~.matching` (shift estimation of a
block of frames), :mod:`~.refine` (Gauss–Newton refinement), :mod:`~.geometry`
(patches, tapers, band-pass, splines), :mod:`~.apply` (warping a block).

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

from somaflow.preprocess.motion.auto import (
    correct_motion,
    nonrigid_deviation,
    registration_model,
    resolve_mode,
)
from somaflow.preprocess.motion.params import (
    AUTO_CONFIDENCE,
    AUTO_RUN_FRAMES,
    DEFAULT_MEMORY_BUDGET,
    SHIFT_CONVENTION,
    MotionParams,
)
from somaflow.preprocess.motion.register import (
    apply_shifts,
    compute_template,
    crop_border,
    estimate_shifts,
    shifts_at,
)

__all__ = [
    "AUTO_CONFIDENCE",
    "AUTO_RUN_FRAMES",
    "DEFAULT_MEMORY_BUDGET",
    "SHIFT_CONVENTION",
    "MotionParams",
    "apply_shifts",
    "compute_template",
    "correct_motion",
    "crop_border",
    "estimate_shifts",
    "nonrigid_deviation",
    "registration_model",
    "resolve_mode",
    "shifts_at",
]
