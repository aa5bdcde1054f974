"""Predicting volumes: a network trained on `medseg slices` output cuts a new volume as its slices were cut and
writes a label volume with the input's shape, spacing, origin and direction (NIfTI; DICOM SEG for a series).

The round trip: phantom NIfTI volumes with spacing (0.7, 0.7, 2.5) and a rotated direction -> slices -> one
epoch of training -> predict the volume: the geometry must match exactly and the foreground must lie on the lesion.
"""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from tests.conftest import TINY, medseg_inprocess, refused
from tests.dicom_series import write_series

from medseg.config import load_recipe
from medseg.data.io import read_image
from medseg.data.volume_io import probe_volume, read_volume
from medseg.data.volumes import make_slices
from medseg.engine.train import train
from medseg.engine.volume_predict import Slicing, slice_batches, slicing_of
from medseg.errors import MedsegError

SHAPE = (48, 40, 24)
SPACING = (0.7, 0.7, 2.5)
WINDOW = (-100.0, 400.0)


def _rotation(about_z: float, about_x: float) -> np.ndarray:
    cz, sz, cx, sx = np.cos(about_z), np.sin(about_z), np.cos(about_x), np.sin(about_x)
    return np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]]) @ np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])


AFFINE = np.eye(4)  # RAS, as NIfTI stores it: rotated 30 degrees about z and 15 about x, anisotropic voxels
AFFINE[:3, :3] = _rotation(np.pi / 6, np.pi / 12) @ np.diag(SPACING)
AFFINE[:3, 3] = (-20.0, 35.0, 12.0)


