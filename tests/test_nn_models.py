"""somaflow.nn: model input contracts, gradients, losses, and safetensors checkpoints."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import load as st_load  # noqa: E402
from safetensors.torch import save as st_save  # noqa: E402

from somaflow.errors import InputError, ParameterError, ResultExistsError, StoreError  # noqa: E402
from somaflow.nn import (  # noqa: E402
    MODELS,
    build_model,
    count_parameters,
    load_checkpoint,
    losses,
    save_checkpoint,
    to_channels_last,
)
from somaflow.nn import checkpoint as ckpt  # noqa: E402


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed))


#: registry name → (constructor kwargs for a tiny model, input factory, output shape)
CASES = {
    "stneuronet": ({"width": 4, "n_dense": 2}, lambda: _randn(2, 1, 8, 16, 24), (2, 2, 16, 24)),
    "convnet2p1d": ({"width": 4}, lambda: _randn(2, 1, 5, 20, 18), (2, 2, 20, 18)),
    "meanimage2d": ({"width": 4}, lambda: _randn(2, 1, 20, 18), (2, 2, 20, 18)),
    "unet2d": ({"width": 4, "depth": 2}, lambda: _randn(2, 4, 16, 12), (2, 2, 16, 12)),
    "3cnet": ({"width": 4, "hidden": 8}, lambda: _randn(3, 2, 92, 92), (3, 2)),
    "3cnet-plus": (
        {"width": 4, "hidden": 8},
        lambda: (_randn(3, 1, 92, 92), _randn(3, 64, seed=1)),
        (3, 2),
    ),
    "lstm": ({"hidden": 6, "window": 100}, lambda: _randn(3, 4, 100), (3,)),
}


def test_registry_matches_the_spec():
    assert set(MODELS) == set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_output_shapes(name):
    config, make, out_shape = CASES[name]
    torch.manual_seed(0)
    model = build_model(name, **config).eval()
    with torch.no_grad():
        y = model(make())
    assert tuple(y.shape) == out_shape
    assert y.dtype == torch.float32
    assert torch.isfinite(y).all()


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("stneuronet", (1, 1, 8, 16, 16)),
        ("convnet2p1d", (1, 1, 2, 16, 16)),
        ("unet2d", (1, 4, 16, 16)),
        ("3cnet", (1, 2, 92, 92)),
    ],
)
def test_default_widths_run_and_stay_small(name, shape):
    torch.manual_seed(0)
    model = build_model(name).eval()
    assert 0 < count_parameters(model) < 600_000
    with torch.no_grad():
        y = model(_randn(*shape))
    assert y.shape[:2] == (1, 2)


def _loss(name: str, y: torch.Tensor) -> torch.Tensor:
    if name == "lstm":
        return losses.bce_loss(y, torch.tensor([1.0, 0.0, 1.0]))
    if y.ndim == 2:
        return losses.multiclass_hinge_loss(y, torch.tensor([1, 0, 1]))
    target = (_randn(y.shape[0], *y.shape[2:], seed=7) > 0.5).float()
    return losses.dice_loss(y, target)


@pytest.mark.parametrize("name", sorted(CASES))
def test_gradients_reach_every_parameter(name):
    config, make, _ = CASES[name]
    torch.manual_seed(0)
    model = build_model(name, **config).train()
    loss = _loss(name, model(make()))
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: no gradient for {pname}"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient for {pname}"
        assert p.grad.abs().sum() > 0, f"{name}: zero gradient for {pname}"


def test_stneuronet_rejects_inputs_outside_its_contract():
    model = build_model("stneuronet", width=4).eval()
    with pytest.raises(InputError, match="multiple of 4"):
        model(_randn(1, 1, 6, 16, 16))
    with pytest.raises(InputError, match="multiple of 8"):
        model(_randn(1, 1, 8, 12, 16))
    with pytest.raises(InputError, match=r"\(B, C, T, H, W\)"):
        model(_randn(1, 8, 16, 16))
    with pytest.raises(InputError, match="float32"):
        model(torch.zeros(1, 1, 8, 16, 16, dtype=torch.int64))


def test_convnet2p1d_accepts_any_number_of_frames_and_chunks_exactly():
    torch.manual_seed(0)
    model = build_model("convnet2p1d", width=4).eval()
    with torch.no_grad():
        for t in (1, 3, 7):
            assert model(_randn(2, 1, t, 12, 10)).shape == (2, 2, 12, 10)
        x = _randn(2, 1, 7, 12, 10, seed=3)
        whole = model(x)
        model.max_pixels_per_chunk = 2 * 12 * 10 * 2  # two frames per chunk, a ragged last chunk
        chunked = model(x)
    torch.testing.assert_close(chunked, whole)
    # the max over time makes it invariant to the frame order
    with torch.no_grad():
        torch.testing.assert_close(model(x.flip(2)), whole)


@pytest.mark.parametrize("slab", [16, 3])
def test_stneuronet_lean_inference_pass_equals_the_training_graph(monkeypatch, slab):
    # eval mode without autograd takes the lean pass (in-place batch norm, time slabs, the fusing
    # convolution split over the skips): the same map as the autograd graph, up to float rounding,
    # whether the time slabs cut the stacks' time axis in two or in many
    import somaflow.nn.detectors as detectors
    import somaflow.nn.layers as layers

    monkeypatch.setattr(detectors, "LEAN_SLAB", slab)
    monkeypatch.setattr(layers, "LEAN_SLAB", slab)
    torch.manual_seed(0)
    model = build_model("stneuronet", width=8, n_dense=2).eval()
    with torch.no_grad():  # batch norms with statistics of their own, not the identity
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    x = _randn(2, 1, 40, 24, 32, seed=5)
    with torch.enable_grad():
        graph = model(x)
    assert graph.requires_grad
    with torch.inference_mode():
        lean = model(x)
    torch.testing.assert_close(lean, graph.detach(), rtol=1e-4, atol=1e-5)


def test_convnet2p1d_receptive_field_is_33_px_without_gaps():
    model = build_model("convnet2p1d", width=2).eval()
    with torch.no_grad():  # positive weights keep every ReLU open: the gradient marks the field
        for p in model.parameters():
            p.fill_(0.1)
    x = torch.ones(1, 1, 1, 41, 41, requires_grad=True)
    model(x)[0, 1, 20, 20].backward()
    seen = x.grad[0, 0, 0] != 0
    assert seen[4:37, 4:37].all()  # every offset within ±16 px, no dilation holes
    assert not seen[:4].any() and not seen[37:].any()
    assert not seen[:, :4].any() and not seen[:, 37:].any()


def test_cnet3plus_takes_a_pair_or_a_mapping():
    torch.manual_seed(0)
    model = build_model("3cnet-plus", width=4, hidden=8).eval()
    image, trace = _randn(2, 1, 92, 92), _randn(2, 512, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(model((image, trace)), model({"image": image, "trace": trace}))
    with pytest.raises(InputError, match="fewer than"):
        model((image, _randn(2, 8)))
    with pytest.raises(InputError, match="pair"):
        model(image)


def test_cnet3_trace_encodings():
    assert build_model("3cnet", trace_encoding="none", width=4)(_randn(2, 1, 92, 92)).shape == (
        2,
        2,
    )
    with pytest.raises(InputError):
        build_model("3cnet", width=4)(_randn(2, 2, 90, 90))
    with pytest.raises(ParameterError, match="trace_encoding"):
        build_model("3cnet", trace_encoding="fft")


def test_lstm_seed_logit_is_the_max_over_windows():
    torch.manual_seed(0)
    model = build_model("lstm", hidden=6).eval()
    x = _randn(3, 4, 100)
    with torch.no_grad():
        per_window = model.window_logits(x)
        assert per_window.shape == (3, 4)
        torch.testing.assert_close(model(x), per_window.amax(dim=1))
        # each window is classified on its own
        torch.testing.assert_close(model.window_logits(x[:, 2:3])[:, 0], per_window[:, 2])
    with pytest.raises(InputError, match="window"):
        model(_randn(3, 4, 50))


def test_build_model_rejects_unknown_names_and_arguments():
    with pytest.raises(ParameterError, match="unknown model"):
        build_model("resnet")
    with pytest.raises(ParameterError, match="invalid configuration"):
        build_model("unet2d", widht=8)
    with pytest.raises(ParameterError, match="width"):
        build_model("stneuronet", width=0)
    with pytest.raises(ParameterError, match="dropout"):
        build_model("stneuronet", dropout=1.5)


def test_count_parameters_and_channels_last():
    model = build_model("unet2d", width=4, depth=2)
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())
    model.out.weight.requires_grad_(False)
    assert (
        count_parameters(model)
        == sum(p.numel() for p in model.parameters()) - model.out.weight.numel()
    )
    assert count_parameters(model, trainable_only=False) == sum(
        p.numel() for p in model.parameters()
    )
    torch.manual_seed(0)
    net = build_model("stneuronet", width=4).eval()
    x = _randn(1, 1, 8, 16, 16)
    with torch.no_grad():
        before = net(x)
        after = to_channels_last(net)(x)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-4)


def test_importing_somaflow_nn_does_not_import_torch():
    code = "import sys, somaflow.nn; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------- losses


def test_dice_loss_is_zero_for_a_perfect_prediction():
    target = (_randn(2, 16, 16) > 0.8).float()
    logits = torch.stack([-40 * (2 * target - 1), 40 * (2 * target - 1)], dim=1)
    assert float(losses.dice_loss(logits, target)) < 1e-6
    assert float(losses.dice_loss(-logits, target)) > 0.99
    empty = torch.zeros(1, 8, 8)
    assert float(losses.dice_loss(torch.stack([empty + 40, empty - 40], 1), empty)) < 1e-6


def test_dice_loss_matches_the_formula_and_honours_weights():
    logits, target = _randn(2, 2, 6, 5), (_randn(2, 6, 5, seed=1) > 0).float()
    p = torch.softmax(logits, 1)[:, 1]
    expected = 1 - 2 * (p * target).sum() / ((p * p).sum() + (target * target).sum())
    torch.testing.assert_close(losses.dice_loss(logits, target, eps=0.0), expected)
    weight = torch.ones(2, 6, 5)
    weight[1] = 0.0  # ignore the second sample entirely
    torch.testing.assert_close(
        losses.dice_loss(logits, target, weight), losses.dice_loss(logits[:1], target[:1])
    )
    with pytest.raises(InputError, match="target shape"):
        losses.dice_loss(logits, target[:, :5])


def test_dice_loss_decreases_under_sgd():
    torch.manual_seed(0)
    model = torch.nn.Conv2d(1, 2, 3, padding=1)  # a per-pixel toy detector
    yy, xx = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    target = (((yy - 8) ** 2 + (xx - 6) ** 2) < 12).float().expand(2, 16, 16)
    x = (2 * target + 0.3 * _randn(2, 16, 16))[:, None]  # a bright disk in noise
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    history = []
    for _ in range(10):
        opt.zero_grad()
        loss = losses.dice_loss(model(x), target)
        loss.backward()
        opt.step()
        history.append(loss.item())
    assert history[-1] < 0.5 * history[0], history
    assert all(b < a for a, b in zip(history, history[1:], strict=False)), history


@pytest.mark.parametrize("n_classes", [2, 5])
def test_multiclass_hinge_matches_torch(n_classes):
    logits = _randn(7, n_classes) * 2
    labels = torch.randint(0, n_classes, (7,), generator=_gen(1))
    torch.testing.assert_close(
        losses.multiclass_hinge_loss(logits, labels), torch.nn.MultiMarginLoss()(logits, labels)
    )
    weight = torch.rand(n_classes, generator=_gen(2)) + 0.5
    torch.testing.assert_close(
        losses.multiclass_hinge_loss(logits, labels, class_weight=weight, margin=0.7),
        torch.nn.MultiMarginLoss(margin=0.7, weight=weight)(logits, labels),
    )
    with pytest.raises(InputError):
        losses.multiclass_hinge_loss(logits, labels.float())


def test_bce_loss_matches_torch():
    logits, labels = _randn(6), (_randn(6, seed=1) > 0).float()
    torch.testing.assert_close(
        losses.bce_loss(logits, labels, pos_weight=2.0),
        torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(2.0))(logits, labels),
    )


# ----------------------------------------------------------------------------- checkpoints

META = {
    "training": {"presets": ["2p-small"], "seeds": [0, 1], "epochs": 3},
    "metrics": {"f1": 0.91},
    "input_stats": {"noise": [0.1, 0.4], "neuron_radius": [4, 7]},
}


def _trained(name="unet2d", **config):
    torch.manual_seed(0)
    model = build_model(name, **config)
    model.train()
    with torch.no_grad():  # move batch-norm running stats away from their defaults
        model(_randn(2, 4, 16, 16))
    return model.eval()


def test_checkpoint_round_trip(tmp_path):
    model = _trained(width=4, depth=2)
    path = tmp_path / "sub" / "unet.safetensors"
    written = save_checkpoint(
        model, str(path), model_name="unet2d", config={"width": 4, "depth": 2}, metadata=META
    )
    assert written == str(path)
    assert os.listdir(path.parent) == ["unet.safetensors"]  # no temporary left behind
    loaded, meta = load_checkpoint(str(path))
    assert not loaded.training
    x = _randn(3, 4, 16, 8, seed=5)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert meta["model"] == "unet2d"
    assert meta["config"] == {"in_channels": 4, "width": 4, "depth": 2}
    assert meta["format"] == ckpt.CHECKPOINT_FORMAT
    assert meta["somaflow_version"]
    for key, value in META.items():
        assert meta[key] == value
    with safe_open(str(path), "pt") as fh:  # every metadata value is a JSON string
        raw = fh.metadata()
    assert all(isinstance(v, str) for v in raw.values())
    assert json.loads(raw["metrics"]) == META["metrics"]


def test_checkpoint_round_trip_through_fsspec_and_overwrite():
    model = build_model("lstm", hidden=4)
    url = "memory://somaflow-tests/nn/lstm.safetensors"
    save_checkpoint(model, url, model_name="lstm", config={"hidden": 4}, metadata={"metrics": {}})
    with pytest.raises(ResultExistsError):
        save_checkpoint(model, url, model_name="lstm", config={"hidden": 4})
    save_checkpoint(model, url, model_name="lstm", config={"hidden": 4}, overwrite=True)
    loaded, meta = load_checkpoint(url)
    assert "metrics" not in meta
    x = _randn(2, 3, 100)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


def test_save_checkpoint_checks_its_arguments(tmp_path):
    model = build_model("lstm", hidden=4)
    out = str(tmp_path / "m.safetensors")
    with pytest.raises(ParameterError, match="registry name"):
        save_checkpoint(model, out, model_name="unet2d", config={})
    with pytest.raises(ParameterError, match="does not match"):
        save_checkpoint(model, out, model_name="lstm", config={"hidden": 8})
    with pytest.raises(ParameterError, match="written by save_checkpoint"):
        save_checkpoint(
            model, out, model_name="lstm", config={"hidden": 4}, metadata={"model": "x"}
        )
    with pytest.raises(ParameterError, match="JSON"):
        save_checkpoint(model, out, model_name="lstm", config={"hidden": 4}, metadata={"m": {1, 2}})
    assert not os.listdir(tmp_path)


class _Marker:
    """Unpickling this creates a file: a stand-in for a malicious payload."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("protocol", [2, 4])
