"""Images for models: artifact ids to RGB pictures within a model's pixel cap, and data URIs.

Models have a pixel budget (Qwen2.5-VL's processor ``max_pixels``, an endpoint's request
size limit). Images above the cap are downscaled (aspect kept) before they are sent, never
cropped, so boxes stay meaningful after scaling back by the returned factor.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import math
from typing import TYPE_CHECKING

from medloupe.artifacts import ArtifactStore
from medloupe.errors import InputError

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

DEFAULT_MAX_IMAGE_PIXELS = 1280 * 28 * 28  # Qwen2.5-VL's default max_pixels (~1.0 MP)
MAX_DATA_URI_BYTES = 32 * 1024 * 1024


def fit_size(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """The largest size with the same aspect whose area is at most ``max_pixels``."""
    if width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    return max(1, int(width * scale)), max(1, int(height * scale))


def model_image(store: ArtifactStore, artifact_id: str, max_pixels: int) -> Image.Image:
    """The artifact as an RGB PIL image of at most ``max_pixels`` pixels (downscaled with a
    Lanczos filter when larger)."""
    from PIL import Image

    with Image.open(store.path(artifact_id)) as im:
        rgb = im.convert("RGB")
    size = fit_size(rgb.width, rgb.height, max_pixels)
    if size != (rgb.width, rgb.height):
        log.info(
            "image %s is %dx%d, above the model's %d-pixel cap: sent at %dx%d",
            artifact_id,
            rgb.width,
            rgb.height,
            max_pixels,
            *size,
        )
        rgb = rgb.resize(size, Image.Resampling.LANCZOS)
    return rgb


def artifact_data_uri(store: ArtifactStore, artifact_id: str, max_pixels: int) -> str:
    """A PNG data URI of an artifact within ``max_pixels``: the stored PNG bytes as they are
    when the image fits (no decode, no re-encode), else a downscaled RGB re-encoding."""
    from PIL import Image

    path = store.path(artifact_id)
    if path.suffix == ".png":
        with Image.open(path) as im:
            fits = im.width * im.height <= max_pixels and im.mode in ("L", "RGB", "RGBA")
        if fits:
            return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
    return encode_png_data_uri(model_image(store, artifact_id, max_pixels))


def grid(cells: list[Image.Image], max_pixels: int, gap: int = 4) -> Image.Image:
    """RGB pictures side by side in one (a near-square grid, left to right then top to
    bottom, cells the size of the largest, ``gap`` pixels of white between), within
    ``max_pixels``."""
    from PIL import Image

    cols = max(1, math.ceil(math.sqrt(len(cells))))
    rows = math.ceil(len(cells) / cols)
    cw, ch = max(c.width for c in cells), max(c.height for c in cells)
    sheet = Image.new("RGB", (cols * cw + gap * (cols - 1), rows * ch + gap * (rows - 1)), "white")
    for i, cell in enumerate(cells):
        r, c = divmod(i, cols)
        sheet.paste(cell, (c * (cw + gap), r * (ch + gap)))
    size = fit_size(sheet.width, sheet.height, max_pixels)
    return sheet if size == sheet.size else sheet.resize(size, Image.Resampling.LANCZOS)


def tile_images(store: ArtifactStore, artifact_ids: list[str], max_pixels: int) -> Image.Image:
    """The artifacts in one :func:`grid` within ``max_pixels`` (each cell within its share):
    for servers that take fewer images per request than a role shows."""
    share = max(1, max_pixels // max(1, len(artifact_ids)))
    return grid([model_image(store, a, share) for a in artifact_ids], max_pixels)


def encode_png_data_uri(image: Image.Image) -> str:
    """A ``data:image/png;base64,...`` URI of ``image`` (fast PNG compression)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def decode_data_uri(uri: str, max_bytes: int = MAX_DATA_URI_BYTES) -> Image.Image:
    """An RGB PIL image from a ``data:image/...;base64,`` URI.

    Raises:
        InputError: not a base64 image data URI, too large, or not a decodable image.
    """
    return _decode(uri, max_bytes)[0]


def store_data_uri(store: ArtifactStore, uri: str, max_bytes: int = MAX_DATA_URI_BYTES) -> str:
    """Store the image of a data URI; PNG bytes are kept as sent (after a check that they
    decode), other formats re-encoded as PNG. Returns the artifact id.

    Raises:
        InputError: as :func:`decode_data_uri`.
    """
    import numpy as np

    image, raw = _decode(uri, max_bytes)
    if raw.startswith(b"\x89PNG\r\n\x1a\n"):
        return store.put_png_bytes(raw)
    return store.put_png(np.asarray(image))


def _decode(uri: str, max_bytes: int) -> tuple[Image.Image, bytes]:
    from PIL import Image, UnidentifiedImageError

    head, sep, payload = uri.partition(",")
    if not sep or not head.startswith("data:image/") or not head.endswith(";base64"):
        raise InputError(
            "image_url must be a base64 data URI (data:image/png;base64,...); this server "
            "does not fetch remote URLs"
        )
    if len(payload) * 3 // 4 > max_bytes:
        raise InputError(f"image is larger than {max_bytes} bytes")
    try:
        raw = base64.b64decode(payload, validate=True)
        with Image.open(io.BytesIO(raw)) as im:
            return im.convert("RGB"), raw
    except (binascii.Error, ValueError) as exc:
        raise InputError(f"image_url is not valid base64: {exc}") from None
    except UnidentifiedImageError:
        raise InputError(
            f"image_url holds no image PIL can decode ({len(raw)} bytes that are not PNG, "
            "JPEG or another image format)"
        ) from None
    except OSError as exc:
        raise InputError(f"image_url holds a damaged image: {exc}") from None
