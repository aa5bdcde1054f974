"""Reading 3D volumes: NIfTI, NRRD, MetaImage and DICOM series, as one voxel array plus its geometry.

Axis order: the array is (X, Y, Z) in the file's own voxel order (X the fastest-varying index, a DICOM
slice's columns; Z the slice axis), the order nibabel gives for NIfTI. Nothing is resampled or reoriented,
so the slices medseg wrote from NIfTI before other formats were read stay byte-identical, and a volume stored
as NIfTI, NRRD or MHA with the same voxels gives the same slices.

Libraries (the choice the issue left open): NIfTI stays on nibabel, which medseg used before (its scaling and
voxel order are what existing slice folders were written with); everything else is read with SimpleITK, whose
array (Z, Y, X) is transposed to (X, Y, Z). DICOM series go through SimpleITK's GDCM reader rather than
pydicom: it finds the series in a folder (GetGDCMSeriesIDs), sorts files by position along the slice normal
(GetGDCMSeriesFileNames) and applies RescaleSlope / RescaleIntercept, so CT voxels come out in HU.

Geometry is reported in SimpleITK's LPS convention (spacing, origin, direction columns per voxel axis);
nibabel's RAS affine is converted to it.

GDCM's DICOM writer (SimpleITK 2.5) sets the process locale to "C" and leaves it there; Python's text files then
default to ASCII, and a recipe or report with a non-ASCII character fails to read or write. Reading did not do
so here, but every DICOM call runs inside `keeping_locale`, which puts the locale back, so that a GDCM build
that does cannot break the rest of the process; writers of DICOM (the tests) use it too.
"""

from __future__ import annotations

import contextlib
import locale
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg.errors import MedsegError
from medseg.files import atomic_file

NIFTI = (".nii", ".nii.gz")
ITK_FILES = (".nrrd", ".nhdr", ".mha", ".mhd")
VOLUME_FILES = NIFTI + ITK_FILES
_SERIES_DESCRIPTION = "0008|103e"
_POSITION = "0020|0032"
_ORIENTATION = "0020|0037"


@dataclass(frozen=True)
class Volume:
    """Voxels (X, Y, Z) and where they lie (LPS, millimetres)."""

    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]  # 3x3 row-major; column i is voxel axis i's unit vector


def volume_stem(path: Path) -> str | None:
    """The name of a volume file without its extension, or None when it is not a volume file."""
    name = path.name
    for suffix in VOLUME_FILES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return None


