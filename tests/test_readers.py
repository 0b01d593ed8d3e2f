"""Input readers: every format, pixel-exact, lazy, with clear errors on bad input."""

from __future__ import annotations

import os
import pickle
import uuid
from datetime import datetime, timezone
from pathlib import Path

import dask.array as da
import fsspec
import h5py
import numpy as np
import pytest
import tifffile
import zarr

from somaflow.errors import InputError, ParameterError, StoreError
from somaflow.io import readers
from somaflow.io.readers import check_finite_sample, detect_format, load_suite2p_ops, open_input

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
T, Y, X = 12, 20, 24


@pytest.fixture()
def movie() -> np.ndarray:
    """A seeded (frame, y, x) uint16 movie."""
    return np.random.default_rng(0).integers(0, 4000, (T, Y, X), dtype=np.uint16)


@pytest.fixture()
def movie8() -> np.ndarray:
    """A seeded (frame, y, x) uint8 movie for video codecs."""
    return np.random.default_rng(1).integers(0, 256, (T, Y, X), dtype=np.uint8)


def assert_lazy_movie(
    m, expected: np.ndarray, fmt: str, frames_per_chunk: int | None = None
) -> None:
    """dims, dask backing, frame-only chunks, pixel-exact content, picklable graph."""
    assert m.dims == ("frame", "y", "x")
    assert isinstance(m.data, da.Array)
    assert m.attrs["format"] == fmt
    assert len(m.data.chunks[1]) == 1 and len(m.data.chunks[2]) == 1
    if frames_per_chunk is not None:
        assert m.data.chunks[0][0] == min(frames_per_chunk, expected.shape[0])
    assert m.dtype == expected.dtype
    np.testing.assert_array_equal(m.values, expected)
    np.testing.assert_array_equal(m[3:7, 2:9, 5].values, expected[3:7, 2:9, 5])
    clone = pickle.loads(pickle.dumps(m.data))  # the graph travels to distributed workers
    np.testing.assert_array_equal(clone[-2:].compute(), expected[-2:])


# ----------------------------------------------------------------------------- TIFF


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("stack.tif", {}),
        ("big.btf", {"bigtiff": True}),
        ("deflate.tiff", {"compression": "zlib"}),
        ("plain.tif", {"metadata": None}),
    ],
)
def test_tiff_variants_pixel_exact(tmp_path, movie, name, kwargs):
    path = tmp_path / name
    tifffile.imwrite(path, movie, **kwargs)
    m = open_input(str(path), frames_per_chunk=5)
    assert m.attrs["source"] == str(path)
    assert "fps" not in m.attrs
    assert_lazy_movie(m, movie, "tiff", frames_per_chunk=5)


def test_imagej_tiff_frame_interval_gives_fps(tmp_path, movie):
    path = tmp_path / "ij.tif"
    tifffile.imwrite(path, movie, imagej=True, metadata={"axes": "TYX", "finterval": 0.05})
    m = open_input(str(path))
    assert m.attrs["fps"] == pytest.approx(20.0)
    assert_lazy_movie(m, movie, "tiff")


def test_shaped_tiff_metadata_fps(tmp_path, movie):
    path = tmp_path / "meta.tif"
    tifffile.imwrite(path, movie, metadata={"fps": 7.5})
    assert open_input(str(path)).attrs["fps"] == 7.5


def test_tiff_channel_axis_needs_a_selection(tmp_path, movie):
    two = np.stack([movie, movie[::-1]], axis=1)  # (t, c, y, x)
    path = tmp_path / "tcyx.tif"
    tifffile.imwrite(path, two, imagej=True, metadata={"axes": "TCYX"})
    with pytest.raises(InputError, match="axes 'tyx' names 3"):
        open_input(str(path))
    with pytest.raises(InputError, match="2 channels.*channel=INDEX"):
        open_input(str(path), axes="tcyx")
    m = open_input(str(path), axes="tcyx", channel=1)
    np.testing.assert_array_equal(m.values, movie[::-1])
    with pytest.raises(ParameterError, match="channel=2 is out of range"):
        open_input(str(path), axes="tcyx", channel=2)


def test_tiff_folder_natural_order(tmp_path, movie):
    folder = tmp_path / "frames"
    folder.mkdir()
    for t in range(T):  # frame_2 must come before frame_10
        tifffile.imwrite(folder / f"frame_{t}.tif", movie[t])
    (folder / "notes.txt").write_text("not a frame")
    assert detect_format(str(folder)) == "tiff-folder"
    m = open_input(str(folder), frames_per_chunk=5)
    assert_lazy_movie(m, movie, "tiff-folder", frames_per_chunk=5)


