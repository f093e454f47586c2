"""Format detection and the single entry point :func:`load_image`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from medloupe.config import DEFAULT_MAX_PIXELS
from medloupe.errors import EmptyImageError, ImageIntakeError, UnsupportedImageError
from medloupe.io.records import LoadedImage
from medloupe.io.render import quality_problems

log = logging.getLogger(__name__)

Kind = Literal["raster", "dicom", "nifti"]

_RASTER_MAGIC = (
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff",
    b"II*\x00",
    b"MM\x00*",
    b"BM",
)


def detect_format(path: str | Path) -> Kind:
    """Sniff a file's content (not only its name) and say which reader takes it.

    Raises:
        EmptyImageError: the file has no bytes.
        UnsupportedImageError: the bytes are of no supported format.
        ImageIntakeError: the path does not exist or is not a file.
    """
    p = Path(path)
    if not p.exists():
        raise ImageIntakeError(str(p), "no such file")
    if not p.is_file():
        raise ImageIntakeError(str(p), "not a regular file")
    size = p.stat().st_size
    if size == 0:
        raise EmptyImageError(str(p), "the file is empty (0 bytes)")
    with p.open("rb") as fh:
        head = fh.read(352)
    lower = p.name.lower()
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if lower.endswith((".nii", ".nii.gz")) or head[344:348] in (b"n+1\x00", b"ni1\x00"):
        return "nifti"
    if head.startswith(_RASTER_MAGIC):
        return "raster"
    if lower.endswith((".dcm", ".dicom", ".ima")):
        return "dicom"  # DICOM without the 128-byte preamble; the reader validates it
    raise UnsupportedImageError(
        str(p),
        "unrecognised file format",
        "medloupe reads PNG, JPEG, TIFF, BMP, DICOM (.dcm) and NIfTI (.nii, .nii.gz)",
    )


def load_image(
    path: str | Path,
    *,
    frame: int | None = None,
    slice_index: int | None = None,
    axis: int = 2,
    modality: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> LoadedImage:
    """Read one 2D image from a file.

    Args:
        path: PNG/JPEG/TIFF/BMP, DICOM or NIfTI file.
        frame: DICOM multi-frame index, TIFF page or NIfTI 4D volume index.
        slice_index: NIfTI slice along ``axis`` (default: middle).
        axis: NIfTI axis cut across (0 sagittal, 1 coronal, 2 axial).
        modality: overrides (DICOM) or supplies (other formats) the modality code.
        max_pixels: pixel limit, checked before decoding.

    Raises:
        medloupe.errors.ImageIntakeError: and its subclasses, naming the file and the problem.
    """
    p = Path(path)
    kind = detect_format(p)
    log.debug("intake: %s reader", kind)
    if kind == "dicom":
        from medloupe.io.dicom import read_dicom

        loaded = read_dicom(p, frame=frame, max_pixels=max_pixels, modality_override=modality)
    elif kind == "nifti":
        from medloupe.io.nifti import read_nifti

        loaded = read_nifti(
            p,
            axis=axis,
            slice_index=slice_index,
            frame=frame,
            max_pixels=max_pixels,
            modality=modality,
        )
    else:
        from medloupe.io.raster import read_raster

        loaded = read_raster(p, max_pixels=max_pixels, modality=modality, frame=frame)
    quality = quality_problems(loaded.display, loaded.raw)
    if quality:
        loaded.record = loaded.record.model_copy(update={"quality": quality})
    return loaded
