"""Content-addressed artifact store inside a run directory.

Artifacts are files under ``<run>/artifacts/``: images, crops, masks and overlays as PNG,
float arrays as ``.npy``. An artifact id is ``<kind>-<first 16 hex of sha256(bytes)>``, so
storing the same content twice yields the same id and one file; writes go to a temporary
file that is renamed into place, so a reader never sees half a file. Graph state and traces
carry ids, never arrays.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Literal

import numpy as np

ArtifactKind = Literal["image", "raw", "crop", "mask", "overlay", "figure", "other"]
_ID_RE = re.compile(r"^(image|raw|crop|mask|overlay|figure|other)-[0-9a-f]{16}\.(png|npy)$")


def finite(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, +-Inf) replaced by ``None``, recursively
    through dicts, lists and tuples: what strict JSON can hold."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def strict_json(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` that never writes ``NaN`` or ``Infinity`` (invalid JSON): non-finite
    floats become ``null``; objects JSON does not know are written as their ``str``."""
    return json.dumps(finite(value), allow_nan=False, default=str, **kwargs)


def atomic_write_bytes(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Write ``data`` to ``path`` through a temporary file and an atomic rename (``fsync``ed
    first when ``durable``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of a ``uint8`` ``(H, W)``, ``(H, W, 3)`` or ``(H, W, 4)`` array, or a bool mask.

    No text chunks or other metadata are written.
    """
    from PIL import Image

    arr = array
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.dtype != np.uint8:
        raise TypeError(f"PNG artifacts take uint8 or bool arrays, not {arr.dtype}")
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ValueError(
            f"PNG artifacts take (H, W), (H, W, 3) or (H, W, 4) arrays, not {arr.shape}"
        )
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", optimize=False, compress_level=1)
    return buf.getvalue()


class ArtifactStore:
    """Files of one run, addressed by content.

    Args:
        root: the run directory; artifacts live in ``root / "artifacts"``.
        durable: ``fsync`` each file before it is renamed into place (runs: yes; scratch
            stores such as a server's request images: no).
    """

    def __init__(self, root: str | Path, *, durable: bool = True) -> None:
        self.root = Path(root)
        self.dir = self.root / "artifacts"
        self.durable = durable

    def _put(self, kind: ArtifactKind, data: bytes, ext: str) -> str:
        digest = hashlib.sha256(data).hexdigest()[:16]
        artifact_id = f"{kind}-{digest}.{ext}"
        path = self.dir / artifact_id
        if not path.exists():
            atomic_write_bytes(path, data, durable=self.durable)
        return artifact_id

    def put_png_bytes(self, data: bytes, kind: ArtifactKind = "image") -> str:
        """Store already-encoded PNG bytes as they are; returns the artifact id.

        Raises:
            ValueError: ``data`` does not start with the PNG signature.
        """
        if not data.startswith(b"\x89PNG\r\n\x1a\n"):
            raise ValueError("not PNG data")
        return self._put(kind, data, "png")

    def put_png(self, array: np.ndarray, kind: ArtifactKind = "image") -> str:
        """Store an image or mask as PNG; returns its artifact id."""
        return self._put(kind, encode_png(array), "png")

    def put_array(self, array: np.ndarray, kind: ArtifactKind = "raw") -> str:
        """Store a numeric array as ``.npy`` (no pickling); returns its artifact id."""
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
        return self._put(kind, buf.getvalue(), "npy")

    def path(self, artifact_id: str) -> Path:
        """The file of an artifact. Raises ``KeyError`` for malformed or unknown ids."""
        if not _ID_RE.match(artifact_id):
            raise KeyError(f"malformed artifact id {artifact_id!r}")
        p = self.dir / artifact_id
        if not p.exists():
            raise KeyError(f"no artifact {artifact_id!r} in {self.dir}")
        return p

    def exists(self, artifact_id: str) -> bool:
        try:
            self.path(artifact_id)
        except KeyError:
            return False
        return True

    def load(self, artifact_id: str) -> np.ndarray:
        """Load an artifact as an array (PNG -> uint8, ``.npy`` -> its dtype)."""
        p = self.path(artifact_id)
        if p.suffix == ".npy":
            return np.load(p, allow_pickle=False)
        from PIL import Image

        with Image.open(p) as img:
            return np.asarray(img).copy()

    def list(self) -> list[str]:
        if not self.dir.exists():
            return []
        return sorted(p.name for p in self.dir.iterdir() if _ID_RE.match(p.name))