def test_tiff_folder_of_stacks(tmp_path, movie):
    folder = tmp_path / "stacks"
    folder.mkdir()
    tifffile.imwrite(folder / "part1.tif", movie[:7])
    tifffile.imwrite(folder / "part2.tif", movie[7:])
    assert_lazy_movie(open_input(str(folder), frames_per_chunk=4), movie, "tiff-folder", 4)


def test_tiff_folder_mismatched_frame_fails(tmp_path, movie):
    folder = tmp_path / "odd"
    folder.mkdir()
    for t in range(4):
        tifffile.imwrite(folder / f"f{t}.tif", movie[t] if t != 2 else movie[t, :10])
    m = open_input(str(folder))
    with pytest.raises(InputError, match="same frame size"):
        m.compute()


# ----------------------------------------------------------------------------- HDF5


def test_hdf5_yxt_axes(tmp_path, movie):
    path = tmp_path / "m.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset(
            "imaging", data=np.moveaxis(movie, 0, -1), chunks=(10, 12, 3), compression="gzip"
        )
        f["imaging"].attrs["frame_rate"] = 15.0
    m = open_input(str(path), axes="yxt", frames_per_chunk=5)
    assert m.attrs["dataset"] == "/imaging"
    assert m.attrs["fps"] == 15.0
    assert_lazy_movie(m, movie, "hdf5", 5)


def test_hdf5_several_datasets_need_dataset(tmp_path, movie):
    path = tmp_path / "two.hdf5"
    with h5py.File(path, "w") as f:
        f.create_dataset("raw", data=movie)
        f.create_dataset("group/registered", data=movie[::-1])
        f.create_dataset("mean", data=movie.mean(0))
    with pytest.raises(
        InputError, match=r"several 3-D datasets: /group/registered .*/raw.*--dataset"
    ):
        open_input(str(path))
    np.testing.assert_array_equal(
        open_input(str(path), dataset="group/registered").values, movie[::-1]
    )
    with pytest.raises(InputError, match="'missing'.*Available datasets"):
        open_input(str(path), dataset="missing")


def test_hdf5_5d_singleton_axes_squeezed(tmp_path, movie):
    path = tmp_path / "sima.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("imaging", data=movie[:, None, :, :, None])  # t z y x c
        f.create_dataset("two_channels", data=np.stack([movie, movie + 1], axis=-1)[:, None])
    m = open_input(str(path), dataset="imaging", axes="tzyxc")
    assert_lazy_movie(m, movie, "hdf5")
    with pytest.raises(InputError, match="2 channels"):
        open_input(str(path), dataset="two_channels", axes="tzyxc")
    m1 = open_input(str(path), dataset="two_channels", axes="tzyxc", channel=1)
    np.testing.assert_array_equal(m1.values, movie + 1)


# ----------------------------------------------------------------------------- video


def write_video(path: Path, frames: np.ndarray, codec: str, pix_fmt: str, fps: int = 20) -> None:
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format=pix_fmt)):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


@pytest.mark.parametrize(
    "name, codec, pix_fmt, dtype",
    [
        ("ffv1.avi", "ffv1", "gray", np.uint8),
        ("raw.avi", "rawvideo", "gray", np.uint8),
        ("ffv1.mkv", "ffv1", "gray", np.uint8),  # mkv records no frame count
        ("deep.avi", "ffv1", "gray16le", np.uint16),
    ],
)
def test_video_lossless_pixel_exact(tmp_path, movie8, name, codec, pix_fmt, dtype):
    frames = movie8.astype(dtype) * (200 if dtype == np.uint16 else 1)
    path = tmp_path / name
    write_video(path, frames, codec, pix_fmt)
    assert detect_format(str(path)) == "avi"
    m = open_input(str(path), frames_per_chunk=5)  # chunks 2 and 3 start with a seek
    assert m.attrs["fps"] == 20.0
    assert_lazy_movie(m, frames, "avi", 5)