@contextlib.contextmanager
def keeping_locale():
    """Restore the process locale after GDCM (through SimpleITK) has set it to "C"."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def is_dicom_folder(path: Path) -> bool:
    """Whether `path` is a folder holding at least one DICOM series."""
    if not path.is_dir():
        return False
    import SimpleITK as sitk

    with keeping_locale():
        return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path)))


def same_grid(a: Volume, b: Volume) -> str | None:
    """None when two volumes of one shape lie on the same voxel grid, else what differs (for one-line messages).

    Loose tolerances (1e-3 in direction cosines, half the finest voxel in origin): headers written by different
    tools round differently, but a flipped or shifted label must not be paired voxel for voxel with its image.
    """
    if not np.allclose(a.direction, b.direction, atol=1e-3):
        return f"directions {_rounded(a.direction)} and {_rounded(b.direction)}"
    if not np.allclose(a.spacing, b.spacing, rtol=1e-3, atol=1e-4):
        return f"spacings {_rounded(a.spacing)} and {_rounded(b.spacing)}"
    if np.linalg.norm(np.subtract(a.origin, b.origin)) > 0.5 * min(a.spacing):
        return f"origins {_rounded(a.origin)} and {_rounded(b.origin)}"
    return None


def _rounded(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in np.round(values, 3)) + ")"


def read_volume(path: str | Path, series: str | None = None) -> Volume:
    """The volume in a NIfTI / NRRD / MetaImage file or a DICOM series folder (`series`: its UID, when several)."""
    path = Path(path)
    if path.is_dir():
        with keeping_locale():
            return _read_dicom(path, series)
    if path.name.lower().endswith(NIFTI):
        return _read_nifti(path)
    if path.name.lower().endswith(ITK_FILES):
        import SimpleITK as sitk

        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError as exc:
            raise MedsegError(f"cannot read volume {path}: {_first_line(exc)}") from None
        return _from_sitk(image, path)
    raise MedsegError(f"{path} is not a volume medseg reads: give .nii[.gz], .nrrd, .nhdr, .mha, .mhd or a DICOM "
                      "series folder")


def probe_volume(path: str | Path, series: str | None = None) -> tuple[int, ...]:
    """The shape `read_volume` would give, from the header alone (a DICOM series: its files, chosen and ordered);
    what it would refuse about the header or the series is refused here in the same line, without reading voxels,
    so a command can check many volumes before holding any of them."""
    path = Path(path)
    if path.is_dir():
        _, files = dicom_series_files(path, series)
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(files[0])
        with keeping_locale():
            reader.ReadImageInformation()
        return (*reader.GetSize()[:2], len(files))
    if path.name.lower().endswith(NIFTI):
        import nibabel as nib

        try:
            shape = tuple(n for n in nib.load(str(path)).shape if n != 1)
        except Exception as exc:  # nibabel raises several types for damaged files
            raise MedsegError(f"cannot read volume {path}: {exc}") from None
        if len(shape) != 3:
            raise MedsegError(f"volume {path} has shape {shape}; medseg slices 3-D volumes")
        return shape
    if path.name.lower().endswith(ITK_FILES):
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()
        except RuntimeError as exc:
            raise MedsegError(f"cannot read volume {path}: {_first_line(exc)}") from None
        if reader.GetDimension() != 3 or reader.GetNumberOfComponents() != 1:
            raise MedsegError(f"volume {path} has {reader.GetDimension()} dimensions and "
                              f"{reader.GetNumberOfComponents()} components per voxel; medseg slices scalar 3-D "
                              "volumes")
        return tuple(reader.GetSize())
    raise MedsegError(f"{path} is not a volume medseg reads: give .nii[.gz], .nrrd, .nhdr, .mha, .mhd or a DICOM "
                      "series folder")


def _first_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def _three_d(array: np.ndarray, path: Path) -> np.ndarray:
    array = np.squeeze(array)
    if array.ndim != 3:
        raise MedsegError(f"volume {path} has shape {array.shape}; medseg slices 3-D volumes")
    return array


def _read_nifti(path: Path) -> Volume:
    import nibabel as nib

    try:
        image = nib.load(str(path))
        data = np.asanyarray(image.dataobj)
    except Exception as exc:  # nibabel raises several types for damaged files
        raise MedsegError(f"cannot read volume {path}: {exc}") from None
    data = _three_d(data, path)
    affine = np.asarray(image.affine, np.float64)
    lps = np.diag([-1.0, -1.0, 1.0]) @ affine[:3]  # RAS -> LPS
    spacing = np.linalg.norm(lps[:, :3], axis=0)
    direction = lps[:, :3] / np.where(spacing > 0, spacing, 1)
    return Volume(data, tuple(float(s) for s in spacing), tuple(float(o) for o in lps[:, 3]),
                  tuple(float(d) for d in direction.ravel()))


def _from_sitk(image, path: Path) -> Volume:
    import SimpleITK as sitk

    if image.GetDimension() != 3:
        raise MedsegError(f"volume {path} has {image.GetDimension()} dimensions; medseg slices 3-D volumes")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise MedsegError(f"volume {path} has {image.GetNumberOfComponentsPerPixel()} components per voxel; "
                          "medseg slices scalar volumes (one value per voxel)")
    array = sitk.GetArrayFromImage(image).transpose(2, 1, 0)  # 3-D already: a one-slice series keeps Z = 1
    return Volume(array, tuple(image.GetSpacing()), tuple(image.GetOrigin()), tuple(image.GetDirection()))


def _read_dicom(folder: Path, series: str | None) -> Volume:
    import SimpleITK as sitk

    chosen, files = dicom_series_files(folder, series)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise MedsegError(f"cannot read DICOM series {chosen} in {folder}: {_first_line(exc)}") from None
    return _from_sitk(image, folder)


def dicom_series_files(folder: Path, series: str | None = None) -> tuple[str, list[str]]:
    """The UID of the series `read_volume(folder, series)` reads and its files in slice order: file k is the
    volume's slice Z = k (writers of DICOM derived from a volume, e.g. SEG, map slices to files with it)."""
    import SimpleITK as sitk

    folder = Path(folder)
    with keeping_locale():
        ids = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
        if not ids:
            raise MedsegError(f"{folder} holds no DICOM series; give a folder of one series' .dcm files")
        if series is not None:
            if series not in ids:
                raise MedsegError(f"{folder} has no DICOM series {series}; it holds {describe_series(folder, ids)}")
            chosen = series
        elif len(ids) > 1:
            raise MedsegError(f"{folder} holds {len(ids)} DICOM series: {describe_series(folder, ids)}; "
                              "pick one with --series UID")
        else:
            chosen = ids[0]
        return chosen, _by_position(folder, sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), chosen))


def _tag(path: str, key: str) -> str:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.ReadImageInformation()
    return reader.GetMetaData(key).strip() if reader.HasMetaDataKey(key) else ""


