"""`somaflow export RESULT --nwb OUT.nwb`: NWB round trip through pynwb and roiextractors,
NWB best practices (nwbinspector), bad input."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest
from nwbinspector import inspect_nwbfile
from pynwb import NWBHDF5IO
from roiextractors import NwbSegmentationExtractor

from conftest import run_cli
from somaflow.io import schema
from somaflow.io.nwb_export import NwbMetadata, export_nwb

METADATA = """\
session_start_time: 2024-05-02T10:31:00+02:00
experimenter: ["Doe, Jane"]
institution: Example University
experiment_description: spontaneous activity
subject: {subject_id: m12, species: Mus musculus, sex: F, age: P90D}
imaging_plane: {indicator: GCaMP6s, location: VISp, excitation_lambda: 920, emission_lambda: 510}
"""


@pytest.fixture(scope="module")
def exported(small_result, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nwb")
    (tmp / "meta.yaml").write_text(METADATA)
    out = tmp / "small.nwb"
    proc = run_cli("export", small_result, "--nwb", str(out), "--metadata", str(tmp / "meta.yaml"))
    assert "wrote" in proc.stdout and "no subject" not in proc.stdout
    return out


def test_pynwb_reads_back_the_result(small_result, exported):
    ds = schema.open_result(small_result).load()
    with NWBHDF5IO(str(exported), "r") as io:
        nwb = io.read()
        ophys = nwb.processing["ophys"]
        seg = ophys["ImageSegmentation"]["PlaneSegmentation"]
        np.testing.assert_array_equal(seg["image_mask"].data[:].transpose(0, 2, 1), ds["masks"].values)
        np.testing.assert_array_equal(seg["footprint"].data[:].transpose(0, 2, 1), ds["footprints"].values)
        np.testing.assert_array_equal(seg.id.data[:], ds["unit"].values)
        np.testing.assert_array_equal(seg["Accepted"].data[:], ds["accepted"].values)
        np.testing.assert_array_equal(seg["score"].data[:], ds["score"].values)
        for container, name, var in (("Fluorescence", "Denoised", "traces"), ("Fluorescence", "Deconvolved", "spikes"),
                                     ("DfOverF", "RoiResponseSeries", "dff")):
            series = ophys[container][name]
            np.testing.assert_array_equal(series.data[:], ds[var].values.T)
            assert series.rate == ds.attrs["fps"] and series.rois.table is seg
        np.testing.assert_array_equal(ophys["MotionCorrectionShifts"].data[:], ds["shifts"].values)
        np.testing.assert_array_equal(ophys["SegmentationImages"]["mean"].data[:], ds["mean_image"].values.T)
        assert nwb.subject.subject_id == "m12" and nwb.experimenter == ("Doe, Jane",)
        assert nwb.session_start_time == dt.datetime(2024, 5, 2, 8, 31, tzinfo=dt.timezone.utc)
        plane = nwb.imaging_planes["ImagingPlane"]
        assert plane.indicator == "GCaMP6s" and plane.excitation_lambda == 920.0
        assert "somaflow" in nwb.source_script and '"method": "cnmf"' in nwb.notes


def test_roiextractors_reads_back_the_result(small_result, exported):
    ds = schema.open_result(small_result).load()
    ext = NwbSegmentationExtractor(str(exported))
    np.testing.assert_array_equal(ext.get_roi_image_masks().transpose(2, 0, 1), ds["masks"].values)
    np.testing.assert_array_equal(ext.get_traces(name="denoised").T, ds["traces"].values)
    np.testing.assert_array_equal(ext.get_traces(name="dff").T, ds["dff"].values)
    np.testing.assert_array_equal(ext.get_traces(name="deconvolved").T, ds["spikes"].values)
    np.testing.assert_array_equal(ext.get_property("accepted", ext.get_roi_ids()), ds["accepted"].values)
    assert ext.get_roi_ids() == ds["unit"].values.tolist()
    assert ext.get_sampling_frequency() == ds.attrs["fps"]
    assert ext.get_frame_shape() == (ds.sizes["y"], ds.sizes["x"])
    np.testing.assert_array_equal(ext.get_images_dict()["correlation"], ds["correlation_image"].values)


def test_nwbinspector_finds_nothing_to_fix(exported):
    serious = [m for m in inspect_nwbfile(nwbfile_path=exported)
               if m.importance.name in ("CRITICAL", "BEST_PRACTICE_VIOLATION")]
    assert serious == [], [f"{m.check_function_name}: {m.message}" for m in serious]


def test_without_metadata_only_the_subject_is_missing(small_result, tmp_path):
    """What the result cannot know: nwbinspector's one critical finding is the missing subject,
    and the command says how to give it."""
    out = tmp_path / "bare.nwb"
    export_nwb(small_result, str(out))
    serious = [m for m in inspect_nwbfile(nwbfile_path=out)
               if m.importance.name in ("CRITICAL", "BEST_PRACTICE_VIOLATION")]
    assert [m.check_function_name for m in serious] == ["check_subject_exists"]
    with NWBHDF5IO(str(out), "r") as io:
        nwb = io.read()
        # the result's time of writing stands in for the unknown acquisition time
        assert nwb.session_start_time == dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
        assert np.isnan(nwb.imaging_planes["ImagingPlane"].excitation_lambda)
    proc = run_cli("export", small_result, "--nwb", str(tmp_path / "cli.nwb"))
    assert "no subject given" in proc.stdout and "--metadata" in proc.stdout


def test_export_bad_input(small_result, tmp_path):
    inside = run_cli("export", small_result, "--nwb", f"{small_result}/x.nwb", check=False)
    assert inside.returncode == 2 and "lies inside the input" in inside.stderr
    assert len(inside.stderr.strip().splitlines()) == 1
    (tmp_path / "exists.nwb").write_bytes(b"x")
    exists = run_cli("export", small_result, "--nwb", str(tmp_path / "exists.nwb"), check=False)
    assert exists.returncode == 3 and "--overwrite" in exists.stderr
    assert (tmp_path / "exists.nwb").read_bytes() == b"x"
    (tmp_path / "bad.yaml").write_text("subject: {subject_id: m1, colour: red}\n")
    bad = run_cli("export", small_result, "--nwb", str(tmp_path / "o.nwb"), "--metadata",
                  str(tmp_path / "bad.yaml"), check=False)
    assert bad.returncode == 2 and "subject.colour" in bad.stderr and "bad.yaml" in bad.stderr
    assert not (tmp_path / "o.nwb").exists()
    with pytest.raises(Exception, match="extra"):
        NwbMetadata.model_validate({"colour": "red"})
