"""DICOM SEG of a predicted label volume: it references the source series' instances, and each source instance's
frame is the label slice read_volume stacked from that file, for shuffled file names, several classes, an empty
prediction and a folder of two series; wrong shapes are refused in one line."""

import random
import sys

import highdicom as hd
import numpy as np
import pydicom
import pytest

from dicom_series import write_series
from medseg.data.dicom_seg import write_dicom_seg
from medseg.data.volume_io import read_volume
from medseg.errors import MedsegError

SHAPE = (40, 32, 6)  # (X = columns, Y = rows, Z): not square, so a transposed frame cannot pass
SPACING = (0.7, 0.8, 2.5)
ORIGIN = (-12.0, 30.5, 101.0)
# Oblique: voxel axes rotated 30 degrees about the patient's z axis, then the slice normal tilted about x.
_C, _S = np.cos(np.radians(30)), np.sin(np.radians(30))
_TILT = np.array([[1, 0, 0], [0, np.cos(0.3), -np.sin(0.3)], [0, np.sin(0.3), np.cos(0.3)]])
DIRECTION = tuple((_TILT @ np.array([[_C, -_S, 0], [_S, _C, 0], [0, 0, 1]])).ravel())
UID = "1.2.826.0.1.3680043.2.1125.7.1"


def _ct() -> np.ndarray:
    return (np.arange(np.prod(SHAPE)).reshape(SHAPE) % 2000 - 1000).astype(np.int16)


def _series(folder, uid=UID, depth=SHAPE[2], description="phantom CT"):
    names = [f"IM{k:03d}.dcm" for k in range(depth)]
    random.Random(5).shuffle(names)
    assert names != sorted(names)
    return write_series(folder, _ct()[:, :, :depth], uid, description, spacing=SPACING, origin=ORIGIN,
                        direction=DIRECTION, names=names)


def _instances(uid=UID, depth=SHAPE[2]):
    """The SOP instance UIDs of slices 0..depth-1 as the series writer numbered them."""
    return [f"{uid}.{k + 1}" for k in range(depth)]


def _frames(seg, uid=UID, depth=SHAPE[2]) -> np.ndarray:
    """(Z, rows, columns, segments) per source instance in slice order; frames left out are empty."""
    return seg.get_pixels_by_source_instance(_instances(uid, depth), assert_missing_frames_are_empty=True)


def test_seg_references_the_series_and_each_frame_is_its_instances_label_slice(tmp_path):
    _series(tmp_path / "ct")
    volume = read_volume(tmp_path / "ct")
    assert volume.array.shape == SHAPE
    labels = np.zeros(SHAPE, np.uint8)
    labels[5:14, 20:24, 1] = 1  # a blob off the diagonal, different on each slice
    labels[6:15, 21:26, 2] = 1
    labels[30:33, 2:4, 4] = 1
    out = tmp_path / "pred" / "case.seg.dcm"
    assert write_dicom_seg(labels, tmp_path / "ct", out) == out
    assert sorted(p.name for p in out.parent.iterdir()) == ["case.seg.dcm"]  # no temporary left behind

    seg = hd.seg.segread(out)
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    referenced = seg.ReferencedSeriesSequence
    assert [item.SeriesInstanceUID for item in referenced] == [UID]
    assert {item.ReferencedSOPInstanceUID for item in referenced[0].ReferencedInstanceSequence} == set(_instances())
    assert seg.StudyInstanceUID == pydicom.dcmread(next((tmp_path / "ct").iterdir())).StudyInstanceUID
    pixels = _frames(seg)
    assert pixels.shape == (6, 32, 40, 1)
    for k in range(SHAPE[2]):
        np.testing.assert_array_equal(pixels[k, :, :, 0], labels[:, :, k].T)
    assert seg.NumberOfFrames == 3  # empty frames are left out
    positions = {source.SOPInstanceUID: [float(v) for v in source.ImagePositionPatient]
                 for source in map(pydicom.dcmread, (tmp_path / "ct").iterdir())}
    for frame in seg.PerFrameFunctionalGroupsSequence:  # each frame lies where its source slice lies
        source = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        np.testing.assert_allclose([float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient],
                                   positions[source], atol=1e-3)
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    np.testing.assert_allclose([float(v) for v in measures.PixelSpacing], [0.8, 0.7])  # (row, column) spacing

    segment = seg.SegmentSequence[0]
    assert segment.SegmentLabel == "class 1" and segment.SegmentAlgorithmType == "AUTOMATIC"
    assert segment.SegmentationAlgorithmIdentificationSequence[0].AlgorithmName == "medseg"
    assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "85756007"


