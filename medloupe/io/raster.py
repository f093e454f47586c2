"""PNG, JPEG, TIFF and BMP intake with Pillow."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from medloupe.config import env_name
from medloupe.errors import CorruptImageError, EmptyImageError, ImageTooLargeError
from medloupe.io.records import ImageRecord, LoadedImage, SourceFormat
from medloupe.io.render import content_hash, percentile_window, window_linear

_FORMATS: dict[str, SourceFormat] = {"PNG": "png", "JPEG": "jpeg", "TIFF": "tiff", "BMP": "bmp"}


def read_raster(
    path: Path, *, max_pixels: int, modality: str | None = None, frame: int | None = None
) -> LoadedImage:
    """Decode a raster image.

    Grayscale (``L``, ``I;16``, ``I``, ``F``) stays one channel; 16-bit and float images keep
    their values in ``raw`` and are rendered with a 0.5-99.5 percentile window; palette,
    RGBA and CMYK become RGB. Multi-page TIFF: ``frame`` picks the page (default 0).
    The pixel limit is checked from the header, before decoding.
    """
    from PIL import Image, UnidentifiedImageError

    name = str(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
    except UnidentifiedImageError:
        raise CorruptImageError(name, "not a readable PNG/JPEG/TIFF/BMP image") from None
    except (OSError, Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise CorruptImageError(name, f"cannot open image ({exc})") from None
    with img:
        fmt = _FORMATS.get(img.format or "")
        if fmt is None:
            raise CorruptImageError(
                name, f"image format {img.format!r} is not supported", "convert it to PNG"
            )
        width, height = img.size
        if width * height == 0:
            raise EmptyImageError(name, "the image has no pixels")
        if width * height > max_pixels:
            raise ImageTooLargeError(
                name,
                f"{width}x{height} = {width * height:,} pixels exceeds the limit of {max_pixels:,}",
                f"raise {env_name('max_pixels')} or downsample the image",
            )
        n_frames = int(getattr(img, "n_frames", 1))
        index = 0 if frame is None else frame
        if not 0 <= index < n_frames:
            raise CorruptImageError(
                name, f"frame {index} requested but the file has {n_frames} frame(s)"
            )
        try:
            if n_frames > 1:
                img.seek(index)
            img.load()
        except (OSError, SyntaxError, ValueError) as exc:
            raise CorruptImageError(name, f"truncated or corrupt image data ({exc})") from None
        raw: np.ndarray | None = None
        notes: list[str] = []
        window = None
        if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            raw = np.asarray(img, dtype=np.float32)
            window = percentile_window(raw)
            display = window_linear(raw, *window)
            notes.append(f"{img.mode} image rendered with a 0.5-99.5 percentile window")
            channels = 1
        elif img.mode in ("L", "1", "LA"):
            display = np.asarray(img.convert("L"), dtype=np.uint8)
            channels = 1
        else:
            # an RGB image is read as is (a convert would hold a second full copy)
            rgb = np.asarray(img if img.mode == "RGB" else img.convert("RGB"), dtype=np.uint8)
            img.close()  # the decoder's own buffer goes before the channel checks
            if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(
                rgb[..., 1], rgb[..., 2]
            ):
                display = np.ascontiguousarray(rgb[..., 0])
                channels = 1
            else:
                display = rgb
                channels = 3
    record = ImageRecord(
        content_hash=content_hash(raw if raw is not None else display),
        format=fmt,
        modality=modality or "OT",
        width=width,
        height=height,
        channels=channels,  # type: ignore[arg-type]
        frames=n_frames,
        frame=index,
        window=window,
        notes=notes,
    )
    return LoadedImage(record=record, display=display, raw=raw)
