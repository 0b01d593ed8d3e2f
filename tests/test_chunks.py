"""Chunk planning: property tests (Hypothesis) and the documented examples."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from somaflow.errors import ParameterError
from somaflow.io.chunks import SAFETY_FACTOR, parse_memory, plan_frame_chunks, plan_pixel_chunks

shapes = st.tuples(st.integers(1, 5000), st.integers(1, 2048), st.integers(1, 2048))
itemsizes = st.sampled_from([1, 2, 4, 8])
budgets = st.integers(1, 1 << 34)


@settings(max_examples=300, deadline=None)
@given(shape=shapes, itemsize=itemsizes, budget=budgets, min_frames=st.integers(1, 300))
def test_frame_chunks_respect_bounds_and_budget(shape, itemsize, budget, min_frames):
    n = plan_frame_chunks(shape, itemsize, budget, min_frames=min_frames)
    frame_cost = shape[1] * shape[2] * itemsize * SAFETY_FACTOR
    assert 1 <= n <= shape[0]
    assert n >= min(min_frames, shape[0])
    if n > min_frames:  # chosen by the budget, so it fits
        assert n * frame_cost <= budget
    if n < shape[0]:  # and it is the largest that fits
        assert (n + 1) * frame_cost > budget


@settings(max_examples=300, deadline=None)
@given(shape=shapes, itemsize=itemsizes, b1=budgets, b2=budgets, min_frames=st.integers(1, 50))
def test_frame_chunks_monotone_in_budget(shape, itemsize, b1, b2, min_frames):
    lo, hi = sorted((b1, b2))
    assert plan_frame_chunks(shape, itemsize, lo, min_frames=min_frames) <= plan_frame_chunks(
        shape, itemsize, hi, min_frames=min_frames
    )


@settings(max_examples=300, deadline=None)
@given(shape=shapes, itemsize=itemsizes, budget=budgets)
def test_pixel_chunks_respect_bounds_and_budget(shape, itemsize, budget):
    ty, tx = plan_pixel_chunks(shape, itemsize, budget)
    assert 1 <= ty <= shape[1] and 1 <= tx <= shape[2]
    pixel_cost = shape[0] * itemsize * SAFETY_FACTOR
    if pixel_cost <= budget:  # at least one pixel's trace fits: the tile fits too
        assert ty * tx * pixel_cost <= budget
    else:
        assert (ty, tx) == (1, 1)
    if ty < shape[1] and tx < shape[2]:  # away from both edges the tile is square
        assert ty == tx


@settings(max_examples=300, deadline=None)
@given(shape=shapes, itemsize=itemsizes, b1=budgets, b2=budgets)
def test_pixel_chunks_monotone_in_budget(shape, itemsize, b1, b2):
    lo, hi = sorted((b1, b2))
    (ty1, tx1), (ty2, tx2) = (
        plan_pixel_chunks(shape, itemsize, lo),
        plan_pixel_chunks(shape, itemsize, hi),
    )
    assert ty1 <= ty2 and tx1 <= tx2


def test_examples():
    # 512x512 float32 frames with 4 copies are 4 MiB each: 256 MiB holds 64 frames
    assert plan_frame_chunks((1000, 512, 512), 4, 256 << 20) == 64
    assert plan_frame_chunks((10, 512, 512), 4, 256 << 20) == 10
    assert plan_frame_chunks((1000, 512, 512), 4, 1, min_frames=8) == 8
    assert plan_frame_chunks((5, 512, 512), 4, 1, min_frames=8) == 5
    # 1000 frames x 4 B x 4 copies = 16 kB per pixel: 16 MB holds 1000 pixels -> 31x31
    assert plan_pixel_chunks((1000, 512, 512), 4, 16_000_000) == (31, 31)
    assert plan_pixel_chunks((1000, 10, 512), 4, 16_000_000) == (10, 100)
    assert plan_pixel_chunks((10, 64, 64), 2, 1 << 30) == (64, 64)
    assert plan_frame_chunks((100, 10, 10), 4, 1000, safety_factor=1) == 2


@pytest.mark.parametrize(
    "call",
    [
        lambda: plan_frame_chunks((0, 10, 10), 4, 100),
        lambda: plan_frame_chunks((10, 10, 10), 0, 100),
        lambda: plan_frame_chunks((10, 10, 10), 4, 0),
        lambda: plan_frame_chunks((10, 10, 10), 4, -5),
        lambda: plan_frame_chunks((10, 10, 10), 4, 100, min_frames=0),
        lambda: plan_frame_chunks((10, 10), 4, 100),
        lambda: plan_pixel_chunks((10, -1, 10), 4, 100),
        lambda: plan_pixel_chunks((10, 10, 10), 4, 0),
        lambda: plan_pixel_chunks((10, 10, 10), 4, 100, safety_factor=0),
    ],
)
def test_non_positive_inputs_raise(call):
    with pytest.raises(ParameterError):
        call()


@pytest.mark.parametrize(
    "text, expected",
    [
        ("512MB", 512 * 10**6),
        ("2GiB", 2 * 2**30),
        ("2gib", 2 * 2**30),
        ("1.5 GB", 1_500_000_000),
        ("300k", 300_000),
        ("64MiB", 64 << 20),
        ("1000", 1000),
        ("1e6", 1_000_000),
        (4096, 4096),
    ],
)
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


@given(
    n=st.integers(1, 10**6),
    unit=st.sampled_from(["B", "kB", "MB", "GB", "KiB", "MiB", "GiB", "TiB"]),
)
def test_parse_memory_units_scale(n, unit):
    factor = {
        "B": 1,
        "kB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "KiB": 2**10,
        "MiB": 2**20,
        "GiB": 2**30,
        "TiB": 2**40,
    }[unit]
    assert parse_memory(f"{n}{unit}") == n * factor
    assert parse_memory(f"{n} {unit.upper()}") == n * factor


@pytest.mark.parametrize(
    "bad", ["", "lots", "12 parsecs", "MB", "0MB", "-5GB", 0, -1, True, 1.5, None]
)
def test_parse_memory_rejects(bad):
    with pytest.raises(ParameterError):
        parse_memory(bad)
