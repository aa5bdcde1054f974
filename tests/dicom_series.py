"""Writing small DICOM series in tests: one CT file per slice through SimpleITK/GDCM, HU stored through
RescaleSlope / RescaleIntercept, per-slice position tags, in any orientation and spacing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medseg.data.volume_io import keeping_locale

STUDY_UID = "1.2.826.0.1.3680043.2.1125.1"
FRAME_OF_REFERENCE_UID = "1.2.826.0.1.3680043.2.1125.2"


def sitk_image(voxels: np.ndarray, spacing, origin, direction) -> sitk.Image:
    """A SimpleITK image of `voxels` (X, Y, Z) on the given grid."""
    image = sitk.GetImageFromArray(voxels.transpose(2, 1, 0))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


def write_series(folder: Path, voxels: np.ndarray, uid: str, description: str, *, spacing, origin, direction,
                 slope: float = 2.0, intercept: float = -1024.0, names: list[str] | None = None) -> list[Path]:
    """One DICOM file per slice k of `voxels` (X, Y, Z) in HU; `names[k]` names slice k's file. Returns the files
    in slice order. SliceThickness is the slice spacing and all series share one study and frame of reference."""
    folder.mkdir(parents=True, exist_ok=True)
    volume = sitk.Cast(sitk_image(voxels, spacing, origin, direction), sitk.sitkFloat32)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    columns = direction[0::3][:3], direction[1::3][:3]
    orientation = "\\".join(str(v) for v in (*columns[0], *columns[1]))
    files = []
    for k in range(volume.GetDepth()):
        piece = volume[:, :, k]
        tags = {"0008|0060": "CT", "0020|000d": STUDY_UID, "0020|000e": uid, "0020|0052": FRAME_OF_REFERENCE_UID,
                "0008|103e": description, "0020|0037": orientation, "0020|0013": str(k + 1),
                "0020|0032": "\\".join(str(v) for v in volume.TransformIndexToPhysicalPoint((0, 0, k))),
                "0018|0050": str(spacing[2]), "0008|0018": f"{uid}.{k + 1}", "0028|1053": str(slope),
                "0028|1052": str(intercept), "0028|0100": "16", "0028|0101": "16", "0028|0102": "15",
                "0028|0103": "1"}
        for key, value in tags.items():
            piece.SetMetaData(key, value)
        files.append(folder / (names[k] if names else f"{uid}.{k}.dcm"))
        writer.SetFileName(str(files[-1]))
        with keeping_locale():  # GDCM leaves the locale at "C"
            writer.Execute(piece)
    return files
