"""Intake: read an image file with a run's options and store it in the run's artifacts."""

from __future__ import annotations

from pathlib import Path

from medloupe.artifacts import ArtifactStore
from medloupe.io.loader import load_image
from medloupe.io.records import ImageRecord, LoadedImage
from medloupe.options import RunOptions


def read_input(path: str | Path, options: RunOptions, max_pixels: int) -> LoadedImage:
    """The image at ``path`` read with the frame, slice, axis and modality ``options`` set.

    Raises:
        medloupe.errors.InputError: unreadable, corrupt, unsupported or too large (the
            message names the problem and the fix).
    """
    return load_image(path, max_pixels=max_pixels, **options.intake())


def ingest_image(loaded: LoadedImage, store: ArtifactStore) -> ImageRecord:
    """Store the display image (and raw values) as artifacts; returns the record with their
    ids."""
    display_id = store.put_png(loaded.display, kind="image")
    raw_id = store.put_array(loaded.raw, kind="raw") if loaded.raw is not None else None
    return loaded.record.model_copy(update={"display_artifact": display_id, "raw_artifact": raw_id})