def test_multi_class_labels_give_one_segment_per_class_present(tmp_path):
    _series(tmp_path / "ct")
    labels = np.zeros(SHAPE, np.uint8)
    labels[2:10, 3:9, 0:3] = 1
    labels[20:38, 10:30, 3] = 3  # class 2 absent
    labels[25:27, 12:14, 1] = 3
    out = write_dicom_seg(labels, tmp_path / "ct", tmp_path / "seg.dcm",
                          class_names=["background", "liver", "spleen", "tumour"])
    seg = hd.seg.segread(out)
    assert [item.SegmentLabel for item in seg.SegmentSequence] == ["liver", "tumour"]
    assert list(seg.segment_numbers) == [1, 2]
    pixels = _frames(seg)
    for k in range(SHAPE[2]):
        np.testing.assert_array_equal(pixels[k, :, :, 0], (labels[:, :, k] == 1).T)
        np.testing.assert_array_equal(pixels[k, :, :, 1], (labels[:, :, k] == 3).T)
    with pytest.raises(MedsegError, match=r"label value 3 has no name: class_names holds 2 names"):
        write_dicom_seg(labels, tmp_path / "ct", tmp_path / "other.dcm", class_names=["background", "liver"])
    assert not (tmp_path / "other.dcm").exists()


def test_an_all_background_prediction_is_a_valid_seg_with_one_empty_segment(tmp_path):
    _series(tmp_path / "ct")
    out = write_dicom_seg(np.zeros(SHAPE, np.uint8), tmp_path / "ct", tmp_path / "empty.dcm")
    seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(out))
    assert [item.SegmentLabel for item in seg.SegmentSequence] == ["class 1"]
    assert seg.NumberOfFrames == SHAPE[2]
    pixels = seg.get_pixels_by_source_instance(_instances())
    assert pixels.shape == (6, 32, 40, 1) and not pixels.any()


def test_series_uid_picks_one_of_two_series_in_a_folder(tmp_path):
    _series(tmp_path / "both")
    other = "1.2.826.0.1.3680043.2.1125.7.2"
    _series(tmp_path / "both", uid=other, depth=4, description="contrast")
    labels = np.zeros((*SHAPE[:2], 4), np.uint8)
    labels[10:12, 3:5, 2] = 1
    with pytest.raises(MedsegError, match="holds 2 DICOM series") as refused:
        write_dicom_seg(labels, tmp_path / "both", tmp_path / "seg.dcm")
    assert "\n" not in str(refused.value)
    seg = hd.seg.segread(write_dicom_seg(labels, tmp_path / "both", tmp_path / "seg.dcm", series_uid=other))
    assert [item.SeriesInstanceUID for item in seg.ReferencedSeriesSequence] == [other]
    pixels = _frames(seg, other, 4)
    for k in range(4):
        np.testing.assert_array_equal(pixels[k, :, :, 0], labels[:, :, k].T)


@pytest.mark.parametrize("shape", [(32, 40, 6), (40, 32, 5), (40, 32)])
def test_a_label_volume_of_another_shape_is_refused_in_one_line(tmp_path, shape):
    _series(tmp_path / "ct")
    with pytest.raises(MedsegError) as refused:
        write_dicom_seg(np.zeros(shape, np.uint8), tmp_path / "ct", tmp_path / "seg.dcm")
    message = str(refused.value)
    assert "\n" not in message and str(shape) in message
    if len(shape) == 3:
        assert f"DICOM series {UID} in {tmp_path / 'ct'}, which is (40, 32, 6) (columns, rows, slices)" in message
    assert not (tmp_path / "seg.dcm").exists()


def test_missing_highdicom_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "highdicom", None)
    with pytest.raises(MedsegError, match=r"^writing a DICOM SEG needs highdicom: pip install highdicom$"):
        write_dicom_seg(np.zeros(SHAPE, np.uint8), tmp_path, tmp_path / "seg.dcm")
