"""Image intake: PNG/JPEG/TIFF/BMP, DICOM and NIfTI into a :class:`LoadedImage`.

>>> from medloupe.io import load_image
>>> img = load_image("chest.dcm")           # doctest: +SKIP
>>> img.record.modality, img.display.shape  # doctest: +SKIP
('CR', (1955, 1841))
"""

from __future__ import annotations

from medloupe.io.intake import ingest_image, read_input
from medloupe.io.loader import detect_format, load_image
from medloupe.io.records import ImageRecord, LoadedImage

__all__ = [
    "ImageRecord",
    "LoadedImage",
    "detect_format",
    "ingest_image",
    "load_image",
    "read_input",
]