def test_inter_frame_codec_seeks_to_the_right_frames(tmp_path):
    import av

    levels = (np.arange(30) * 7 + 20).astype(np.uint8)  # frame t is flat at level t
    path = tmp_path / "gop.mp4"
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=25, options={"g": "4", "bf": "2"})
        s.width, s.height, s.pix_fmt = 48, 32, "yuv420p"
        for v in levels:
            for p in s.encode(
                av.VideoFrame.from_ndarray(np.full((32, 48), v, np.uint8), format="gray")
            ):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    with av.open(str(path)) as c:  # reference: decode every frame in order
        reference = np.stack([f.to_ndarray(format="gray") for f in c.decode(c.streams.video[0])])
    m = open_input(str(path), frames_per_chunk=4)  # most chunks start between keyframes
    assert m.shape == (30, 32, 48) and m.attrs["fps"] == 25.0
    np.testing.assert_array_equal(m.values, reference)
    assert np.abs(reference[:, 16, 24].astype(int) - levels).max() < 7  # frames in order


def test_grey_rgb_video_accepted_colour_refused(tmp_path, movie8):
    grey = tmp_path / "grey.avi"
    write_video(grey, np.repeat(movie8[..., None], 3, -1), "rawvideo", "rgb24")
    np.testing.assert_array_equal(open_input(str(grey)).values, movie8)
    colour = tmp_path / "colour.avi"
    rgb = np.stack([movie8, movie8[::-1], movie8], -1)
    write_video(colour, rgb, "rawvideo", "rgb24")
    with pytest.raises(InputError, match="colour video"):
        open_input(str(colour)).compute()


# ----------------------------------------------------------------------------- NWB


def write_nwb(
    path: Path, series: dict[str, np.ndarray], rate: float = 30.0, timestamps: bool = False
) -> None:
    from pynwb import NWBHDF5IO, NWBFile
    from pynwb.ophys import OnePhotonSeries, OpticalChannel, TwoPhotonSeries

    nwb = NWBFile(
        session_description="test",
        identifier=uuid.uuid4().hex,
        session_start_time=datetime(2024, 1, 1, tzinfo=timezone.utc),
    )
    device = nwb.create_device(name="scope")
    channel = OpticalChannel(name="green", description="", emission_lambda=510.0)
    plane = nwb.create_imaging_plane(
        name="plane",
        optical_channel=channel,
        description="",
        device=device,
        excitation_lambda=920.0,
        indicator="GCaMP6",
        location="V1",
        imaging_rate=rate,
        grid_spacing=[1.2e-6, 1.2e-6],
        grid_spacing_unit="meters",
    )
    classes = {"TwoPhotonSeries": TwoPhotonSeries, "OnePhotonSeries": OnePhotonSeries}
    for name, data in series.items():
        timing = {"timestamps": np.arange(len(data)) / rate} if timestamps else {"rate": rate}
        nwb.add_acquisition(
            classes[name](name=name, data=data, imaging_plane=plane, unit="a.u.", **timing)
        )
    with NWBHDF5IO(str(path), "w") as io:
        io.write(nwb)


def test_nwb_two_photon_series(tmp_path, movie):
    path = tmp_path / "s.nwb"
    write_nwb(path, {"TwoPhotonSeries": movie}, rate=30.0)
    m = open_input(str(path), frames_per_chunk=4)
    assert m.attrs["fps"] == 30.0
    assert m.attrs["pixel_size_um"] == pytest.approx(1.2)  # the imaging plane's grid spacing
    assert m.attrs["dataset"] == "/acquisition/TwoPhotonSeries/data"
    assert_lazy_movie(m, movie, "nwb", 4)


def test_nwb_one_photon_series_with_timestamps_and_choice(tmp_path, movie):
    path = tmp_path / "both.nwb"
    write_nwb(
        path, {"TwoPhotonSeries": movie, "OnePhotonSeries": movie[::-1]}, rate=10.0, timestamps=True
    )
    with pytest.raises(InputError, match="several imaging series.*OnePhotonSeries.*--dataset"):
        open_input(str(path))
    m = open_input(str(path), dataset="OnePhotonSeries")
    assert m.attrs["fps"] == pytest.approx(10.0)
    assert m.attrs["nwb_type"] == "OnePhotonSeries"
    assert_lazy_movie(m, movie[::-1], "nwb")
    with pytest.raises(InputError, match="no single imaging series named 'Nope'"):
        open_input(str(path), dataset="Nope")


# ----------------------------------------------------------------------------- zarr


