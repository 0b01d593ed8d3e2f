"""Parameters of PCA/ICA (:class:`PcaIcaParams`).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: oversampling of the randomized SVD (extra random vectors beyond n_pcs)
_OVERSAMPLES = 10


#: default n_pcs: this many PCs per neuron area (π r²) of the field of view ...
_PCS_PER_NEURON_AREA = 0.5


#: ... within these bounds
_MIN_DEFAULT_PCS, _MAX_DEFAULT_PCS = 10, 300


class PcaIcaParams(BaseModel):
    """Parameters of :func:`pca_ica`; see the module docstring for the method.

    Defaults were measured on the simulator's 2p-small preset (seeds 0–2, r = 5
    px, 10 Hz); :meth:`for_movie` scales the lengths with the neuron radius.

    Attributes
    ----------
    neuron_radius : float
        Typical soma radius r (pixels of the input movie).
    temporal_bin : int
        Frames averaged into one frame of the decomposition movie.
    spatial_downsample : int
        Pixels averaged along y and along x into one decomposition pixel.
    max_frames_for_decomposition : int
        Most frames in the decomposition movie: ``temporal_bin`` is raised to
        ``ceil(frames / max_frames_for_decomposition)`` when needed; bounds the
        (frame, k) factors and the ICA's cost.
    background_sigma : float
        Each decomposition frame minus its Gaussian blur of this sigma
        (movie pixels; 0 = off).
    spatial_sigma : float
        Gaussian smoothing of each decomposition frame (movie pixels; 0 = off).
    n_pcs : int or None
        PCs computed; None: ``0.5 · y·x / (π r²)`` on the decomposition grid,
        clipped to [10, 300] and to ``min(frames, pixels) − 1``.
    noise_pc_margin : float
        A PC is kept when its singular value exceeds this times the noise
        edge; 0 keeps all ``n_pcs``.
    n_ics : int or None
        ICs sought; None: one per kept PC. Capped at the kept PCs.
    mu : float
        Weight of temporal (1) against spatial (0) skewness in the ICA.
    power_iterations : int
        Power iterations of the randomized SVD (each adds two passes over the
        decomposition matrix).
    max_ica_iterations : int
        Iteration limit of the fixed-point ICA (a warning is logged when hit).
    ica_tolerance : float
        The ICA stops when ``1 − min |cos|`` between successive unmixing
        vectors falls below this.
    smooth_sigma : float
        Gaussian sigma applied to each spatial IC before thresholding (pixels).
    threshold : float
        Segmentation threshold, robust SDs above the IC image's median.
    peak_fraction : float
        Each component is cut at this fraction of its height above the median
        (0: keep the thresholded component).
    min_area_fraction, max_area_fraction : float
        Allowed mask area as fractions of π r².
    duplicate_overlap : float
        Two masks are duplicates when they share more than this fraction of the
        smaller one; the higher-scoring one is kept.
    min_skewness : float
        A unit is accepted when its IC time course has at least this skewness
        (0.5, 0.75 and 1.0 give the same F1 within 0.01 on the simulator: the
        segmentation already removes most noise ICs; 0.5 keeps cells that fire
        often, whose time courses are less skewed).
    chunk_bytes : int
        Memory budget of one frame chunk (bytes) of the movie as float32 before
        binning; the frame chunk of the decomposition matrix is that many
        frames divided by the bin.
    cache_bytes : int
        The binned, band-passed (frame, pixel) float32 matrix is computed once
        and held in memory when it takes at most this many bytes; larger ones
        are recomputed from the movie, chunk by chunk, in every pass.
    seed : int
        Seed of the randomized SVD and of the ICA's initial unmixing matrix.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    neuron_radius: float = Field(5.0, gt=0, description="typical soma radius (pixels)")
    temporal_bin: int = Field(1, ge=1, description="frames averaged per decomposition frame")
    spatial_downsample: int = Field(1, ge=1, description="pixels averaged along y and along x")
    max_frames_for_decomposition: int = Field(
        3000, ge=3, description="most frames entering the decomposition (binning raised to fit)"
    )
    background_sigma: float = Field(
        10.0, ge=0, description="subtract each frame's Gaussian blur of this sigma (pixels; 0 = off)"
    )
    spatial_sigma: float = Field(1.0, ge=0, description="Gaussian smoothing of each frame (pixels)")
    n_pcs: int | None = Field(None, ge=1, description="PCs computed; None = from the movie size")
    noise_pc_margin: float = Field(
        0.85, ge=0, description="keep PCs above this x the noise singular-value edge (0 = all)"
    )
    n_ics: int | None = Field(None, ge=1, description="ICs sought; None = one per kept PC")
    mu: float = Field(0.5, ge=0, le=1, description="temporal (1) vs spatial (0) skewness weight")
    power_iterations: int = Field(2, ge=0, le=10, description="randomized-SVD power iterations")
    max_ica_iterations: int = Field(500, ge=1, description="fixed-point ICA iteration limit")
    ica_tolerance: float = Field(1e-4, gt=0, lt=1, description="ICA convergence: 1 - min |cos|")
    smooth_sigma: float = Field(1.5, ge=0, description="Gaussian sigma on IC images (pixels)")
    threshold: float = Field(3.0, gt=0, description="segmentation threshold (robust SDs)")
    peak_fraction: float = Field(
        0.4, ge=0, lt=1, description="cut each component at this fraction of its height"
    )
    min_area_fraction: float = Field(0.5, ge=0, description="minimum mask area / (pi r^2)")
    max_area_fraction: float = Field(3.0, gt=0, description="maximum mask area / (pi r^2)")
    duplicate_overlap: float = Field(
        0.5, gt=0, le=1, description="shared fraction of the smaller mask that makes a duplicate"
    )
    min_skewness: float = Field(
        0.5, gt=0, description="accept units whose IC time course has at least this skewness"
    )
    chunk_bytes: int = Field(
        64 << 20, gt=0, description="bytes per frame chunk of the float32 movie before binning"
    )
    cache_bytes: int = Field(
        512 << 20, ge=0, description="hold the decomposition matrix in memory up to this size (bytes)"
    )
    seed: int = Field(0, ge=0, description="seed of the randomized SVD and the ICA start")

    @model_validator(mode="after")
    def _consistent(self) -> PcaIcaParams:
        if self.min_area_fraction >= self.max_area_fraction:
            raise ValueError(
                f"min_area_fraction ({self.min_area_fraction}) must be below max_area_fraction "
                f"({self.max_area_fraction})"
            )
        if self.n_pcs is not None and self.n_ics is not None and self.n_ics > self.n_pcs:
            raise ValueError(f"n_ics ({self.n_ics}) cannot exceed n_pcs ({self.n_pcs}); lower n_ics")
        return self

    @classmethod
    def for_movie(cls, fps: float, modality: str, neuron_radius: float) -> PcaIcaParams:
        """Defaults for a movie.

        Parameters
        ----------
        fps : float
            Frame rate (Hz): frames are binned to about 5 Hz for the
            decomposition (indicator transients last ~0.5–1 s).
        modality : str
            ``"2p"`` or ``"1p"``; the defaults are the same (pass a 1p movie
            with its background removed, as ``trace_movie`` gives).
        neuron_radius : float
            Soma radius r (pixels): band-pass r/5 … 2 r, IC smoothing 0.3 r,
            areas in units of π r²; the decomposition grid is downsampled so
            that r stays at 4–8 of its pixels.
        """
        r = float(neuron_radius)
        return cls(
            neuron_radius=r,
            temporal_bin=max(1, int(round(float(fps) / 5.0))),
            spatial_downsample=max(1, int(r // 4)),
            background_sigma=round(2.0 * r, 3),
            spatial_sigma=round(r / 5.0, 3),
            smooth_sigma=round(0.3 * r, 3),
        )

