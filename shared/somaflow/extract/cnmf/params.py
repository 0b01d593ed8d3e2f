"""The parameters of CNMF (:class:`CnmfParams`); lengths in neuron radii r unless in px.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from somaflow.extract.seeds import SeedParams


class CnmfParams(BaseModel):
    """Parameters of :func:`cnmf`; lengths in neuron radii r unless in px."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    neuron_radius: float = Field(5.0, gt=0, description="soma radius r (px)")
    patch_size: int = Field(64, ge=16, description="side of a patch core (px)")
    halo_radii: float = Field(3.0, ge=0, description="patch halo around its core (r)")
    max_fit_frames: int = Field(
        2000, ge=50, description="frames the factorisation sees (binned): its cost grows with them, not with the "
        "movie's length (1000 measured worse: 2p-medium seed 100, F1 0.933 -> 0.898)")
    n_background: int = Field(1, ge=0, le=5, description="rank of the fluctuating background per patch")
    iterations: int = Field(3, ge=1, le=20, description="spatial/temporal update rounds")
    hals_sweeps: int = Field(3, ge=1, le=50, description="HALS sweeps per update")
    window_radii: float = Field(2.5, gt=0, description="half-width of a footprint's window (r)")
    support_growth_radii: float = Field(0.4, ge=0, description="footprints may grow this far past their initial extent (r)")
    init_smooth_radii: float = Field(0.3, ge=0, description="Gaussian smoothing for initialisation (r)")
    init_correlation: float = Field(0.4, ge=0, le=1, description="pixel-to-seed correlation for the initial footprint")
    merge_correlation: float = Field(0.8, ge=-1, le=1, description="trace correlation to merge overlapping components")
    residual_rounds: int = Field(3, ge=0, le=10, description="rounds of seeding on the residual after the seeds")
    residual_pnr: float = Field(8.0, ge=0, description="peak-to-noise of a residual seed (soma-scale band-pass)")
    residual_spacing_radii: float = Field(0.8, gt=0, description="minimum spacing of residual seeds (r)")
    mask_fraction: float = Field(0.3, gt=0, lt=1, description="mask = footprint above this fraction of its max")
    min_area_fraction: float = Field(0.25, ge=0, description="smallest mask area of a CNMF unit (pi r^2)")
    morph_min_area_fraction: float = Field(
        0.0, ge=0, description="(0: off, not measured to help on held-out seeds) morphology units with a smaller mask (pi r^2) are not accepted: on the tuning "
        "movies they were a dense field's cell cut short or a fragment")
    max_area_fraction: float = Field(2.2, gt=0, description="largest mask area (pi r^2): wider is not one soma")
    min_width_radii: float = Field(
        1.2, ge=0, description="accepted CNMF units' masks are at least this wide (r) across their narrowest "
        "axis (mask_width; a disk is 2 r): thinner ones are dendrite, neuropil or border fragments. 0: off")
    min_snr: float = Field(3.0, ge=0, description="accepted units reach this peak SNR")
    min_spatial_correlation: float = Field(0.5, ge=-1, le=1, description="accepted units' spatial correlation")
    min_contrast: float = Field(
        0.5, description="accepted CNMF units stand out of the mean image: mask mean minus the mean of a ring "
        "(1 px to r outside the mask), in SDs of the ring; a soma is brighter than its surround, neuropil is not")
    contrast_exempt_size: float | None = Field(
        None, gt=0, description="a CNMF unit whose mask is at least this many times the nominal soma disk in "
        "area (pi r^2) and width (2 r) is accepted without min_contrast, on its activity (SNR, spatial "
        "correlation) and width, where it shares < morph_covered_iou of either mask with an accepted unit: real "
        "somata can be darker than their surround (on Neurofinder 00, 34 human ROIs were matched only by "
        "CNMF units rejected for contrast alone, median -0.14). None: off; for_movie sets 1.0 for 2p (Neurofinder IoU F1 0.266 -> 0.324; tuning "
        "seeds: 2p-small 0.981 -> 0.977, 2p-lowsnr 0.972 -> 0.967, 2p-dense 0.880 -> 0.883) and leaves 1p off "
        "(no labelled 1p movie to measure it on)")
    add_silent: bool = Field(True, description="add morphology-detector units no CNMF unit covers")
    accept_fallback_morphology: bool = Field(
        False, description="accept morphology units where morphology 'auto' fell back to local maxima (the "
        "movie is outside the U-Net's training range); off: on Neurofinder 00 3 of 84 matched a human ROI "
        "(IoU F1 0.225 -> 0.266 without them), on the miniscope movie they were spots between the cells")
    seed_morphology: bool = Field(
        False, description="(off: measured on held-out seeds it lowered F1 slightly and 2p-lowsnr trace r) "
        "morphology-detector masks no CNMF component covers become initial footprints "
        "(seeded CNMF): their traces are demixed from neighbours and background by the same HALS updates")
    morph_small_fraction: float = Field(
        0.0, ge=0, description="(0: off; measured on the tuning movies it helps 2p-lowsnr and hurts 2p-dense) a morphology-seeded component whose detector mask is smaller than this (pi r^2) "
        "and which the fit found active (SNR, spatial correlation, size) takes its larger footprint mask")
    morph_covered_iou: float = Field(
        0.3, ge=0, le=1, description="a morphology mask whose IoU with a component's mask reaches this is covered")
    morphology: Literal["auto", "local-maxima", "unet2d", "meanimage2d"] = Field(
        "auto", description="the anatomical detector whose masks are the morphology units "
        "(add_silent, seed_morphology, priority): the summary-image local maxima, or a CNN detector "
        "of somaflow.detect.cnn with the run's cnn parameters; auto: unet2d where the movie is inside "
        "its training distribution (no out-of-distribution warning), local-maxima elsewhere")
    priority: Literal["auto", "cnmf", "morphology"] = Field(
        "auto", description="which mask wins where a CNMF and a morphology unit overlap; auto: the "
        "morphology unit's when it comes from a CNN detector, the CNMF unit's for local maxima"
    )
    traces: Literal["neuropil", "demixed"] = Field(
        "neuropil", description="units' traces, dff and spikes: 'neuropil': footprint-weighted mean over the "
        "unit's mask minus its neuropil annulus, then ΔF/F and OASIS (somaflow.traces, as every other method; "
        "measured closer to the true calcium on every simulator preset); 'demixed': per-frame least squares on "
        "all footprints and the patches' background maps (CNMF's own C), deconvolved")
    seeds: SeedParams = SeedParams()

    @classmethod
    def for_movie(cls, fps: float, modality: str, neuron_radius: float) -> CnmfParams:
        """Defaults for a movie: lengths follow the radius; 1p gets a rank-2 background."""
        r = float(neuron_radius)
        return cls(
            neuron_radius=r,
            patch_size=int(max(48, round(12 * r))),
            n_background=1 if modality == "2p" else 2,
            # 1p: the enhanced movie keeps a residue of each bright cell's halo, which
            # residual seeding turns into fragments (measured: mostly false positives)
            residual_rounds=3 if modality == "2p" else 0,
            contrast_exempt_size=1.0 if modality == "2p" else None,
            seeds=SeedParams.for_movie(fps, modality, r),
        )