def test_zarr_bare_array_and_group(tmp_path, movie):
    arr_path = tmp_path / "bare.zarr"
    z = zarr.create_array(str(arr_path), shape=movie.shape, chunks=(3, Y, X), dtype=movie.dtype)
    z[:] = movie
    z.attrs["fps"] = 12.5
    m = open_input(str(arr_path), frames_per_chunk=5)
    assert m.attrs["fps"] == 12.5
    assert_lazy_movie(m, movie, "zarr", 5)

    grp_path = tmp_path / "group"  # no .zarr suffix: detected by zarr.json
    g = zarr.open_group(str(grp_path), mode="w")
    g.create_array("a", data=movie)
    g.create_array("sub/yxt", data=np.moveaxis(movie, 0, -1))
    assert detect_format(str(grp_path)) == "zarr"
    with pytest.raises(InputError, match="several arrays.*--dataset"):
        open_input(str(grp_path))
    m2 = open_input(str(grp_path), dataset="sub/yxt", axes="yxt")
    assert m2.attrs["dataset"] == "sub/yxt"
    assert_lazy_movie(m2, movie, "zarr")


def test_zarr_somaflow_movie(tmp_path, movie):
    import xarray as xr

    from somaflow.io.schema import make_movie_dataset, write_movie

    url = str(tmp_path / "movie.zarr")
    ds = make_movie_dataset(
        xr.DataArray(da.from_array(movie, chunks=(4, Y, X)), dims=("frame", "y", "x")),
        fps=9.0,
        modality="1p",
        source="/raw/movie.tif",
        source_checksum="blake2b:00",
    )
    write_movie(ds, url)
    m = open_input(url, frames_per_chunk=6)
    assert m.attrs["fps"] == 9.0 and m.attrs["modality"] == "1p"
    assert m.attrs["source"] == "/raw/movie.tif"  # provenance of the ingested movie is kept
    assert_lazy_movie(m, movie, "zarr", 6)
    with pytest.raises(ParameterError, match="named dims"):
        open_input(url, axes="yxt")


# ----------------------------------------------------------------------------- Suite2p


def write_suite2p(folder: Path, movie: np.ndarray, **extra) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    movie.astype(np.int16).tofile(folder / "data.bin")
    ops = {
        "Ly": np.int64(movie.shape[1]),
        "Lx": movie.shape[2],
        "nframes": movie.shape[0],
        "fs": np.float64(31.0),
        "meanImg": movie.mean(0),
        "save_path": str(folder),
    }
    ops.update(extra)
    np.save(folder / "ops.npy", ops, allow_pickle=True)
    return folder


def test_suite2p_folder_and_bin(tmp_path, movie):
    m16 = movie.astype(np.int16)
    folder = write_suite2p(tmp_path / "suite2p" / "plane0", m16)
    assert detect_format(str(folder)) == "suite2p-bin"
    assert detect_format(str(folder / "data.bin")) == "suite2p-bin"
    m = open_input(str(folder), frames_per_chunk=5)
    assert m.attrs["fps"] == 31.0
    assert_lazy_movie(m, m16, "suite2p-bin", 5)
    assert_lazy_movie(open_input(str(folder / "data.bin")), m16, "suite2p-bin")


class _Evil:
    def __reduce__(self):
        return (os.getcwd, ())


def test_suite2p_ops_restricted_unpickling(tmp_path, movie):
    folder = write_suite2p(tmp_path / "evil", movie.astype(np.int16), payload=_Evil())
    with pytest.raises(InputError, match="refusing to load.*posix.getcwd|refusing to load.*getcwd"):
        load_suite2p_ops(str(folder / "ops.npy"))
    with pytest.raises(InputError, match="refusing"):
        open_input(str(folder))
    np.save(folder / "ops.npy", np.zeros(3))
    with pytest.raises(InputError, match="not Suite2p's pickled ops dict"):
        open_input(str(folder))
    np.save(folder / "ops.npy", np.array([1, 2], dtype=object)[:1].reshape(()), allow_pickle=True)
    with pytest.raises(InputError, match="not Suite2p's ops dict"):
        load_suite2p_ops(str(folder / "ops.npy"))


def test_suite2p_truncated_and_missing_ops(tmp_path, movie):
    folder = write_suite2p(tmp_path / "short", movie.astype(np.int16))
    data = (folder / "data.bin").read_bytes()
    (folder / "data.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated"):
        open_input(str(folder))
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "movie.bin").write_bytes(data)
    with pytest.raises(InputError, match="without an ops.npy"):
        open_input(str(lone / "movie.bin"))


# ----------------------------------------------------------------------------- laziness


