"""Parameters of the per-frame filters, each with defaults for a movie.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field, model_validator

from somaflow.errors import ParameterError

#: bytes one task may use when a numpy-backed movie is chunked here
DEFAULT_MEMORY_BUDGET = 128 << 20


#: modalities ``for_movie`` knows
_MODALITIES = ("2p", "1p")


def _check_modality(modality: str) -> None:
    if modality not in _MODALITIES:
        raise ParameterError(f"modality must be '2p' or '1p', got {modality!r}. Pass --modality 2p or 1p.")


def _check_radius(neuron_radius: float) -> float:
    r = float(neuron_radius)
    if not r > 0:
        raise ParameterError(
            f"neuron_radius must be a positive number of pixels, got {neuron_radius!r}. "
            "Pass the typical soma radius (e.g. --neuron-radius 5)."
        )
    return r


class HomomorphicParams(BaseModel):
    """Parameters of :func:`homomorphic`.

    Attributes
    ----------
    sigma : float
        SD (pixels) of the Gaussian low-pass subtracted from the log image.
        STNeuroNet's high-pass is "1 − a Gaussian low-pass of SD 0.04 µm⁻¹";
        read as an angular-frequency SD this is a spatial SD of
        1 / 0.04 = 25 µm, i.e. 32 px at the Allen Brain Observatory's
        0.78 µm/px — the authors' code uses 30 px. ABO somata have areas of
        about 100 µm² (radius ≈ 5.7 µm ≈ 7.3 px), so σ ≈ 4 soma radii:
        wide enough that a soma survives the subtraction, narrow enough to
        follow vignetting and neuropil haze.
    offset : float
        Added before the logarithm, ``log(max(I, 0) + offset)``; 1 as in the
        authors' code (``log(I + 1)`` of photon-count-like data). Negative
        pixels are treated as 0.
    normalize : bool
        Divide the filtered movie by its overall SD (population, over every
        pixel of every frame), as STNeuroNet does; False returns the ratio
        image ``I / geometric-local-mean`` itself (≈ 1 on background).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    sigma: float = Field(30.0, gt=0, description="Gaussian low-pass SD (pixels) subtracted from log I")
    offset: float = Field(1.0, gt=0, description="log(max(I, 0) + offset)")
    normalize: bool = Field(True, description="divide by the filtered movie's overall SD")

    @classmethod
    def for_movie(cls, fps: float, modality: str, neuron_radius: float) -> HomomorphicParams:
        """Defaults for a movie.

        Parameters
        ----------
        fps : float
            Frame rate (Hz); not used, accepted for a uniform API.
        modality : str
            ``"2p"`` or ``"1p"``; the same defaults for both.
        neuron_radius : float
            Typical soma radius (pixels).

        Returns
        -------
        HomomorphicParams
            ``sigma`` = 4 × ``neuron_radius`` (see the class docstring).
        """
        _check_modality(modality)
        return cls(sigma=round(4.0 * _check_radius(neuron_radius), 3))


