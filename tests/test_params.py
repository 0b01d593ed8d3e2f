"""Run parameters: a tagged union per extraction method, one home for fps / modality / neuron_radius."""

from __future__ import annotations

import math

import pytest

from somaflow import provenance
from somaflow.errors import ParameterError
from somaflow.params import RunParams


def _walk(d, path=""):
    for k, v in d.items():
        where = f"{path}.{k}" if path else k
        yield where
        if isinstance(v, dict):
            yield from _walk(v, where)


@pytest.mark.parametrize("method, sections", [
    ("cnmf", {"method", "cnmf", "detect", "cnn"}),
    ("local-maxima", {"method", "detect"}),
    ("pca-ica", {"method", "pca_ica"}),
    ("unet2d", {"method", "cnn"}),
])
def test_a_run_carries_only_its_methods_parameters(method, sections):
    p = RunParams.for_movie(10.0, "2p", 5.0, {"method": method})
    assert p.method == method
    assert set(p.model_dump(mode="json")["extract"]) == sections


def test_movie_values_have_one_home():
    p = RunParams.for_movie(7.5, "1p", 4.0, {"method": "cnmf"})
    keys = list(_walk(p.model_dump(mode="json")))
    assert [k for k in keys if k.rsplit(".", 1)[-1] in ("fps", "neuron_radius", "modality")] == \
        ["fps", "modality", "neuron_radius"]
    # the stage models still see them, from the top level
    assert p.extract.cnmf.neuron_radius == p.extract.cnmf.seeds.neuron_radius == p.extract.detect.neuron_radius == 4.0
    assert p.traces.fps == p.preprocess.binning.fps == p.extract.cnn.input.fps == 7.5
    assert RunParams.model_validate(p.model_dump(mode="json")) == p
    # a top-level override is passed down, and the defaults derive from it
    q = RunParams.for_movie(7.5, "2p", 4.0, {"neuron_radius": 7})
    assert q.extract.cnmf.neuron_radius == 7.0 and q.extract.cnmf.patch_size == 84


@pytest.mark.parametrize("over, message", [
    ({"cnmf": {"neuron_radius": 7}}, "extract.cnmf.neuron_radius is the run's neuron_radius"),
    ({"traces": {"fps": 30}}, "traces.fps is the run's fps"),
    ({"fps": math.nan}, "bad parameter fps: Input should be a finite number"),
    ({"fps": -1}, "bad parameter fps"),
    ({"neuron_radius": 1e6}, "bad parameter neuron_radius"),
    ({"modality": "3p"}, "bad parameter modality"),
    ({"method": "nmf"}, "is not one of cnmf"),
    ({"pca_ica": {"threshold": 2.0}}, "parameter section pca_ica: is for method pca-ica, and this run uses cnmf"),
    ({"extract": {"method": "local-maxima", "cnmf": {}}}, "bad parameter extract.local-maxima.cnmf"),
])
def test_bad_parameters_name_the_key_and_the_fix(over, message):
    with pytest.raises(ParameterError, match=message.replace("(", r"\(")) as exc:
        RunParams.for_movie(10.0, "2p", 5.0, over)
    assert "\n" not in str(exc.value)


def test_the_earlier_layout_still_loads():
    old = RunParams.for_movie(10.0, "2p", 5.0, {"method": "cnmf", "cnmf": {"min_snr": 2.5},
                                                "detect": {"threshold_k": 2.5}})
    new = RunParams.for_movie(10.0, "2p", 5.0, {"extract": {"method": "cnmf", "cnmf": {"min_snr": 2.5},
                                                            "detect": {"threshold_k": 2.5}}})
    assert old == new and old.extract.cnmf.min_snr == 2.5
    # --method (a top-level method) wins over the file's extract.method
    p = RunParams.for_movie(10.0, "2p", 5.0, {"method": "local-maxima", "extract": {"method": "cnmf"}})
    assert p.method == "local-maxima"


def test_another_methods_parameters_do_not_reach_the_extract_hash():
    """Only the chosen method's parameters are hashed: a CNMF run's stages hash the same
    whatever PCA/ICA settings a shared parameter file would have for other runs."""
    cnmf = RunParams.for_movie(10.0, "2p", 5.0, {"method": "cnmf"}).model_dump(mode="json")
    assert "pca_ica" not in cnmf["extract"]
    pca = RunParams.for_movie(10.0, "2p", 5.0, {"method": "pca-ica", "pca_ica": {"threshold": 2.0}})
    other = RunParams.for_movie(10.0, "2p", 5.0, {"method": "pca-ica", "pca_ica": {"threshold": 3.0}})
    a = provenance.stage_hashes("blake2b:00", pca.model_dump(mode="json"))
    b = provenance.stage_hashes("blake2b:00", other.model_dump(mode="json"))
    assert a["summary"] == b["summary"] and a["extract"] != b["extract"]