def test_a_malicious_pickle_is_refused_without_unpickling(tmp_path, protocol):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Marker(str(marker)), protocol=protocol)
    # the payload is live: unpickling it does create a marker
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Marker(str(probe)), protocol=protocol)).close()
    assert probe.exists()
    path = tmp_path / "model.safetensors"
    path.write_bytes(payload)
    with pytest.raises(InputError, match="pickle") as err:
        load_checkpoint(str(path))
    assert str(path) in str(err.value)
    assert not marker.exists()


def test_torch_save_files_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    state = tmp_path / "state.safetensors"
    torch.save(build_model("lstm", hidden=4).state_dict(), state)
    evil = tmp_path / "evil.safetensors"
    torch.save({"weights": _Marker(str(marker))}, evil)
    for path in (state, evil):
        with pytest.raises(InputError, match="never unpickles"):
            load_checkpoint(str(path))
    assert not marker.exists()


@pytest.fixture
def saved(tmp_path):
    model = build_model("lstm", hidden=4)
    path = tmp_path / "lstm.safetensors"
    save_checkpoint(model, str(path), model_name="lstm", config={"hidden": 4}, metadata=META)
    return path


def test_tampered_tensor_bytes_are_refused(saved):
    data = bytearray(saved.read_bytes())
    data[-3] ^= 0x40  # inside the last tensor's data
    saved.write_bytes(bytes(data))
    with pytest.raises(InputError, match="sha256") as err:
        load_checkpoint(str(saved))
    assert str(saved) in str(err.value)