class MorphParams(BaseModel):
    """Parameters of :func:`morphological_background`.

    Attributes
    ----------
    radius : float
        Radius (pixels) of the flat disk structuring element. The opening
        keeps every bright structure a disk of this radius fits in, so the
        disk must be *larger* than a soma to take the soma out of the
        background: ``for_movie`` uses 1.5 soma radii (sc-CNMF: "comparable
        to the size of ROIs"). Larger disks keep more of each soma's peak but
        follow the background less closely.
    downsample : int
        Open a ``downsample``× block-averaged frame with a disk of
        ``radius / downsample`` and upsample the background bilinearly; 1
        opens the full-resolution frame. Measured on 256×256 frames with
        60 somata (r = 6 px) on a smooth background, noise SD 10, disk
        radius 9: 2× is ≈ 5× faster (9 vs 49 ms per frame) and its
        background is *closer* to the true one (RMSE 7.9 vs 15.1, bias −3.8
        vs −13.7): the full-resolution erosion takes the minimum of the
        noise, which block averaging halves. With ``downsample > 1`` the
        background may exceed the frame at single pixels, so the foreground
        can be slightly negative there.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    radius: float = Field(9.0, gt=0, description="flat disk radius (pixels), > the soma radius")
    downsample: int = Field(2, ge=1, le=8, description="open on a block-averaged frame (1 = full resolution)")

    @classmethod
    def for_movie(cls, fps: float, modality: str, neuron_radius: float) -> MorphParams:
        """Defaults for a movie.

        Parameters
        ----------
        fps : float
            Frame rate (Hz); not used, accepted for a uniform API.
        modality : str
            ``"2p"`` or ``"1p"``; the same defaults for both.
        neuron_radius : float
            Typical soma radius (pixels).

        Returns
        -------
        MorphParams
            ``radius`` = 1.5 × ``neuron_radius``; ``downsample`` = 2 when the
            downsampled disk still has a radius ≥ 2 px, else 1.
        """
        _check_modality(modality)
        radius = round(1.5 * _check_radius(neuron_radius), 3)
        return cls(radius=radius, downsample=2 if radius / 2 >= 2 else 1)


class PeronaMalikParams(BaseModel):
    """Parameters of :func:`perona_malik`.

    Attributes
    ----------
    n_iter : int
        Diffusion steps. In flat regions the filter acts like a Gaussian of
        SD ``sqrt(2 · step · n_iter)`` pixels.
    step : float
        Time step λ of the explicit 4-neighbour scheme; ≤ 0.25 for stability.
    kappa : float or None
        Edge threshold κ in the conduction ``exp(−(|∇I|/κ)²)`` (movie units
        per pixel). ``None`` estimates it per frame as ``kappa_factor`` times
        the robust SD of the frame's neighbour differences (1.4826 × their
        MAD), which is insensitive to the few large differences at edges.
    kappa_factor : float
        Multiple of the noise SD of the differences used when ``kappa`` is
        None. At 2, a noise difference of one SD diffuses with conduction
        0.78, a difference of 4 SD (an edge) with 0.02.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    n_iter: int = Field(5, ge=1, description="number of diffusion steps")
    step: float = Field(0.2, gt=0, le=0.25, description="time step lambda (<= 0.25 for stability)")
    kappa: float | None = Field(None, gt=0, description="edge threshold; None = kappa_factor x noise SD")
    kappa_factor: float = Field(2.0, gt=0, description="kappa in noise SDs of the neighbour differences")

    @classmethod
    def for_movie(cls, fps: float, modality: str, neuron_radius: float) -> PeronaMalikParams:
        """Defaults for a movie.

        Parameters
        ----------
        fps : float
            Frame rate (Hz); not used, accepted for a uniform API.
        modality : str
            ``"2p"`` or ``"1p"``; the same defaults for both.
        neuron_radius : float
            Typical soma radius (pixels).

        Returns
        -------
        PeronaMalikParams
            ``n_iter`` so that flat regions are smoothed over a quarter soma
            radius, ``sqrt(2 · 0.2 · n_iter) ≈ r / 4``, at least 2 steps.
        """
        _check_modality(modality)
        r = _check_radius(neuron_radius)
        step = 0.2
        return cls(n_iter=max(2, math.ceil((r / 4) ** 2 / (2 * step))), step=step)


class ContrastParams(BaseModel):
    """Parameters of :func:`clip_contrast`.

    Attributes
    ----------
    low_percentile, high_percentile : float
        Values below / above these percentiles of the movie's pixel values
        are clipped (Apthorpe et al.: 3 and 99).
    sample_frames : int
        Percentiles are estimated from at most this many frames, evenly
        spaced over the movie.
    max_samples : int
        At most this many pixel values in all (a fixed random subset of
        pixel positions, the same in every sampled frame, when the frames
        hold more). The sample is gathered in memory as float64, so it
        costs up to ``8 · max_samples`` bytes (32 MiB at the default),
        whatever the movie's length.
    seed : int
        Seed of the pixel subset.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    low_percentile: float = Field(3.0, ge=0, le=100, description="clip below this percentile")
    high_percentile: float = Field(99.0, ge=0, le=100, description="clip above this percentile")
    sample_frames: int = Field(500, ge=1, description="frames (evenly spaced) used for the percentiles")
    max_samples: int = Field(1 << 22, ge=1, description="pixel values used for the percentiles")
    seed: int = Field(0, ge=0, description="seed of the pixel subset")

    @model_validator(mode="after")
    def _ordered(self) -> ContrastParams:
        if not self.low_percentile < self.high_percentile:
            raise ValueError(
                f"low_percentile ({self.low_percentile}) must be below high_percentile "
                f"({self.high_percentile}); swap them"
            )
        return self

    @classmethod
    def for_movie(cls, fps: float, modality: str, neuron_radius: float) -> ContrastParams:
        """Defaults for a movie: the paper's 3rd and 99th percentiles for both modalities.

        Parameters
        ----------
        fps : float
            Frame rate (Hz); not used, accepted for a uniform API.
        modality : str
            ``"2p"`` or ``"1p"``.
        neuron_radius : float
            Soma radius (pixels); not used.
        """
        _check_modality(modality)
        _check_radius(neuron_radius)
        return cls()

