"""Chunk planning: how many frames or pixels one dask chunk holds, from a memory budget.

Pure functions, no I/O (in the spirit of rechunker's ``rechunking_plan``):

* :func:`plan_frame_chunks` — frame-contiguous chunks ``(frames, y, x)`` for
  spatial stages (registration, per-frame filtering, ingest);
* :func:`plan_pixel_chunks` — pixel-contiguous chunks ``(all frames, ty, tx)``
  for per-pixel temporal work (baselines, ΔF/F, correlation images);
* :func:`parse_memory` — ``"512MB"``, ``"2GiB"`` or an int to bytes.

The budget is the memory one *task* may use. A task holds its input chunk and
a few intermediate copies (a float32 conversion, a filtered copy, the output),
so a chunk may only take ``budget / safety_factor`` bytes. The default
:data:`SAFETY_FACTOR` = 4 allows the input chunk plus three same-sized
intermediates. Callers that convert integer input to float32 before working
should pass ``itemsize=4`` (the size of the working dtype), not the input's.
"""

from __future__ import annotations

import logging
import math
import numbers

from dask.utils import parse_bytes

from somaflow.errors import ParameterError

log = logging.getLogger(__name__)

#: copies of one chunk a task is assumed to hold at once (input + intermediates)
SAFETY_FACTOR = 4



def parse_memory(s: str | int) -> int:
    """Parse a memory size into bytes.

    Parameters
    ----------
    s : str or int
        An int (bytes) or a string such as ``"512MB"``, ``"2GiB"``, ``"1.5 GB"``,
        ``"300k"``. Parsed by :func:`dask.utils.parse_bytes`: ``k/KB/M/MB/G/GB/T/TB`` are
        powers of 1000, ``KiB/MiB/GiB/TiB`` powers of 1024; case is ignored.

    Returns
    -------
    int
        Bytes, > 0 (fractions are rounded down).

    Raises
    ------
    ParameterError
        Unparseable text, an unknown unit, or a size that is not positive.
    """
    if isinstance(s, bool):
        raise ParameterError(
            f"memory size must be a number of bytes or a string like '512MB', got {s!r}."
        )
    if isinstance(s, numbers.Integral):
        value = int(s)
    elif isinstance(s, str):
        try:
            if not any(c.isdigit() for c in s):  # parse_bytes reads a bare unit as 1 of it
                raise ValueError(s)
            value = int(parse_bytes(s))
        except (ValueError, TypeError):
            raise ParameterError(
                f"cannot parse memory size {s!r}. Write a number with an optional unit, "
                "e.g. '512MB', '2GiB' or '1000000'."
            ) from None
    else:
        raise ParameterError(
            f"memory size must be an int or a string like '512MB', got {type(s).__name__} {s!r}."
        )
    if value <= 0:
        raise ParameterError(
            f"memory size must be positive, got {s!r}. Give a budget such as '256MB'."
        )
    return value


def _check_shape(
    shape: tuple[int, ...], itemsize: int, memory_budget: int, safety_factor: float
) -> None:
    if len(shape) != 3:
        raise ParameterError(f"shape must be (frame, y, x), got {shape!r}.")
    if any(int(n) != n or n <= 0 for n in shape):
        raise ParameterError(f"every dimension of shape must be a positive integer, got {shape!r}.")
    if itemsize <= 0:
        raise ParameterError(f"itemsize must be positive, got {itemsize!r}.")
    if memory_budget <= 0:
        raise ParameterError(
            f"memory_budget must be positive, got {memory_budget!r}. Give a budget such as 256 MB."
        )
    if not safety_factor > 0:
        raise ParameterError(f"safety_factor must be positive, got {safety_factor!r}.")