def test_reading_happens_per_chunk_not_at_open(tmp_path, movie, monkeypatch):
    path = tmp_path / "lazy.tif"
    tifffile.imwrite(path, movie)
    reads: list = []
    original = readers.tiff._TiffSource._read
    monkeypatch.setattr(
        readers.tiff._TiffSource, "_read", lambda self, key: reads.append(key) or original(self, key)
    )
    m = open_input(str(path), frames_per_chunk=4)
    assert reads == [] and m.data.numblocks == (3, 1, 1)
    np.testing.assert_array_equal(m[5].values, movie[5])
    assert len(reads) == 1  # one read, of frame 5 only: the slice reached the reader
    assert np.atleast_1d(np.arange(T)[reads[0][0]]).tolist() == [5]
    # new pixels written after opening are what a compute sees: nothing was cached
    tifffile.imwrite(path, movie[::-1])
    np.testing.assert_array_equal(m.values, movie[::-1])


def test_hdf5_not_read_at_open(tmp_path, movie):
    path = tmp_path / "lazy.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("m", data=movie)
    m = open_input(str(path), frames_per_chunk=3)
    with h5py.File(path, "r+") as f:
        f["m"][...] = movie[::-1]
    np.testing.assert_array_equal(m.values, movie[::-1])


def test_chunks_planned_from_budget(tmp_path, movie):
    path = tmp_path / "plan.tif"
    tifffile.imwrite(path, movie)
    frame_bytes = Y * X * 2 * 4  # uint16, safety factor 4
    m = open_input(str(path), memory_budget=3 * frame_bytes)
    assert m.data.chunks[0] == (3, 3, 3, 3)
    with pytest.raises(ParameterError, match="frames_per_chunk"):
        open_input(str(path), frames_per_chunk=0)


# ----------------------------------------------------------------------------- remote


def test_memory_filesystem_tiff_hdf5_zarr_suite2p(tmp_path, movie):
    fs = fsspec.filesystem("memory")
    root = f"memory://readers-{uuid.uuid4().hex[:8]}"
    tifffile.imwrite(tmp_path / "m.tif", movie, compression="zlib")
    fs.pipe(f"{root}/m.tif", (tmp_path / "m.tif").read_bytes())
    assert_lazy_movie(open_input(f"{root}/m.tif", frames_per_chunk=5), movie, "tiff", 5)

    with h5py.File(tmp_path / "m.h5", "w") as f:
        f.create_dataset("imaging", data=np.moveaxis(movie, 0, -1))
    fs.pipe(f"{root}/m.h5", (tmp_path / "m.h5").read_bytes())
    m = open_input(f"{root}/m.h5", axes="yxt", frames_per_chunk=5)
    assert m.attrs["source"] == f"{root}/m.h5"
    assert_lazy_movie(m, movie, "hdf5", 5)

    z = zarr.create_array(f"{root}/m.zarr", shape=movie.shape, chunks=(4, Y, X), dtype=movie.dtype)
    z[:] = movie
    assert_lazy_movie(open_input(f"{root}/m.zarr"), movie, "zarr")

    m16 = movie.astype(np.int16)
    folder = write_suite2p(tmp_path / "s2p", m16)
    for name in ("data.bin", "ops.npy"):
        fs.pipe(f"{root}/s2p/{name}", (folder / name).read_bytes())
    assert_lazy_movie(open_input(f"{root}/s2p", frames_per_chunk=5), m16, "suite2p-bin", 5)
    fs.rm(root.replace("memory://", "/"), recursive=True)


# ----------------------------------------------------------------------------- bad input


def test_detect_format_by_extension_and_unknown(tmp_path):
    for name, fmt in [
        ("a.tif", "tiff"),
        ("a.TIFF", "tiff"),
        ("a.btf", "tiff"),
        ("a.h5", "hdf5"),
        ("a.hdf5", "hdf5"),
        ("a.avi", "avi"),
        ("a.mp4", "avi"),
        ("a.mkv", "avi"),
        ("a.nwb", "nwb"),
        ("a.zarr", "zarr"),
    ]:
        (tmp_path / name).write_bytes(b"x")
        assert detect_format(str(tmp_path / name)) == fmt
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match="Supported inputs: TIFF.*HDF5.*NWB.*zarr.*Suite2p"):
        detect_format(str(tmp_path / "notes.txt"))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(InputError, match="cannot tell the format"):
        open_input(str(tmp_path / "empty_dir"))


