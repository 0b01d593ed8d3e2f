"""The result as other tools see it: coordinates, units, the label image, zarr v3 strings."""

from __future__ import annotations

import json
import warnings

import dask.array as da
import numpy as np
import pytest
import xarray as xr

from somaflow.io import schema


def _variables(masks: np.ndarray, score: np.ndarray, n_frames: int = 12) -> dict:
    n, ny, nx = masks.shape
    z = np.zeros
    return {"masks": masks, "footprints": masks.astype(np.float32), "traces": z((n, n_frames), np.float32),
            "dff": z((n, n_frames), np.float32), "spikes": z((n, n_frames), np.float32),
            "accepted": np.ones(n, bool), "score": score.astype(np.float32),
            "mean_image": z((ny, nx), np.float32), "max_image": z((ny, nx), np.float32),
            "correlation_image": z((ny, nx), np.float32), "shifts": z((n_frames, 2), np.float32)}


def _overlapping() -> tuple[np.ndarray, np.ndarray]:
    m = np.zeros((3, 10, 12), bool)
    m[0, 1:5, 1:5] = True
    m[1, 3:8, 3:8] = True  # overlaps unit 0 at [3:5, 3:5]
    m[2, 7:9, 9:11] = True  # apart from the others
    return m, np.array([0.3, 0.9, 0.5])


def test_label_image_gives_overlaps_to_the_higher_score():
    masks, score = _overlapping()
    labels = schema.label_image(masks, score)
    assert labels.dtype == np.int32 and labels.shape == (10, 12)
    assert labels[0, 0] == 0 and labels[1, 1] == 1 and labels[4, 4] == 2 and labels[8, 10] == 3
    assert labels[3, 3] == 2  # shared pixel: unit 1 (score 0.9) over unit 0 (0.3)
    flipped = schema.label_image(masks, np.array([0.95, 0.9, 0.5]))
    assert flipped[3, 3] == 1
    tied = schema.label_image(masks, np.array([0.5, 0.5, 0.5]))
    assert tied[3, 3] == 1  # equal scores: the lower unit id
    # every labelled pixel lies in the mask of the unit it names
    for value in np.unique(labels[labels > 0]):
        assert masks[value - 1][labels == value].all()
    lazy = schema.label_image(da.from_array(masks, chunks=(2, 5, 12)), score)
    assert isinstance(lazy, da.Array)
    np.testing.assert_array_equal(lazy.compute(), labels)
    assert schema.label_image(np.zeros((0, 4, 5), bool), np.zeros(0)).tolist() == np.zeros((4, 5), int).tolist()


def test_result_coordinates_units_and_labels(tmp_path):
    masks, score = _overlapping()
    ds = schema.make_result_dataset(_variables(masks, score), params={}, source="s", source_checksum="c",
                                    fps=4.0, modality="2p", pixel_size_um=0.8)
    url = schema.write_result(ds, str(tmp_path / "r.zarr"))
    r = xr.open_zarr(url, consolidated=False)
    assert r["unit"].values.tolist() == [0, 1, 2]
    np.testing.assert_allclose(r["time"].values, np.arange(12) / 4.0)
    assert r["time"].dims == ("frame",) and r["time"].attrs["units"] == "s"
    assert r["axis"].values.tolist() == ["y", "x"]
    assert r["y"].attrs["units"] == "pixel" and r["x"].attrs["pixel_size_um"] == 0.8
    assert r.attrs["pixel_size_um"] == 0.8
    for name in ("masks", "traces", "dff", "spikes", "score", "shifts", "mean_image", "labels"):
        assert r[name].attrs["units"] and r[name].attrs["long_name"], name
    assert r["dff"].attrs["units"] == "1" and r["shifts"].attrs["units"] == "pixel"
    np.testing.assert_array_equal(r["labels"].values, schema.label_image(masks, score))
    # napari's labels layer takes a non-negative integer image
    assert r["labels"].dtype.kind == "i" and int(r["labels"].min()) >= 0


def test_strings_are_zarr_v3_strings(tmp_path):
    """Fixed-length unicode arrays are written as zarr v3's `string` type: no
    UnstableSpecificationWarning, and another reader finds the registered data type."""
    masks, score = _overlapping()
    variables = {**_variables(masks, score), "kind": ("unit", np.array(["cnmf", "morphology", "cnmf"]))}
    ds = schema.make_result_dataset(variables, params={}, source="s", source_checksum="c", fps=4.0, modality="2p")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        url = schema.write_result(ds, str(tmp_path / "r.zarr"))
    for name in ("kind", "axis"):
        meta = json.loads((tmp_path / "r.zarr" / name / "zarr.json").read_text())
        assert meta["data_type"] == "string", meta
    r = schema.open_result(url)
    assert r["kind"].values.tolist() == ["cnmf", "morphology", "cnmf"]


@pytest.mark.parametrize("n", [0, 1])
def test_small_results_still_validate(tmp_path, n):
    masks = np.zeros((n, 6, 7), bool)
    masks[:, 2:4, 2:4] = True
    ds = schema.make_result_dataset(_variables(masks, np.ones(n)), params={}, source="s", source_checksum="c",
                                    fps=2.0, modality="1p")
    r = schema.open_result(schema.write_result(ds, str(tmp_path / "r.zarr")))
    assert r.sizes["unit"] == n and int(r["labels"].max()) == n


@pytest.mark.parametrize("kind", ["imagej", "ome", "none"])
def test_pixel_size_is_read_where_the_file_records_it(tmp_path, kind):
    import tifffile

    from somaflow.io.ingest import load_movie

    frames = np.random.default_rng(0).integers(0, 500, (6, 16, 20), dtype=np.uint16)
    path = tmp_path / f"{kind}.tif"
    if kind == "imagej":  # 1.25 pixels per micron
        tifffile.imwrite(path, frames, imagej=True, resolution=(1.25, 1.25), metadata={"unit": "um", "axes": "TYX"})
    elif kind == "ome":
        tifffile.imwrite(path, frames, ome=True, metadata={"axes": "TYX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
    else:
        tifffile.imwrite(path, frames)
    movie = load_movie(str(path), fps=10.0, with_checksum=False)
    expected = {"imagej": 0.8, "ome": 0.5}.get(kind)
    if expected is None:
        assert "pixel_size_um" not in movie.attrs
    else:
        assert movie.attrs["pixel_size_um"] == pytest.approx(expected)


def test_a_write_on_local_threads_leaves_other_threads_scheduler_alone(tmp_path):
    """An archive runs its sessions in threads that share one distributed client. A write that
    picks the threaded scheduler for itself must not switch it for the whole process (a global
    ``dask.config.set``): another session's computation on persisted futures would then run on
    the local scheduler and fail with "Missing dependency"."""
    import threading

    import dask

    started, release = threading.Event(), threading.Event()

    def block(x):
        started.set()
        assert release.wait(30)
        return x

    data = da.zeros((4, 8), dtype=np.float32, chunks=(4, 8)).map_blocks(block, meta=np.empty((0, 0), np.float32))
    ds = xr.Dataset({"a": (("y", "x"), data)})
    before = dask.config.get("scheduler", None)
    writer = threading.Thread(target=schema.write_dataset, args=(ds, str(tmp_path / "a.zarr")),
                              kwargs={"scheduler": "threads"})
    writer.start()
    try:
        assert started.wait(30)
        seen = dask.config.get("scheduler", None)  # while the write is computing
    finally:
        release.set()
        writer.join(30)
    assert seen == before
    assert xr.open_zarr(str(tmp_path / "a.zarr"), consolidated=False)["a"].shape == (4, 8)