def _phantom(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(HU volume, lesion) of SHAPE: a bright ellipsoid in noise, round in voxels, so it spans most slices (2.5 mm
    apart: 3.6 times longer than wide in millimetres)."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    centre = rng.uniform((14, 12, 10), (34, 28, SHAPE[2] - 10))
    radius = rng.uniform(7, 11)
    lesion = (x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2 < radius ** 2
    return (rng.normal(0, 30, SHAPE) + 300 * lesion).astype(np.int16), lesion.astype(np.uint8)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(run, volume folder): a U-Net trained one epoch on the slices of eight phantom volumes."""
    root = tmp_path_factory.mktemp("volumes")
    (root / "vol" / "images").mkdir(parents=True)
    (root / "vol" / "labels").mkdir()
    for i in range(8):
        image, lesion = _phantom(i)
        nib.save(nib.Nifti1Image(image, AFFINE), root / "vol" / "images" / f"case{i}.nii.gz")
        nib.save(nib.Nifti1Image(lesion, AFFINE), root / "vol" / "labels" / f"case{i}.nii.gz")
    make_slices(root / "vol", root / "slices", window=WINDOW)
    recipe = load_recipe("unet", [*TINY, "data.size=48", "train.epochs=1", "optim.lr=0.003"])
    run = train(recipe, root / "slices", out=root / "runs", progress=False)
    return run.path, root / "vol"


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def test_the_model_folder_records_how_its_slices_were_made(trained):
    run, _ = trained
    config = json.loads((run / "model" / "config.json").read_text())
    assert config["slicing"] == {"mode": "stack", "edge": "triple", "axis": 2, "window": list(WINDOW)}
    assert slicing_of(config) == Slicing("stack", "triple", WINDOW)
    with pytest.raises(MedsegError, match="was not trained on slices from `medseg slices`"):
        slicing_of({"name": "unet"})


def test_nifti_round_trip_keeps_the_grid_and_finds_the_lesion(trained, tmp_path):
    run, volumes = trained
    source = volumes / "images" / "case0.nii.gz"
    result = medseg_inprocess("predict", str(run), str(source), "--out", str(tmp_path / "pred"), "--probabilities")
    assert result.returncode == 0, result.stderr
    written = nib.load(tmp_path / "pred" / "case0.nii.gz")
    original = nib.load(source)
    assert written.shape == original.shape == SHAPE
    assert np.allclose(written.affine, AFFINE) and np.allclose(written.header.get_zooms(), SPACING)
    assert np.allclose(written.get_qform(), original.get_qform()) and np.allclose(written.get_sform(), AFFINE)
    back, image = read_volume(tmp_path / "pred" / "case0.nii.gz"), read_volume(source)
    assert back.spacing == pytest.approx(image.spacing) and back.origin == pytest.approx(image.origin)
    assert back.direction == pytest.approx(image.direction)
    labels = np.asarray(written.dataobj)
    lesion = np.asarray(nib.load(volumes / "labels" / "case0.nii.gz").dataobj) > 0
    assert labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 1}
    assert _dice(labels > 0, lesion) > 0.5  # 0.81 measured after one epoch
    probabilities = np.asarray(nib.load(tmp_path / "pred" / "case0_prob.nii.gz").dataobj)
    assert probabilities.shape == SHAPE and np.array_equal(probabilities > 127, labels > 0)
    manifest = json.loads((tmp_path / "pred" / "predict.json").read_text())
    assert manifest["complete"] and manifest["settings"]["slicing"]["window"] == list(WINDOW)
    assert manifest["volumes"][0]["outputs"] == ["case0.nii.gz", "case0_prob.nii.gz"]
    assert manifest["volumes"][0]["spacing"] == pytest.approx(image.spacing)


def test_nrrd_and_metaimage_inputs_give_nifti_on_their_grid(trained, tmp_path):
    run, volumes = trained
    image = sitk.ReadImage(str(volumes / "images" / "case1.nii.gz"))
    for name in ("case1.nrrd", "case1b.mha"):
        sitk.WriteImage(image, str(tmp_path / name))
    result = medseg_inprocess("predict", str(run), str(tmp_path / "case1.nrrd"), str(tmp_path / "case1b.mha"),
                              "--out", str(tmp_path / "pred"))
    assert result.returncode == 0, result.stderr
    nifti = np.asarray(nib.load(tmp_path / "pred" / "case1.nii.gz").dataobj)
    source = read_volume(tmp_path / "case1.nrrd")
    for stem in ("case1", "case1b"):
        back = read_volume(tmp_path / "pred" / f"{stem}.nii.gz")
        assert back.array.shape == SHAPE and np.array_equal(back.array, nifti)
        assert back.spacing == pytest.approx(source.spacing) and back.origin == pytest.approx(source.origin)
        assert back.direction == pytest.approx(source.direction, abs=1e-6)
    lesion = np.asarray(nib.load(volumes / "labels" / "case1.nii.gz").dataobj) > 0
    assert _dice(nifti > 0, lesion) > 0.5


def test_dicom_series_predicts_to_nifti_and_a_dicom_seg_of_the_source_series(trained, tmp_path):
    import highdicom as hd
    import pydicom

    run, _ = trained
    image, lesion = _phantom(11)
    direction = tuple(_rotation(np.pi / 5, 0.0).ravel())
    uid = "1.2.826.0.1.3680043.2.1125.77"
    names = [f"IM{(7 * k) % SHAPE[2]:03d}.dcm" for k in range(SHAPE[2])]  # file names out of slice order
    write_series(tmp_path / "series", image.astype(np.float32), uid, "phantom", spacing=SPACING,
                 origin=(-10.0, 4.0, 30.0), direction=direction, names=names)
    result = medseg_inprocess("predict", str(run), str(tmp_path / "series"), "--out", str(tmp_path / "pred"),
                              "--dicom-seg")
    assert result.returncode == 0, result.stderr
    source = read_volume(tmp_path / "series")
    back = read_volume(tmp_path / "pred" / "series.nii.gz")
    assert back.array.shape == SHAPE and back.spacing == pytest.approx(SPACING)
    assert back.origin == pytest.approx(source.origin) and back.direction == pytest.approx(direction, abs=1e-6)
    assert _dice(back.array > 0, lesion > 0) > 0.5

    seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(tmp_path / "pred" / "series.seg.dcm"))
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == uid
    referenced = {item.ReferencedSOPInstanceUID for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in (tmp_path / "series").iterdir()]
    in_slice_order = [h.SOPInstanceUID for h in sorted(headers, key=lambda h: int(h.InstanceNumber))]
    assert referenced <= set(in_slice_order) and len(referenced) > 0
    # each source image's frame of the SEG is the NIfTI's slice at its position (empty frames are left out)
    pixels = seg.get_pixels_by_source_instance(in_slice_order, assert_missing_frames_are_empty=True)
    assert pixels.shape == (SHAPE[2], SHAPE[1], SHAPE[0], 1)
    for k in range(SHAPE[2]):
        assert np.array_equal(pixels[k, :, :, 0] > 0, back.array[:, :, k].T > 0), k


def test_slices_fed_to_the_network_are_the_slices_it_was_trained_on(tmp_path):
    """For every mode, the images predict builds from a volume equal the PNGs `medseg slices` wrote from it."""
    (tmp_path / "vol" / "images").mkdir(parents=True)
    (tmp_path / "vol" / "labels").mkdir()
    image, lesion = _phantom(3)
    nib.save(nib.Nifti1Image(image, AFFINE), tmp_path / "vol" / "images" / "a.nii.gz")
    nib.save(nib.Nifti1Image(lesion, AFFINE), tmp_path / "vol" / "labels" / "a.nii.gz")
    volume = read_volume(tmp_path / "vol" / "images" / "a.nii.gz")
    for mode, edge, window, channels in (("stack", "triple", WINDOW, 3), ("stack", "repeat", None, 3),
                                         ("sum", "triple", WINDOW, 3), ("single", None, (-50.0, 250.0), 1)):
        out = tmp_path / f"{mode}-{edge}"
        make_slices(tmp_path / "vol", out, window=window, mode=mode, edge=edge or "triple")
        batches = list(slice_batches(volume, Slicing(mode, edge, window), channels, batch_size=5))
        assert [len(k) for k, _ in batches] == [5, 5, 5, 5, 4]
        for indices, images in batches:
            for k, fed in zip(indices, images):
                written = read_image(out / "images" / f"a_{k:04d}.png")
                expected = written if written.shape[2] == channels else np.repeat(written, channels, axis=2)
                assert np.array_equal(fed.numpy().transpose(1, 2, 0), expected), (mode, edge, k)


def test_volume_refusals_are_one_line(trained, tiny_run, tmp_path):
    run, volumes = trained
    nifti = str(volumes / "images" / "case2.nii.gz")
    refused(medseg_inprocess("predict", str(tiny_run.path), nifti, "--out", str(tmp_path / "a")),
            f"{nifti} is a NIfTI volume", "was not trained on slices from `medseg slices`")
    refused(medseg_inprocess("predict", str(run), nifti, "--out", str(tmp_path / "b"), "--dicom-seg"),
            "--dicom-seg", "not a DICOM series folder")
    png = tmp_path / "slice.png"
    png.write_bytes((volumes.parent / "slices" / "images" / "case0_0000.png").read_bytes())
    refused(medseg_inprocess("predict", str(run), nifti, str(png), "--out", str(tmp_path / "c")),
            "1 of 2 input(s) cannot be predicted", "case2.nii.gz", "predicts volumes given in a call of their own")
    refused(medseg_inprocess("predict", str(run), nifti, "--out", str(tmp_path / "d"), "--overlay"),
            "--overlay is for 2D images")
    refused(medseg_inprocess("predict", str(run), str(png), "--out", str(tmp_path / "e"), "--dicom-seg"),
            "--dicom-seg and --series are for DICOM series folders")
    assert not any((tmp_path / name).exists() for name in "abcde")


def test_an_exported_model_predicts_volumes_as_its_run_does(trained, tmp_path):
    from medseg.engine.export import export

    run, volumes = trained
    sidecar = export(run, "onnx", tmp_path / "onnx", exporter="torchscript")
    assert sidecar["slicing"]["mode"] == "stack" and sidecar["slicing"]["window"] == list(WINDOW)
    source = str(volumes / "images" / "case3.nii.gz")
    for model, out in ((run, "from-run"), (tmp_path / "onnx", "from-onnx")):
        result = medseg_inprocess("predict", str(model), source, "--out", str(tmp_path / out), "--device", "cpu")
        assert result.returncode == 0, result.stderr
    run_labels = np.asarray(nib.load(tmp_path / "from-run" / "case3.nii.gz").dataobj)
    onnx_labels = np.asarray(nib.load(tmp_path / "from-onnx" / "case3.nii.gz").dataobj)
    assert run_labels.any() and np.mean(run_labels == onnx_labels) > 0.999


def test_a_bad_volume_is_refused_before_any_output_and_volumes_are_read_one_at_a_time(trained, tmp_path):
    run, volumes = trained
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a nifti file")
    out = tmp_path / "pred"
    result = medseg_inprocess("predict", str(run), str(volumes / "images" / "case4.nii.gz"), str(broken),
                              "--out", str(out))
    refused(result, "cannot read volume", "broken.nii.gz")
    assert not out.exists()
    assert probe_volume(volumes / "images" / "case4.nii.gz") == SHAPE