def test_missing_file_is_store_error(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        open_input(str(tmp_path / "nope.tif"))


def test_empty_file(tmp_path):
    (tmp_path / "empty.tif").write_bytes(b"")
    with pytest.raises(InputError, match="is empty"):
        open_input(str(tmp_path / "empty.tif"))


def test_single_image_and_single_frame(tmp_path, movie):
    tifffile.imwrite(tmp_path / "one.tif", movie[0])
    with pytest.raises(InputError, match=r"single 2-D image.*needs a movie \(frame, y, x\)"):
        open_input(str(tmp_path / "one.tif"))
    with h5py.File(tmp_path / "one.h5", "w") as f:
        f.create_dataset("m", data=movie[:1])
    with pytest.raises(InputError, match="1 frame.*at least 2"):
        open_input(str(tmp_path / "one.h5"))


def test_non_numeric_dtype(tmp_path, movie):
    with h5py.File(tmp_path / "bool.h5", "w") as f:
        f.create_dataset("m", data=movie > 100)
    with pytest.raises(InputError, match="bool pixels, not numbers"):
        open_input(str(tmp_path / "bool.h5"), dataset="m")


def test_not_really_hdf5(tmp_path):
    (tmp_path / "fake.h5").write_bytes(b"this is not hdf5 at all")
    with pytest.raises(InputError, match="cannot open .* as HDF5"):
        open_input(str(tmp_path / "fake.h5"))


@pytest.mark.parametrize(
    "kwargs", [{}, {"compression": "zlib"}, {"metadata": None}, {"bigtiff": True}]
)
@pytest.mark.parametrize("keep", [0.97, 0.5])
def test_truncated_tiff_detected_at_open(tmp_path, movie, kwargs, keep):
    path = tmp_path / "cut.tif"
    tifffile.imwrite(path, movie, **kwargs)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(InputError, match="truncated or corrupt"):
        open_input(str(path))


def test_bad_parameters(tmp_path, movie):
    tifffile.imwrite(tmp_path / "m.tif", movie)
    with pytest.raises(ParameterError, match="axes must name t, y and x"):
        open_input(str(tmp_path / "m.tif"), axes="tyy")
    with pytest.raises(ParameterError, match="--dataset applies to HDF5"):
        open_input(str(tmp_path / "m.tif"), dataset="x")


# ----------------------------------------------------------------------------- sample check


def test_check_finite_sample(tmp_path, movie):
    good = movie.astype(np.float32)
    path = tmp_path / "f.h5"
    bad = good.copy()
    bad[11, 3, 4] = np.nan  # the last frame is always sampled
    with h5py.File(path, "w") as f:
        f.create_dataset("good", data=good)
        f.create_dataset("bad", data=bad)
        f.create_dataset("flat", data=np.full_like(good, 7))
    check_finite_sample(open_input(str(path), dataset="good"))
    with pytest.raises(InputError, match="frame 11 contains NaN"):
        check_finite_sample(open_input(str(path), dataset="bad"))
    with pytest.raises(InputError, match="the movie is constant"):
        check_finite_sample(open_input(str(path), dataset="flat"), n_frames=4)


# ----------------------------------------------------------------------------- real data


REAL = [
    ("neurofinder_left/movie.tif", {}, (600, 512, 256), np.uint16),
    ("miniscope_1p/movie.tif", {}, (400, 480, 752), np.uint8),
    ("thunder_mouse_2p/movie.tif", {}, (500, 64, 64), np.int16),
    ("sima_example/example.tif", {}, (20, 128, 256), np.uint16),
    ("sima_example/example.h5", {"axes": "yxt", "dataset": "imaging"}, (20, 128, 256), np.uint16),
]


@pytest.mark.parametrize("rel, kwargs, shape, dtype", REAL, ids=[r[0] for r in REAL])
def test_real_files_open_with_right_shape(rel, kwargs, shape, dtype):
    path = DATA / rel
    if not path.exists():
        pytest.skip(f"{path} is not present")
    m = open_input(str(path), **kwargs)
    assert m.shape == shape and m.dtype == dtype
    assert isinstance(m.data, da.Array)
    check_finite_sample(m, n_frames=4)


def test_sima_h5_equals_sima_tif():
    h5, tif = DATA / "sima_example" / "example.h5", DATA / "sima_example" / "example.tif"
    if not (h5.exists() and tif.exists()):
        pytest.skip("SIMA example data is not present")
    a = open_input(str(h5), axes="yxt", dataset="imaging").values
    np.testing.assert_array_equal(a, open_input(str(tif)).values)
