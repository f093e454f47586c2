"""The image record: what the rest of medloupe knows about an input image.

An :class:`ImageRecord` is small and JSON-serialisable; it travels in graph state and traces.
It carries no patient-identifying DICOM element: intake copies a fixed allow-list of
technical attributes (see :data:`medloupe.io.dicom.SAFE_TECHNICAL_ATTRIBUTES`) and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field

SourceFormat = Literal["png", "jpeg", "tiff", "bmp", "dicom", "nifti"]
SpacingSource = Literal["PixelSpacing", "ImagerPixelSpacing", "nifti-header", "user"]


class ImageRecord(BaseModel):
    """Technical description of one 2D image (one frame or slice) taken in at intake."""

    content_hash: str = Field(description="sha256 of the decoded pixel values, shape and dtype")
    format: SourceFormat
    modality: str = Field(
        description="DICOM Modality (CT, MR, CR, DX, US, ...) or a user-given one; 'OT' if unknown"
    )
    body_part: str | None = Field(default=None, description="DICOM BodyPartExamined, if present")
    view_position: str | None = Field(default=None, description="DICOM ViewPosition (PA, AP, ...)")
    width: int = Field(gt=0, description="pixels")
    height: int = Field(gt=0, description="pixels")
    channels: Literal[1, 3]
    frames: int = Field(default=1, ge=1, description="frames or slices in the source")
    frame: int = Field(default=0, ge=0, description="index of the frame or slice taken")
    axis: int | None = Field(default=None, description="NIfTI: the axis the slice was cut across")
    spacing_mm: tuple[float, float] | None = Field(
        default=None, description="(row, column) pixel spacing in millimetres, if known"
    )
    spacing_source: SpacingSource | None = None
    slice_thickness_mm: float | None = None
    photometric: str | None = None
    value_unit: str | None = Field(
        default=None, description="unit of the raw values after rescale, e.g. 'HU' for CT"
    )
    window: tuple[float, float] | None = Field(
        default=None, description="(centre, width) used to render the display image"
    )
    display_artifact: str | None = Field(
        default=None, description="artifact id of the 8-bit display PNG"
    )
    raw_artifact: str | None = Field(
        default=None,
        description="artifact id of the float32 .npy of modality values (HU for CT), if any",
    )
    notes: list[str] = Field(default_factory=list, description="intake warnings")
    quality: list[str] = Field(
        default_factory=list,
        description="why the image cannot inform an answer (too small, blank, not numbers); "
        "a run on such an image abstains with these reasons",
    )

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        return (self.width, self.height)


@dataclass
class LoadedImage:
    """A decoded image.

    Attributes:
        record: the technical record (artifact ids unset until :func:`ingest` stores it).
        display: ``uint8`` array, ``(H, W)`` grayscale or ``(H, W, 3)`` RGB, ready to show.
        raw: ``float32`` ``(H, W)`` modality values (HU for CT after rescale) or ``None`` when
            the display image is the data (PNG/JPEG, colour images).
    """

    record: ImageRecord
    display: np.ndarray
    raw: np.ndarray | None = None

    def rgb(self) -> np.ndarray:
        """The display image as ``(H, W, 3)`` uint8 RGB."""
        if self.display.ndim == 2:
            return np.repeat(self.display[:, :, None], 3, axis=2)
        return self.display
