"""Writing a predicted label volume as a DICOM Segmentation (SEG) of the series it was predicted from
(`medseg predict --dicom-seg`).

Standard: DICOM PS3.3 A.51 (Segmentation IOD) and C.8.20 (Segmentation Image module), built with highdicom, which
copies the patient, study and frame of reference of the source images and lists them in ReferencedSeriesSequence
and in each frame's DerivationImageSequence. The papers medseg implements say nothing of DICOM; every choice below
is ours:

- BINARY type, one segment per foreground class present in the labels, numbered 1..S in increasing class value
  (highdicom requires consecutive segment numbers from 1); the label is `class_names[k]` (a list indexed by label
  value, index 0 the background, as nnU-Net's dataset.json lists labels) or "class k".
- Segmented property category and type: SCT 85756007 "Tissue" for both, 3D Slicer's default for a new segment.
  medseg cannot know what a network was trained on (polyp, liver, infection, retinal layer), so it claims no more;
  the segment label carries the class name.
- Algorithm: AUTOMATIC, identified by `software` and medseg's version, family DCM 123110 "Artificial
  Intelligence" (CID 7162).
- Frames: frame k is `labels[:, :, k].T` over file k of `dicom_series_files` (the order `read_volume` stacks slices
  in), so highdicom takes each frame's position and orientation from its source file. Frames with no foreground are
  left out (highdicom's default; the standard allows it and readers treat them as empty).
- An all-background volume: a SEG needs at least one segment (highdicom fails on none), so it holds one empty
  segment for class 1, with all frames encoded (highdicom keeps them when every frame is empty). A reader then sees
  "nothing found" in a valid SEG rather than a missing file.
- Series number 1000 + the source's (1000 when it has none): viewers that sort by number list the SEG after its
  source. DeviceSerialNumber (Type 1 for SEG) is medseg's version: software has no serial number.
- Missing Type 2 patient / study attributes in the source (allowed empty there) are written empty.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import numpy as np

from medseg.data.volume_io import dicom_series_files
from medseg.errors import MedsegError
from medseg.files import atomic_file, user_write_errors

SERIES_NUMBER_OFFSET = 1000
# What a SEG takes over from its source images, whose absence the user must hear about in one line.
_GEOMETRY = ("FrameOfReferenceUID", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
             "SliceThickness")
# Type 2 in the source image IODs: present but possibly empty; highdicom reads them unconditionally.
_TYPE2 = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate",
          "StudyTime")


def write_dicom_seg(labels: np.ndarray, series_folder: Path, out: Path, series_uid: str | None = None,
                    class_names: list[str] | None = None, software: str = "medseg") -> Path:
    """Write `labels` (X, Y, Z) as read by `read_volume(series_folder, series_uid)`; 0 = background, 1..K-1 =
    classes) as a multi-frame DICOM SEG file `out` referencing that series; returns `out`."""
    try:
        import highdicom as hd
        from pydicom.sr.codedict import codes
    except ImportError:
        raise MedsegError("writing a DICOM SEG needs highdicom: pip install highdicom") from None
    import pydicom

    series_folder, out = Path(series_folder), Path(out)
    labels = _checked_labels(np.asarray(labels))
    chosen, files = dicom_series_files(series_folder, series_uid)
    sources = [pydicom.dcmread(name, stop_before_pixels=True) for name in files]
    _check_sources(sources, labels.shape, chosen, series_folder)

    present = [int(value) for value in np.unique(labels) if value != 0]
    classes = present or [1]
    segment_of_class = np.zeros(int(labels.max()) + 1, np.uint8 if len(present) < 256 else np.uint16)
    segment_of_class[present] = np.arange(1, len(present) + 1)
    frames = segment_of_class[labels].transpose(2, 1, 0)  # (Z, rows, columns): frame k is labels[:, :, k].T

    version = _medseg_version()
    algorithm = hd.AlgorithmIdentificationSequence(name=software, family=codes.DCM.ArtificialIntelligence,
                                                   version=version)
    descriptions = [
        hd.seg.SegmentDescription(segment_number=number, segment_label=_class_name(value, class_names),
                                  segmented_property_category=codes.SCT.Tissue,
                                  segmented_property_type=codes.SCT.Tissue,
                                  algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                                  algorithm_identification=algorithm)
        for number, value in enumerate(classes, start=1)]
    source_number = sources[0].get("SeriesNumber")
    try:
        segmentation = hd.seg.Segmentation(
            source_images=sources, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions, series_instance_uid=hd.UID(),
            series_number=SERIES_NUMBER_OFFSET + (int(source_number) if source_number is not None else 0),
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer=software, manufacturer_model_name=software,
            software_versions=version, device_serial_number=version,
            series_description=f"{software} segmentation"[:64], omit_empty_frames=bool(present))
    except ValueError as exc:  # highdicom's refusals of the source headers (e.g. rows differing between files)
        raise MedsegError(f"cannot build a DICOM SEG of series {chosen} in {series_folder}: {_one_line(exc)}; "
                          "write NIfTI instead (leave out --dicom-seg)") from None
    with user_write_errors(), atomic_file(out) as temporary:
        segmentation.save_as(temporary, enforce_file_format=True)
    return out


def _checked_labels(labels: np.ndarray) -> np.ndarray:
    if labels.ndim != 3:
        raise MedsegError(f"a DICOM SEG is written from a 3-D label volume (X, Y, Z); got shape {labels.shape}")
    if labels.dtype == bool:
        return labels.astype(np.uint8)
    if not np.issubdtype(labels.dtype, np.integer) or (labels.size and labels.min() < 0):
        raise MedsegError(f"a DICOM SEG is written from integer labels >= 0 (0 = background); got {labels.dtype} "
                          "values: take the argmax (or threshold) of the prediction first")
    if labels.size and labels.max() > np.iinfo(np.uint16).max:
        raise MedsegError(f"label value {labels.max()} is above 65535, the most segments a DICOM SEG holds")
    return labels


def _check_sources(sources: list, shape: tuple[int, ...], series: str, folder: Path) -> None:
    """The labels cover the series voxel for voxel, and the headers hold what a SEG copies from them."""
    first = sources[0]
    if "Rows" not in first or "Columns" not in first:
        raise MedsegError(f"DICOM series {series} in {folder} has no Rows / Columns: its files are not images")
    expected = (int(first.Columns), int(first.Rows), len(sources))
    if tuple(shape) != expected:
        raise MedsegError(f"label volume of shape {tuple(shape)} (X, Y, Z) does not cover DICOM series {series} in "
                          f"{folder}, which is {expected} (columns, rows, slices); give the labels predicted from "
                          "that series (as read_volume returned its array)")
    missing = [keyword for keyword in _GEOMETRY if first.get(keyword) in (None, "")]
    if missing:
        raise MedsegError(f"DICOM series {series} in {folder} lacks {', '.join(missing)}, which a DICOM SEG copies "
                          "from its source images; write NIfTI instead (leave out --dicom-seg)")
    for source in sources:
        for keyword in _TYPE2:
            if keyword not in source:
                setattr(source, keyword, "")


def _class_name(value: int, class_names: list[str] | None) -> str:
    if class_names is None:
        return f"class {value}"
    if value >= len(class_names):
        raise MedsegError(f"label value {value} has no name: class_names holds {len(class_names)} names for values "
                          f"0..{len(class_names) - 1} (index 0 the background); name every class")
    return class_names[value]


def _medseg_version() -> str:
    try:
        return metadata.version("medseg")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def _one_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return " ".join(lines) if lines else type(exc).__name__