def test_edited_metadata_is_refused(saved):
    data = saved.read_bytes()
    edited = data.replace(b"0.91", b"0.99")
    assert edited != data
    saved.write_bytes(edited)
    with pytest.raises(InputError, match="edited"):
        load_checkpoint(str(saved))


@pytest.mark.parametrize(
    "mangle",
    [
        lambda d: d[:100],  # truncated
        lambda d: d[:8] + b"[" + d[9:],  # header JSON broken
        lambda d: b"\xff" * 8 + d[8:],  # absurd header length
        lambda d: b"",  # empty
        lambda d: b"not a checkpoint at all, just text\n" * 4,
    ],
)
def test_corrupt_files_are_refused(saved, mangle):
    saved.write_bytes(mangle(saved.read_bytes()))
    with pytest.raises(InputError) as err:
        load_checkpoint(str(saved))
    assert str(saved) in str(err.value)
    assert "somaflow.nn.save_checkpoint" in str(err.value)


def _rewrite(path, edit_tensors=None, edit_meta=None):
    """Rewrite a checkpoint with edited tensors/metadata and a matching digest."""
    data = path.read_bytes()
    tensors = st_load(data)
    with safe_open(str(path), "pt") as fh:
        meta = dict(fh.metadata())
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    meta["sha256"] = json.dumps(ckpt._digest(tensors, meta))
    path.write_bytes(st_save(tensors, metadata=meta))