def series_ids(folder: str | Path) -> list[str]:
    """The UIDs of the DICOM series in `folder` (empty when it holds none)."""
    import SimpleITK as sitk

    with keeping_locale():
        return list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))


def describe_series(folder: Path, ids: list[str]) -> str:
    """Each series as 'UID ("description", N slices)'."""
    import SimpleITK as sitk

    parts = []
    with keeping_locale():
        for uid in ids:
            files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)
            description = _tag(files[0], _SERIES_DESCRIPTION) or "no description"
            parts.append(f'{uid} ("{description}", {len(files)} slices)')
    return ", ".join(parts)


def _by_position(folder: Path, files: tuple[str, ...]) -> list[str]:
    """The files sorted along the slice normal; duplicate positions or a gap (a missing slice) refused in one line.

    GDCM sorts by position too, but falls back to file names when two slices share one, so the order is checked
    here. A gap is a step more than 1.5 times the median step; 2.5D images would join slices that are not
    neighbours, so both are refused rather than read (SimpleITK itself only warns).
    """
    positions, orientation = [], ""
    for name in files:
        position = _tag(name, _POSITION)
        if not position:
            return list(files)  # no ImagePositionPatient (e.g. secondary capture): GDCM's order stands
        positions.append([float(v) for v in position.split("\\")])
        orientation = orientation or _tag(name, _ORIENTATION)
    if len(files) < 2 or not orientation:
        return list(files)
    cosines = [float(v) for v in orientation.split("\\")]
    along = np.asarray(positions) @ np.cross(cosines[:3], cosines[3:])
    order = np.argsort(along, kind="stable")
    files, along = [files[i] for i in order], along[order]
    steps = np.diff(along)
    duplicates = np.flatnonzero(steps < 1e-3)
    if duplicates.size:
        first = duplicates[0]
        raise MedsegError(f"{folder}: {duplicates.size} slice(s) repeat a position already taken ("
                          f"{Path(files[first]).name} and {Path(files[first + 1]).name} both at {along[first]:.2f} mm "
                          "along the slice normal); remove the duplicate files, or pick one series with --series UID")
    step = float(np.median(steps))
    gaps = np.flatnonzero(steps > 1.5 * step)
    if gaps.size:
        missing = int(sum(round(steps[i] / step) - 1 for i in gaps))
        raise MedsegError(f"{folder}: about {missing} slice(s) missing: the position jumps by {steps[gaps[0]]:.2f} mm "
                          f"after {Path(files[gaps[0]]).name} where slices are {step:.2f} mm apart; "
                          "restore the missing files")
    return files


def write_label_volume(labels: np.ndarray, like: Volume, out: str | Path, source: str | Path | None = None) -> Path:
    """Write a label volume (X, Y, Z) as NIfTI (`out` ends in .nii or .nii.gz) on the voxel grid of `like`,
    atomically. A NIfTI `source` lends its header (both qform and sform, codes and units), so the output lies
    exactly where the input did; any other source gets the affine built from `like`'s LPS geometry (RAS in the
    file, as NIfTI stores it), with qform and sform code 1 (scanner)."""
    import gzip

    import nibabel as nib

    out = Path(out)
    if labels.shape != like.array.shape:
        raise ValueError(f"labels {labels.shape} do not match the volume {like.array.shape}")
    data = np.ascontiguousarray(labels.astype(np.uint8 if labels.max(initial=0) <= 255 else np.uint16))
    if source is not None and Path(source).name.lower().endswith(NIFTI):
        reference = nib.load(str(source))
        header = reference.header.copy()
        header.set_data_dtype(data.dtype)
        header.set_slope_inter(1, 0)
        image = nib.Nifti1Image(data, reference.affine, header)
        image.set_qform(reference.get_qform(), int(reference.header["qform_code"]) or 1)
        image.set_sform(reference.get_sform(), int(reference.header["sform_code"]) or 1)
    else:
        linear = np.asarray(like.direction, np.float64).reshape(3, 3) * np.asarray(like.spacing)
        affine = np.eye(4)
        affine[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ linear  # LPS -> RAS
        affine[:3, 3] = np.diag([-1.0, -1.0, 1.0]) @ np.asarray(like.origin, np.float64)
        image = nib.Nifti1Image(data, affine)
        image.set_qform(affine, 1)
        image.set_sform(affine, 1)
        image.header.set_xyzt_units("mm")
    payload = image.to_bytes()
    if out.name.lower().endswith(".gz"):
        payload = gzip.compress(payload, compresslevel=6, mtime=0)
    with atomic_file(out) as tmp:
        tmp.write_bytes(payload)
    return out
