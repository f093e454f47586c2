"""Finding model weights: explicit path, environment variable, cache, then a verified download.

Resolution order for a :class:`WeightFile`:

1. an explicit path given by the caller (tool constructor, CLI option);
2. the environment variable the file names (:func:`medloupe.config.weight_env`);
3. the cache, ``Settings.weights_dir`` (``<cache>/weights/<filename>``);
4. a download from the published URL, checked against its SHA-256, only when the caller
   allows it and the machine is not offline (``Settings.offline``).

Anything else raises :class:`~medloupe.errors.WeightsMissingError` naming the file, the places
searched and how to provide it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from medloupe.config import Settings, env_name, weight_env
from medloupe.errors import ChecksumError, WeightsMissingError

log = logging.getLogger(__name__)


def offline() -> bool:
    """Whether downloads are forbidden (``Settings.offline``), read at call time."""
    return Settings.from_env().offline


def weights_dir() -> Path:
    """``Settings.weights_dir``, read at call time."""
    return Settings.from_env().weights_dir


@dataclass(frozen=True)
class WeightFile:
    """A published weight file.

    Attributes:
        filename: the file's name in the cache.
        name: the weights' name; the variable :func:`~medloupe.config.weight_env` of it may
            hold their path.
        url: where it is published (``None``: no stable direct link; the user provides it).
        sha256: its published SHA-256 (checked after every download).
        how_to_get: a human instruction shown when it is missing.
    """

    filename: str
    name: str
    url: str | None = None
    sha256: str | None = None
    how_to_get: str = ""

    def local(self, explicit: str | os.PathLike[str] | None = None) -> Path | None:
        """The first existing candidate path (no download), or ``None``.

        Raises:
            WeightsMissingError: an explicit path or the environment variable names a file
                that does not exist (a typo must not silently fall through to the cache).
        """
        for origin, value in (
            ("given path", explicit),
            (self.env_var, Settings.from_env().weight_path(self.name)),
        ):
            if value:
                path = Path(value).expanduser()
                if not path.is_file():
                    raise WeightsMissingError(
                        f"{self.filename}: the {origin} {str(path)!r} is not a file; "
                        f"{self._advice()}"
                    )
                return path
        cached = weights_dir() / self.filename
        return cached if cached.is_file() else None

    def resolve(
        self, explicit: str | os.PathLike[str] | None = None, *, download: bool = False
    ) -> Path:
        """The weight file's path, downloading it (verified) if allowed.

        Raises:
            WeightsMissingError: not found and not downloadable here.
            ChecksumError: a download did not match the published SHA-256.
        """
        path = self.local(explicit)
        if path is not None:
            return path
        if download and self.url and not offline():
            return self.download()
        why = (
            f"downloads are off (HF_HUB_OFFLINE / {env_name('offline')})"
            if offline()
            else "no download was requested"
            if self.url
            else "it has no direct download link"
        )
        raise WeightsMissingError(
            f"weights {self.filename!r} not found (searched ${self.env_var} and "
            f"{weights_dir() / self.filename}; {why}). {self._advice()}"
        )

    def download(self) -> Path:
        """Download to the cache, verify the SHA-256, then move into place atomically."""
        import httpx

        if not self.url:
            raise WeightsMissingError(f"{self.filename} has no download link. {self._advice()}")
        target = weights_dir() / self.filename
        target.parent.mkdir(parents=True, exist_ok=True)
        log.info("downloading %s from %s", self.filename, self.url)
        digest = hashlib.sha256()
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{self.filename}.", suffix=".part")
        try:
            with (
                os.fdopen(fd, "wb") as out,
                httpx.stream(
                    "GET", self.url, follow_redirects=True, timeout=httpx.Timeout(30.0, read=300.0)
                ) as resp,
            ):
                resp.raise_for_status()
                for chunk in resp.iter_bytes(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
            if self.sha256 and digest.hexdigest() != self.sha256:
                raise ChecksumError(
                    f"{self.filename} from {self.url} has SHA-256 {digest.hexdigest()}, not the "
                    f"published {self.sha256}; the file was discarded"
                )
            os.replace(tmp, target)
        except httpx.HTTPError as exc:
            raise WeightsMissingError(
                f"downloading {self.filename} from {self.url} failed ({exc}). {self._advice()}"
            ) from None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return target

    @property
    def env_var(self) -> str:
        return weight_env(self.name)

    def _advice(self) -> str:
        where = f"download {self.url}" if self.url else self.how_to_get or "obtain the file"
        return (
            f"To provide it: {where}, then put it at {weights_dir() / self.filename} "
            f"or set {self.env_var}=/path/to/{self.filename}"
        )
