"""Uploads of ``medloupe serve``: what kind of image the bytes are, and how intake errors map
to HTTP statuses."""

from __future__ import annotations

import contextlib
import shutil
import zlib
from pathlib import Path

from fastapi import UploadFile

from medloupe.errors import (
    ImageIntakeError,
    ImageTooLargeError,
    InputError,
    UnsupportedImageError,
    UnsupportedTransferSyntaxError,
)

_RASTER_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*", b"BM")
_NIFTI_MAGIC = (b"n+1\x00", b"ni1\x00")


def sniff_upload(head: bytes) -> str:
    """The file suffix the reader needs for an upload whose first bytes are ``head``
    (352 bytes or more), judged from content only.

    Raises:
        UnsupportedImageError: not PNG/JPEG/TIFF/BMP, DICOM (with preamble) or NIfTI.
    """
    if len(head) >= 132 and head[128:132] == b"DICM":
        return ".dcm"
    if len(head) >= 348 and head[344:348] in _NIFTI_MAGIC:
        return ".nii"
    if head.startswith(b"\x1f\x8b"):
        with contextlib.suppress(zlib.error):
            inner = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(head, 348)
            if len(inner) >= 348 and inner[344:348] in _NIFTI_MAGIC:
                return ".nii.gz"
    if head.startswith(_RASTER_MAGIC):
        return ".img"
    raise UnsupportedImageError(
        "the upload",
        "not an image medloupe reads",
        "send PNG, JPEG, TIFF, DICOM (with its 128-byte preamble) or NIfTI (.nii, .nii.gz)",
    )


def intake_status(exc: InputError) -> int:
    if isinstance(exc, ImageTooLargeError):
        return 413
    if isinstance(exc, (UnsupportedImageError, UnsupportedTransferSyntaxError)):
        return 415
    if isinstance(exc, ImageIntakeError):
        return 400
    return 422


def problem_text(exc: InputError, tmp: Path | None) -> str:
    text = str(exc)
    if tmp is not None:  # never echo the server's own paths
        text = text.replace(str(tmp), "the upload")
    return text


def copy_upload(upload: UploadFile, target: Path) -> None:
    upload.file.seek(0)
    with target.open("wb") as out:
        shutil.copyfileobj(upload.file, out, 1024 * 1024)