def _reshape_fc(t):
    t["fc.weight"] = torch.zeros(1, 5)


@pytest.mark.parametrize(
    ("edit_tensors", "edit_meta", "message"),
    [
        (_reshape_fc, None, "expects"),
        (lambda t: t.pop("fc.bias"), None, "missing tensors"),
        (lambda t: t.__setitem__("extra", torch.zeros(2)), None, "unexpected tensors"),
        (lambda t: t.__setitem__("fc.bias", torch.tensor([float("nan")])), None, "NaN"),
        (None, lambda m: m.__setitem__("model", json.dumps("resnet")), "unknown model"),
        (None, lambda m: m.__setitem__("config", json.dumps({"hidden": 0})), "invalid"),
        (None, lambda m: m.__setitem__("config", json.dumps({"hiden": 4})), "invalid"),
        (None, lambda m: m.__setitem__("config", json.dumps({"hidden": 8})), "expects"),
        (None, lambda m: m.pop("format"), "not a somaflow checkpoint"),
    ],
)
def test_checkpoints_that_do_not_fit_their_model_are_refused(
    saved, edit_tensors, edit_meta, message
):
    _rewrite(saved, edit_tensors, edit_meta)
    with pytest.raises(InputError, match=message) as err:
        load_checkpoint(str(saved))
    assert str(saved) in str(err.value)


def test_a_missing_checkpoint_is_a_store_error(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        load_checkpoint(str(tmp_path / "nope.safetensors"))
