"""Video files (AVI and friends, through PyAV's FFmpeg) as lazy movies.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from somaflow.errors import InputError, SomaflowError
from somaflow.io.readers.base import _frame_range, _is_local, _open_binary, _positive_fps, _Source


@dataclass(frozen=True)
class _VideoSource(_Source):
    """Frames of the first video stream; ``pixel`` is how a frame becomes a 2-D array."""

    pixel: str = "gray"

    def _read(self, key: tuple[Any, ...]) -> np.ndarray:
        frames, drop = _frame_range(key[0], self.shape[0])
        if len(frames) == 0:
            return np.empty((0,) + self.shape[1:], self.dtype)[(slice(None),) + key[1:]]
        lo, hi = min(frames), max(frames) + 1
        block = _decode_frames(self, lo, hi)
        block = block[[t - lo for t in frames]]
        block = block[(slice(None),) + key[1:]]
        return block[0] if drop else block


def _video_pixel(pix_fmt: str) -> tuple[str, np.dtype]:
    """How to turn decoded frames into 2-D arrays, and their dtype."""
    if pix_fmt in ("gray", "gray8"):
        return "gray", np.dtype(np.uint8)
    if pix_fmt in ("gray16le", "gray16be"):
        return pix_fmt, np.dtype(np.uint16)
    if pix_fmt.startswith(("yuv", "yuvj", "nv")):
        return "gray", np.dtype(np.uint8)  # the luma plane
    return "rgb24", np.dtype(np.uint8)  # colour: accepted when R == G == B (checked per chunk)


@contextlib.contextmanager
def _av_container(url: str, so: dict[str, Any] | None) -> Iterator[Any]:
    import av

    if _is_local(url):
        with av.open(url) as c:
            yield c
    else:
        with _open_binary(url, so) as fh, av.open(fh) as c:
            yield c


def _frame_to_array(frame: Any, pixel: str, url: str) -> np.ndarray:
    if pixel != "rgb24":
        return frame.to_ndarray(format=pixel)
    rgb = frame.to_ndarray(format="rgb24")
    if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
        raise InputError(
            f"{url} is a colour video; somaflow needs grey frames. Convert it to greyscale "
            "(e.g. ffmpeg -i IN -pix_fmt gray -c:v ffv1 OUT.avi)."
        )
    return rgb[..., 0]


def _decode_frames(src: _VideoSource, lo: int, hi: int) -> np.ndarray:
    """Decode frames ``lo..hi-1``: seek to a keyframe at or before ``lo``, decode forward."""
    out: list[np.ndarray] = []
    with _av_container(src.url, src.storage_options) as c:
        stream = c.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        tb = stream.time_base
        start = stream.start_time or 0

        def index(frame: Any, fallback: int) -> int:
            if frame.pts is None or not rate or not tb:
                return fallback
            return int(round(float((frame.pts - start) * tb * rate)))

        seeked = lo > 0 and bool(rate) and bool(tb)
        if seeked:
            c.seek(int(start + lo / (rate * tb)), stream=stream, backward=True, any_frame=False)
        for count, frame in enumerate(c.decode(stream)):
            i = index(frame, count)
            if seeked and not out and i > lo:  # the seek overshot: decode from the start
                return _decode_from_start(src, lo, hi)
            if i < lo:
                continue
            if i >= hi:
                break
            out.append(_frame_to_array(frame, src.pixel, src.url))
    if len(out) != hi - lo:
        raise InputError(
            f"{src.url}: frames {lo}..{hi - 1} could not be decoded (got {len(out)}); the video "
            "is truncated or has a variable frame rate. Re-encode it at a constant rate "
            "(e.g. ffmpeg -i IN -vsync cfr -pix_fmt gray -c:v ffv1 OUT.avi)."
        )
    return np.stack(out)


def _decode_from_start(src: _VideoSource, lo: int, hi: int) -> np.ndarray:
    out: list[np.ndarray] = []
    with _av_container(src.url, src.storage_options) as c:
        for count, frame in enumerate(c.decode(c.streams.video[0])):
            if count >= hi:
                break
            if count >= lo:
                out.append(_frame_to_array(frame, src.pixel, src.url))
    if len(out) != hi - lo:
        raise InputError(
            f"{src.url}: frames {lo}..{hi - 1} could not be decoded; the video is truncated."
        )
    return np.stack(out)


def _open_video(url: str, so: dict[str, Any] | None) -> tuple[_VideoSource, dict[str, Any], str]:
    try:
        with _av_container(url, so) as c:
            if not c.streams.video:
                raise InputError(f"{url} holds no video stream. Point at a movie file.")
            stream = c.streams.video[0]
            height, width = stream.codec_context.height, stream.codec_context.width
            pix_fmt = stream.codec_context.pix_fmt or ""
            rate = stream.average_rate or stream.guessed_rate
            n = int(stream.frames or 0)
            if n <= 0:  # containers like mkv don't record it: count the packets
                n = sum(1 for p in c.demux(stream) if p.size and p.pts is not None)
    except SomaflowError:
        raise
    except Exception as exc:  # PyAV raises its own error classes for bad files
        raise InputError(
            f"cannot open {url} as a video ({type(exc).__name__}: {exc}). The file is corrupt, "
            "truncated or uses a codec FFmpeg lacks; re-export it (e.g. as FFV1 in .avi)."
        ) from exc
    pixel, dtype = _video_pixel(pix_fmt)
    attrs: dict[str, Any] = {"pix_fmt": pix_fmt}
    if rate and (fps := _positive_fps(float(rate))) is not None:
        attrs["fps"] = fps
    return _VideoSource(url, so, (n, height, width), dtype, pixel=pixel), attrs, ""

