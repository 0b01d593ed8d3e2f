"""The CNNs inside the pipeline: training recipes, checkpoints in a run, the classifier
stage, fine-tuning and the out-of-distribution warning."""

from __future__ import annotations

import json

import numpy as np
import pydantic
import pytest
import xarray as xr

from conftest import run_cli
from somaflow.io import schema
from somaflow.nn.features import candidate_examples, masked_mean_images
from somaflow.training.detector_sets import simulated_detector_set

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def unet_weights(tmp_path_factory):
    """A U-Net trained briefly on two tiny 2p sessions (seconds on a CPU)."""
    from somaflow.training.recipes import train_model

    out = tmp_path_factory.mktemp("weights") / "unet2d.safetensors"
    summary = train_model("unet2d", str(out), presets=["2p-small"], seeds=[1000, 1001], epochs=3,
                          n_frames=100, threads=1, config={"width": 8}, n_crops=24, batch_size=8,
                          device="cpu")
    return out, summary


def test_training_writes_a_complete_checkpoint(unet_weights):
    from somaflow.nn import load_checkpoint

    out, summary = unet_weights
    model, meta = load_checkpoint(str(out))
    assert meta["model"] == "unet2d"
    m = meta["metrics"]
    assert 0 < m["threshold"] < 1 and 0 <= m["val_session_f1"] <= 1
    assert m["val_sessions"] == ["2p-small:1100", "2p-small:1101"]
    assert meta["training"]["presets"] == ["2p-small"] and meta["training"]["seeds"] == [1000, 1001]
    assert meta["input_stats"]["modality"] == ["2p"]
    assert meta["input_stats"]["neuron_radius"]["min"] == 5.0
    assert summary["metrics"]["threshold"] == m["threshold"]
    # the overrides reached the model and the loop
    assert meta["config"]["width"] == 8 and model.config["width"] == 8
    assert meta["training"]["params"]["batch_size"] == 8 and summary["n_examples"] == 48
    assert meta["training"]["params"]["device"] == "cpu"


def test_parallel_session_preparation_gives_the_same_examples():
    """--jobs prepares simulated sessions in processes; each draws from its own child generator."""

    kw = dict(crop=32, n_crops=3, n_frames=60, target="separated")
    x1, y1, s1 = simulated_detector_set("unet2d", ["2p-small"], [1000, 1001], rng=np.random.default_rng(5), **kw)
    x2, y2, s2 = simulated_detector_set("unet2d", ["2p-small"], [1000, 1001], rng=np.random.default_rng(5),
                                           jobs=2, **kw)
    assert x1.shape == (6, 4, 32, 32) and np.array_equal(x1, x2) and np.array_equal(y1, y2)
    assert [s["seed"] for s in s2] == [1000, 1001]
    # different sessions got different crops (not one generator state reused)
    assert not np.array_equal(x1[:3], x1[3:])


def test_training_device_selection():
    from somaflow.errors import ParameterError
    from somaflow.nn.train import TrainParams, resolve_device

    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ParameterError, match="no CUDA GPU"):
            resolve_device("cuda")
    with pytest.raises(ParameterError, match="'auto', 'cpu' or 'cuda"):
        resolve_device("tpu")
    with pytest.raises(ValueError):
        TrainParams(device="tpu")