def plan_frame_chunks(
    shape: tuple[int, int, int],
    itemsize: int,
    memory_budget: int,
    *,
    min_frames: int = 1,
    safety_factor: float = SAFETY_FACTOR,
) -> int:
    """Frames per chunk for frame-contiguous chunks ``(frames, y, x)``.

    The largest ``n`` with ``n * y * x * itemsize * safety_factor <= memory_budget``,
    then clipped to ``[min_frames, shape[0]]`` (the upper bound wins when
    ``min_frames > shape[0]``). When even ``min_frames`` frames exceed the budget,
    ``min_frames`` is returned and a warning is logged: a chunk narrower than the
    caller's minimum (e.g. a temporal filter's window) would be useless.

    Parameters
    ----------
    shape : tuple of int
        Movie shape ``(frame, y, x)``, all > 0.
    itemsize : int
        Bytes per pixel of the working dtype (4 for float32 work), > 0.
    memory_budget : int
        Bytes one task may use, > 0.
    min_frames : int
        Smallest useful chunk length in frames, > 0.
    safety_factor : float
        Copies of a chunk alive at once; default :data:`SAFETY_FACTOR`.

    Returns
    -------
    int
        Frames per chunk, ``1 <= n <= shape[0]``. Non-decreasing in ``memory_budget``.

    Raises
    ------
    ParameterError
        A non-positive shape entry, itemsize, budget, min_frames or safety factor.
    """
    _check_shape(tuple(shape), itemsize, memory_budget, safety_factor)
    if min_frames <= 0:
        raise ParameterError(f"min_frames must be positive, got {min_frames!r}.")
    n_frames, ny, nx = (int(v) for v in shape)
    frame_cost = ny * nx * itemsize * safety_factor
    fit = int(memory_budget // frame_cost)
    if fit < min_frames and min_frames <= n_frames:
        log.warning(
            "a chunk of %d frames of %dx%d needs %.0f bytes with safety factor %s, over the "
            "budget of %d bytes; using %d frames anyway",
            min_frames,
            ny,
            nx,
            min_frames * frame_cost,
            safety_factor,
            memory_budget,
            min_frames,
        )
    return max(1, min(n_frames, max(fit, int(min_frames))))


def plan_pixel_chunks(
    shape: tuple[int, int, int],
    itemsize: int,
    memory_budget: int,
    *,
    safety_factor: float = SAFETY_FACTOR,
) -> tuple[int, int]:
    """Tile ``(ty, tx)`` for pixel-contiguous chunks ``(all frames, ty, tx)``.

    A chunk spans every frame, so it holds ``frame * ty * tx`` pixels; the tile
    is the largest near-square one with ``frame * ty * tx * itemsize * safety_factor
    <= memory_budget``. Square tiles are preferred (they minimise the halo of
    spatial neighbourhoods); when one side reaches the image edge the other side
    grows to use the rest of the budget. Each side is non-decreasing in the budget.
    When not even one pixel's trace fits, ``(1, 1)`` is returned and a warning logged.

    Parameters
    ----------
    shape : tuple of int
        Movie shape ``(frame, y, x)``, all > 0.
    itemsize : int
        Bytes per pixel of the working dtype, > 0.
    memory_budget : int
        Bytes one task may use, > 0.
    safety_factor : float
        Copies of a chunk alive at once; default :data:`SAFETY_FACTOR`.

    Returns
    -------
    tuple of int
        ``(ty, tx)`` with ``1 <= ty <= y`` and ``1 <= tx <= x``.

    Raises
    ------
    ParameterError
        A non-positive shape entry, itemsize, budget or safety factor.
    """
    _check_shape(tuple(shape), itemsize, memory_budget, safety_factor)
    n_frames, ny, nx = (int(v) for v in shape)
    pixels = int(memory_budget // (n_frames * itemsize * safety_factor))
    if pixels < 1:
        log.warning(
            "one pixel's trace of %d frames needs %.0f bytes with safety factor %s, over the "
            "budget of %d bytes; using 1x1 tiles",
            n_frames,
            n_frames * itemsize * safety_factor,
            safety_factor,
            memory_budget,
        )
        return 1, 1
    side = math.isqrt(pixels)
    if side >= ny and side >= nx:
        return ny, nx
    if side >= ny:
        return ny, min(nx, pixels // ny)
    if side >= nx:
        return min(ny, pixels // nx), nx
    return side, side