def test_train_cli_reports_a_missing_gpu_before_making_data(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    r = run_cli("train", "unet2d", "--out", str(tmp_path / "w.safetensors"), "--device", "cuda", check=False)
    assert r.returncode != 0 and "no CUDA GPU" in r.stderr and "internal error" not in r.stderr
    assert not (tmp_path / "w.safetensors").exists()


def test_train_cli_parses_model_config():
    from somaflow.cli import _model_config
    from somaflow.errors import ParameterError

    assert _model_config(["width=12", "dropout=0.25", "trace_encoding=reshape"]) == {
        "width": 12, "dropout": 0.25, "trace_encoding": "reshape"}
    with pytest.raises(ParameterError, match="KEY=VALUE"):
        _model_config(["width"])


def test_training_lowers_the_loss():
    """A few epochs of the detector loop on a tiny problem: the loss goes down."""
    from somaflow.nn import build_model
    from somaflow.nn.train import TrainParams, train_detector

    rng = np.random.default_rng(0)
    y = np.zeros((12, 32, 32), np.uint8)
    for i in range(12):
        cy, cx = rng.integers(8, 24, 2)
        yy, xx = np.ogrid[:32, :32]
        y[i] = (yy - cy) ** 2 + (xx - cx) ** 2 <= 16
    x = (y[:, None].astype(np.float32) * 2 + rng.normal(0, 0.5, (12, 1, 32, 32))).astype(np.float32)
    torch.manual_seed(0)
    model = build_model("unet2d", in_channels=1, width=4, depth=2)
    hist = train_detector(model, x, y, TrainParams(epochs=6, batch_size=4, lr=1e-2, val_fraction=0.0, threads=1),
                          movie_input=False)
    assert hist.loss[-1] < 0.6 * hist.loss[0]


def test_fine_tuning_starts_from_the_weights(unet_weights, tmp_path):
    from somaflow.nn import load_checkpoint
    from somaflow.training.recipes import train_model

    base, _ = unet_weights
    tuned = tmp_path / "tuned.safetensors"
    train_model("unet2d", str(tuned), init=str(base), presets=["2p-lowsnr"], seeds=[1002], epochs=1,
                n_frames=100, threads=1)
    _, meta = load_checkpoint(str(tuned))
    assert meta["training"]["init"] == str(base)
    assert meta["training"]["init_training"]["presets"] == ["2p-small"]
    assert meta["training"]["params"]["lr"] == 2e-4  # the recipe's fine-tuning rate


def _images(sim) -> xr.Dataset:
    from somaflow.training.detector_sets import detection_summary_images, sim_movie

    m = sim.meta
    return detection_summary_images(sim_movie(sim), m["fps"], m["modality"], m["neuron_radius"])


def test_detect_cnn_finds_units_and_warns_out_of_distribution(unet_weights):
    from somaflow.detect.cnn import CnnParams, detect_cnn
    from somaflow.evaluate import match_iou
    from somaflow.simulate import simulate
    from somaflow.training.detector_sets import sim_movie

    out, _ = unet_weights
    sim = simulate("2p-small", seed=7, n_frames=100, motion="none")
    p = CnnParams.for_movie(10.0, "2p", 5.0).model_copy(update={"weights": {"unet2d": str(out)}})
    units = detect_cnn(sim_movie(sim), _images(sim), "unet2d", p, 5.0)
    assert units["masks"].dims == ("unit", "y", "x") and units["masks"].dtype == bool
    assert units.sizes["unit"] > 5
    assert float(units["score"].min()) >= 0 and float(units["score"].max()) <= 1
    assert units["cnn_probability"].dims == ("y", "x")
    assert json.loads(units.attrs["ood_warnings"]) == []
    assert match_iou(units["masks"].values, np.asarray(sim.masks, bool)).f1 > 0.3
    # a 1p movie with 3x larger cells is outside what this model saw
    sim1 = simulate("1p-small", seed=7, n_frames=100, motion="none")
    p1 = CnnParams.for_movie(10.0, "1p", 18.0).model_copy(update={"weights": {"unet2d": str(out)}})
    units1 = detect_cnn(sim_movie(sim1), _images(sim1), "unet2d", p1, 18.0)
    warnings = json.loads(units1.attrs["ood_warnings"])
    assert any("modality 1p" in w for w in warnings)
    assert any("radius" in w for w in warnings)


def test_stneuronet_batches_are_post_processed_on_the_workers_and_fused_in_order():
    # 100 frames at 10 Hz binned by 2, 10 binned frames per batch: 5 batches (an odd count for
    # the pairwise reduction); the units must be those of post-processing each batch's map and fusing
    # the dense masks of all batches in batch order, the probability their maximum
    from somaflow.detect.cnn import CnnParams, _batch_task, detect_cnn
    from somaflow.detect.postprocess import fuse_batches, probability_to_masks
    from somaflow.nn.inputs import batch_plan, pixel_statistics
    from somaflow.simulate import simulate
    from somaflow.training.detector_sets import sim_movie

    sim = simulate("2p-small", seed=8, n_frames=100, motion="none")
    movie = sim_movie(sim).chunk({"frame": 25})
    p = CnnParams.for_movie(10.0, "2p", 5.0)
    p = p.model_copy(update={"input": p.input.model_copy(update={"batch_frames": 10}), "ood_check": False})
    units = detect_cnn(movie, _images(sim), "stneuronet", p, 5.0)
    plan = batch_plan(100, p.input)
    assert len(plan) == 5
    cnn = json.loads(units.attrs["cnn"])
    thr = cnn["threshold"]
    assert cnn["views"] == 4 and cnn["rescue_threshold"] == 0.6
    post = p.postprocess.model_copy(update={"threshold": thr})
    stats = pixel_statistics(movie, max_frames=p.input.stats_frames)
    probs = [_batch_task("stneuronet", "default", movie.data[a:b], stats, p, None).prob for a, b in plan]
    expected = fuse_batches([probability_to_masks(q, post) for q in probs], post)
    assert units.sizes["unit"] == len(expected) > 5
    def keys(m):  # units are ordered by score: compare the sets of masks
        return sorted(x.tobytes() for x in np.packbits(m.reshape(len(m), -1), axis=1))

    assert keys(units["masks"].values) == keys(expected)
    np.testing.assert_array_equal(units["cnn_probability"].values, np.max(probs, axis=0))


def test_mean_image_convnet_grows_its_centroid_markers_on_the_mean_image():
    # the mean-image ConvNet marks centroids (its threshold was chosen for marker growth): its units are
    # the markers grown on the mean image, with no second pass
    from somaflow.detect.cnn import CnnParams, detect_cnn
    from somaflow.detect.postprocess import masks_from_centroids
    from somaflow.simulate import simulate
    from somaflow.training.detector_sets import sim_movie

    sim = simulate("2p-small", seed=9, n_frames=100, motion="none")
    images = _images(sim)
    p = CnnParams.for_movie(10.0, "2p", 5.0).model_copy(update={"ood_check": False})
    units = detect_cnn(sim_movie(sim), images, "meanimage2d", p, 5.0)
    cnn = json.loads(units.attrs["cnn"])
    assert cnn["rescue_threshold"] is None and cnn["views"] == 4
    post = p.postprocess.model_copy(update={"threshold": cnn["threshold"]})
    expected = masks_from_centroids(units["cnn_probability"].values,
                                    np.asarray(images["mean_image"].values, np.float32), post)
    def keys(m):
        return sorted(x.tobytes() for x in np.packbits(m.reshape(len(m), -1), axis=1))

    assert units.sizes["unit"] == len(expected) > 5
    assert keys(units["masks"].values) == keys(expected)


def test_second_pass_is_skipped_on_movies_noisier_than_the_training_data(caplog):
    from somaflow.detect.cnn import _second_pass
    from somaflow.detect.postprocess import PostprocessParams

    meta = {"input_stats": json.dumps({"noise_level": {"min": 0.025, "max": 0.24, "median": 0.2, "n": 64}})}
    post = PostprocessParams.for_movie(10.0, "2p", 5.0).model_copy(update={"threshold": 0.85})

    def stats(level):
        return xr.Dataset({"baseline": (("y", "x"), np.full((4, 4), 100.0)),
                           "noise": (("y", "x"), np.full((4, 4), 100.0 * level))})

    assert _second_pass(post, stats(0.2), meta, "stneuronet") == post  # inside: kept
    assert _second_pass(post, stats(0.3), meta, "stneuronet") == post  # within the x1.5 margin
    with caplog.at_level("INFO", logger="somaflow.detect.cnn"):
        off = _second_pass(post, stats(0.72), meta, "stneuronet")  # Neurofinder 00's level
    assert off.rescue_threshold is None and off.threshold == 0.85
    assert "no second pass" in caplog.text and "noise level" in caplog.text
    assert _second_pass(post, stats(0.72), {}, "stneuronet") == post  # a checkpoint without statistics: kept


def test_test_time_augmentation_averages_the_turned_back_views():
    from somaflow.detect.cnn import CnnParams, _predict_batch
    from somaflow.errors import ParameterError
    from somaflow.inference import dihedral_mean

    rng = np.random.default_rng(0)
    x = rng.random((3, 6, 10)).astype(np.float32)  # not square: odd rotations swap the axes
    ramp = lambda v: v.sum(0) + np.arange(v.shape[-1], dtype=np.float32)  # noqa: E731 (not equivariant)
    np.testing.assert_allclose(dihedral_mean(ramp, x, 1), ramp(x))
    # the views' outputs are turned back: the input part is exact, the ramp averages over the views
    s = x.sum(0)
    col, row = np.arange(10, dtype=np.float32)[None, :], np.arange(6, dtype=np.float32)[:, None]
    mirrored = 9 - col
    np.testing.assert_allclose(dihedral_mean(ramp, x, 2), s + (col + mirrored) / 2, rtol=1e-6)
    # rot90 k=1 turns the output's column index into the input's reversed row index, and so on
    four = s + (col + (5 - row) + mirrored + row) / 4
    np.testing.assert_allclose(dihedral_mean(ramp, x, 4), four, rtol=1e-6)
    assert dihedral_mean(ramp, x, 8).shape == (6, 10)
    with pytest.raises(ParameterError, match="1, 2, 4, 8"):
        dihedral_mean(ramp, x, 3)
    with pytest.raises(pydantic.ValidationError, match="tta"):
        CnnParams.for_movie(10.0, "2p", 5.0).model_validate({**CnnParams.for_movie(10.0, "2p", 5.0).model_dump(),
                                                             "tta": 3})
    # the shipped STNeuroNet through it: 8 views of a whitened batch average to a map in [0, 1]
    p = CnnParams.for_movie(10.0, "2p", 5.0)
    batch = rng.standard_normal((8, 40, 48)).astype(np.float32)
    assert p.tta is None and p.views("stneuronet") == 4 and p.views("convnet2p1d") == 1  # the defaults
    assert p.model_copy(update={"tta": 2}).views("convnet2p1d") == 2
    one = _predict_batch("stneuronet", "default", batch, p.model_copy(update={"tta": 1}))
    eight = _predict_batch("stneuronet", "default", batch, p.model_copy(update={"tta": 8}))
    assert one.shape == eight.shape == (40, 48)
    assert 0 <= eight.min() and eight.max() <= 1 and not np.array_equal(one, eight)


@pytest.mark.parametrize("name", ["3cnet", "3cnet-plus"])
def test_classifier_stage_folds_its_verdict(tmp_path, name):
    """An (untrained) 3CNet checkpoint: its probabilities become cnn_score, score is the
    geometric mean, accepted needs the classifier's vote."""
    from somaflow.classify.cnet import ClassifyParams, classify_units
    from somaflow.nn import build_model, save_checkpoint

    torch.manual_seed(0)
    ckpt = tmp_path / f"{name}.safetensors"
    save_checkpoint(build_model(name), str(ckpt), model_name=name, config={})
    rng = np.random.default_rng(0)
    masks = np.zeros((4, 40, 40), bool)
    for i in range(4):
        masks[i, 5 + 8 * i:10 + 8 * i, 5:12] = True
    units = xr.Dataset({"masks": (("unit", "y", "x"), masks), "score": ("unit", np.full(4, 0.64, np.float32)),
                        "accepted": ("unit", np.array([True, True, False, True]))},
                       coords={"unit": np.arange(4)})
    traces = xr.Dataset({"dff": (("unit", "frame"), rng.normal(size=(4, 300)).astype(np.float32))})
    images = xr.Dataset({"mean_image": (("y", "x"), rng.random((40, 40)).astype(np.float32))})
    v = classify_units(units, traces, images, ClassifyParams(classifier=name, weights=str(ckpt)))
    cnn = v["cnn_score"].values
    assert np.all((cnn >= 0) & (cnn <= 1))
    np.testing.assert_allclose(v["score"].values, np.sqrt(0.64 * cnn), rtol=1e-5)
    np.testing.assert_array_equal(v["accepted"].values, units["accepted"].values & (cnn >= 0.5))
    none = classify_units(units, traces, images, ClassifyParams())
    np.testing.assert_array_equal(none["accepted"].values, units["accepted"].values)
    assert np.isnan(none["cnn_score"].values).all()


def test_candidate_inputs_block_by_block_equal_one_block(monkeypatch):
    """The classifier's inputs are built over blocks of units (lazy footprints stay lazy
    until their block): any block size gives the same arrays."""
    import dask.array as da

    from somaflow.classify import cnet

    rng = np.random.default_rng(1)
    masks = np.zeros((5, 40, 40), bool)
    for i in range(5):
        masks[i, 3 + 7 * i:8 + 7 * i, 4 + 5 * i:10 + 5 * i] = True
    fp = (masks * rng.random((5, 40, 40))).astype(np.float32)
    traces = xr.Dataset({"dff": (("unit", "frame"), rng.normal(size=(5, 200)).astype(np.float32))})
    images = xr.Dataset({"mean_image": (("y", "x"), rng.random((40, 40)).astype(np.float32))})
    for with_fp in (True, False):
        units = xr.Dataset({"masks": (("unit", "y", "x"), masks)})
        if with_fp:
            units["footprints"] = (("unit", "y", "x"), da.from_array(fp, chunks=(2, 40, 40)))
        whole = cnet.candidate_inputs(units, traces, images, "3cnet-plus")
        monkeypatch.setattr(cnet, "_BLOCK_BYTES", 2 * 40 * 40 * 4)  # two units per block
        blocks = cnet.candidate_inputs(units, traces, images, "3cnet-plus")
        monkeypatch.undo()
        for a, b in zip(whole, blocks, strict=True):
            assert a.shape[0] == 5
            np.testing.assert_array_equal(a, b)
    empty = cnet.candidate_inputs(units.isel(unit=slice(0, 0)), traces.isel(unit=slice(0, 0)), images, "3cnet")
    assert empty.shape == (0, 2, 92, 92)


def test_detector_units_roi_image_same_in_training_and_inference():
    """Units without footprints: 3CNet's image channel is the mean image near the mask
    (dilated 2 px, median removed), built by one function for inference and training."""
    from somaflow.classify import cnet
    from somaflow.errors import InputError

    rng = np.random.default_rng(2)
    masks = np.zeros((3, 50, 50), bool)
    masks[0, 10:16, 10:16] = masks[1, 30:37, 5:12] = masks[2, 20:25, 38:44] = True
    mean = rng.random((50, 50)).astype(np.float32)
    rois = masked_mean_images(mean, masks)
    near = np.abs(rois) > 0
    assert near[0, 8:18, 10:16].all() and near[0, 10:16, 8:18].all() and not near[0, :7].any()  # 2-px margin
    np.testing.assert_allclose(rois[1, 33, 8], mean[33, 8] - np.median(mean), rtol=1e-6)
    dff = rng.normal(size=(3, 150)).astype(np.float32)
    units = xr.Dataset({"masks": (("unit", "y", "x"), masks)})
    traces = xr.Dataset({"dff": (("unit", "frame"), dff)}, attrs={"fps": 10.0})
    images = xr.Dataset({"mean_image": (("y", "x"), mean)})
    x_train, _, _ = candidate_examples(rois, masks, dff, fps=10.0)
    np.testing.assert_array_equal(cnet.candidate_inputs(units, traces, images, "3cnet"), x_train)
    with pytest.raises(InputError):
        masked_mean_images(mean[:40], masks)


def test_weights_for_another_model_are_refused(unet_weights):
    from somaflow.errors import InputError
    from somaflow.inference import LocalBackend

    out, _ = unet_weights
    with pytest.raises(InputError, match="for model 'unet2d', not 'meanimage2d'"):
        LocalBackend().predict("meanimage2d", str(out), np.zeros((1, 1, 32, 32), np.float32))


@pytest.mark.integration
def test_run_with_a_detector_and_the_classifier(unet_weights, make_movie, tmp_path, prefect_api):
    """`somaflow run --method unet2d --classifier 3cnet` end to end: the result carries the
    classifier's verdict, the CNN probability map and the (empty) warnings."""
    from somaflow.nn import build_model, save_checkpoint

    out, _ = unet_weights
    ckpt = tmp_path / "3cnet.safetensors"
    save_checkpoint(build_model("3cnet"), str(ckpt), model_name="3cnet", config={})
    params = tmp_path / "p.yaml"
    params.write_text(f"cnn:\n  weights:\n    unet2d: {out}\nclassify:\n  weights: {ckpt}\n")
    sim = make_movie(3, n_frames=100)
    result = tmp_path / "r.zarr"
    summary = json.loads(run_cli("run", str(sim / "movie.tif"), "--out", str(result), "--fps", "10",
                                 "--method", "unet2d", "--classifier", "3cnet", "--params", str(params),
                                 "--cluster", "threads", "--json", env=prefect_api).stdout)
    assert summary["stages"]["classify"] == "ran" and summary["n_units"] > 0
    ds = schema.open_result(str(result))
    assert "cnn_score" in ds and "cnn_probability" in ds
    np.testing.assert_array_equal(ds["accepted"].values, ds["accepted"].values & (ds["cnn_score"].values >= 0.5))
    assert json.loads(ds.attrs["ood_warnings"]) == []
    assert json.loads(ds.attrs["params"])["classify"]["classifier"] == "3cnet"


def test_classifier_and_lstm_loops_learn_a_separable_problem():
    """3CNet+ (image + trace branch) and the LSTM on toy candidates whose class shows in the
    trace: the loss goes down and validation metrics are reported."""
    from somaflow.nn import build_model
    from somaflow.nn.train import TrainParams, train_classifier, train_lstm

    rng = np.random.default_rng(1)
    n = 48
    labels = np.arange(n) % 2
    traces = rng.normal(0, 1, (n, 64)).astype(np.float32)
    traces[labels == 1, 30:34] += 6  # a transient
    images = rng.normal(0, 1, (n, 1, 92, 92)).astype(np.float32)
    p = TrainParams(epochs=4, batch_size=8, lr=2e-3, val_fraction=0.25, threads=1)
    torch.manual_seed(0)
    hist = train_classifier(build_model("3cnet-plus", width=4, hidden=8), (images, traces), labels, p)
    assert hist.loss[-1] < hist.loss[0]
    assert set(hist.val[-1]) == {"accuracy", "precision", "recall", "f1"}
    windows = np.repeat(traces[:, None, :], 1, axis=1)
    windows = np.concatenate([windows, np.zeros((n, 1, 36), np.float32)], axis=2)  # (n, 1, 100)
    hist = train_lstm(build_model("lstm", hidden=8), windows, labels, p.model_copy(update={"epochs": 6, "lr": 1e-2}))
    assert hist.loss[-1] < hist.loss[0]
    assert hist.n_val == 12


def test_movie_detector_batch_tasks_receive_only_their_frames(monkeypatch):
    # dask computes a whole collection handed to delayed: each batch task must get the slice of its
    # frames (a dask slice depends only on the chunks holding them), never the 100-frame movie
    import somaflow.detect.cnn as cnn
    from somaflow.nn.inputs import batch_plan
    from somaflow.simulate import simulate
    from somaflow.training.detector_sets import sim_movie

    sim = simulate("2p-small", seed=8, n_frames=100, motion="none")
    movie = sim_movie(sim).chunk({"frame": 25})
    p = cnn.CnnParams.for_movie(10.0, "2p", 5.0)
    p = p.model_copy(update={"input": p.input.model_copy(update={"batch_frames": 10}), "ood_check": False})
    seen: list[int] = []
    real = cnn._batch_task

    def spy(model, weights, frames, *args):
        seen.append(np.asarray(frames).shape[0])
        return real(model, weights, frames, *args)

    monkeypatch.setattr(cnn, "_batch_task", spy)
    cnn.detect_cnn(movie, _images(sim), "stneuronet", p, 5.0)
    assert sorted(seen) == sorted(b - a for a, b in batch_plan(100, p.input))
    assert max(seen) < 100


@pytest.mark.parametrize("background", ["highpass", "opening"])
def test_batch_input_read_by_chunks_equals_the_whole_batch(monkeypatch, background):
    # a batch task reads its frames a chunk at a time, carrying the frames of a bin cut by a chunk
    # boundary, and prepares them by small pieces: the input must be that of the whole batch at once,
    # with a partial last bin, from a numpy array, a dask slice or its holder, and lazily (the holder's
    # graph is only its chunks' readers)
    import pickle

    import dask.array as da

    import somaflow.detect.cnn as cnn
    from somaflow.nn.inputs import DetectorInputParams, detector_batch, pad_batch, pixel_statistics

    rng = np.random.default_rng(3)
    frames = rng.integers(100, 4000, (47, 24, 20)).astype(np.uint16)
    movie = xr.DataArray(frames, dims=("frame", "y", "x"))
    stats = pixel_statistics(movie)
    params = DetectorInputParams(fps=15.0, bin_fps=5.0, background=background, opening_radius=3.0)
    assert params.factor == 3
    want = pad_batch(detector_batch(frames, stats, params), params.pad_multiple)
    monkeypatch.setattr(cnn, "_PIECE_BYTES", 4 * 24 * 20 * 7)  # pieces of 6 frames: 2 bins
    lazy = da.from_array(frames, chunks=((10, 11, 5, 21), 24, 20))  # boundaries inside bins
    for given in (frames, lazy, cnn._Frames(lazy)):
        got = cnn._batch_input(given, stats, params)
        np.testing.assert_array_equal(got, want)
    pieces = da.concatenate([da.from_array(frames[i:i + 10]) for i in range(0, 47, 10)])
    holder = cnn._Frames(pieces[40:47])
    assert holder.shape == (7, 24, 20)
    np.testing.assert_array_equal(np.asarray(holder), frames[40:47])
    assert len(pickle.dumps(holder)) < frames[:20].nbytes  # the last piece, not the 47-frame source
