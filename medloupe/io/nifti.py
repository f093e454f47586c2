"""NIfTI intake with nibabel: one 2D slice, cut across a canonical (RAS+) axis.

Only the slice is read from disk (through nibabel's array proxy), so large volumes cost the
slice, not the volume. Display follows the radiological convention: axial and coronal slices
show the patient's right on the viewer's left; superior and anterior are up.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medloupe.config import env_name
from medloupe.errors import CorruptImageError, EmptyImageError, ImageIntakeError, ImageTooLargeError
from medloupe.io.records import ImageRecord, LoadedImage
from medloupe.io.render import content_hash, percentile_window, window_linear

AXIS_NAMES = {0: "sagittal", 1: "coronal", 2: "axial"}


def read_nifti(
    path: Path,
    *,
    axis: int = 2,
    slice_index: int | None = None,
    frame: int | None = None,
    max_pixels: int,
    modality: str | None = None,
) -> LoadedImage:
    """Read one slice of a 3D (or 4D: ``frame`` picks the volume) NIfTI image.

    Args:
        axis: canonical axis cut across: 0 sagittal (x), 1 coronal (y), 2 axial (z).
        slice_index: index along that axis in RAS+ order (default: the middle slice).
        frame: volume index of a 4D image (default 0).
        max_pixels: limit on the slice's pixels.
        modality: the record's modality (NIfTI carries none); CT values are taken as HU.
    """
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError
    from nibabel.orientations import io_orientation

    name = str(path)
    if axis not in AXIS_NAMES:
        raise ImageIntakeError(
            name, f"axis {axis} is not 0, 1 or 2", "use 0 sagittal, 1 coronal, 2 axial"
        )
    try:
        img: Any = nib.load(str(path))
    except (ImageFileError, EOFError, OSError, ValueError) as exc:
        raise CorruptImageError(name, f"not a readable NIfTI file ({type(exc).__name__})") from None
    shape = _shape(img, name)
    ornt = io_orientation(img.affine)  # per array axis: (world axis, direction)
    found = np.flatnonzero(ornt[:, 0] == axis)
    if found.size == 0:
        raise CorruptImageError(
            name,
            "the NIfTI affine is singular: its axes cannot be told apart",
            "fix the file's qform/sform (e.g. with nibabel) or re-export it",
        )
    array_axis = int(found[0])
    others = [i for i in range(3) if i != array_axis]
    slice_pixels = shape[others[0]] * shape[others[1]]
    if slice_pixels > max_pixels:
        raise ImageTooLargeError(
            name,
            f"a slice has {slice_pixels:,} pixels, over the limit of {max_pixels:,}",
            f"raise {env_name('max_pixels')}",
        )
    n = shape[array_axis]
    canonical_index = n // 2 if slice_index is None else slice_index
    if not 0 <= canonical_index < n:
        raise ImageIntakeError(
            name,
            f"slice {canonical_index} requested but axis {axis} has {n} slices",
            f"choose a slice from 0 to {n - 1}",
        )
    index = canonical_index if ornt[array_axis, 1] > 0 else n - 1 - canonical_index
    n_vol = shape[3] if len(shape) > 3 else 1
    vol = 0 if frame is None else frame
    if not 0 <= vol < n_vol:
        raise ImageIntakeError(name, f"volume {vol} requested but the image has {n_vol}")
    data = _read_slice(img, name, shape, array_axis, index, vol, others)
    display_values, others = _displayed(data, ornt, others)
    zooms = [float(z) for z in img.header.get_zooms()[:3]]
    while len(zooms) < 3:
        zooms.append(1.0)
    row_sp, col_sp = zooms[others[1]], zooms[others[0]]
    window = percentile_window(display_values)
    display = window_linear(display_values, *window)
    mod = modality or "OT"
    record = ImageRecord(
        content_hash=content_hash(display_values),
        format="nifti",
        modality=mod,
        width=int(display.shape[1]),
        height=int(display.shape[0]),
        channels=1,
        frames=n,
        frame=canonical_index,
        axis=axis,
        spacing_mm=(row_sp, col_sp) if row_sp > 0 and col_sp > 0 else None,
        spacing_source="nifti-header" if row_sp > 0 and col_sp > 0 else None,
        slice_thickness_mm=zooms[array_axis] if zooms[array_axis] > 0 else None,
        value_unit="HU" if mod == "CT" else None,
        window=window,
        notes=[f"{AXIS_NAMES[axis]} slice {canonical_index} of {n} (RAS+ order)"],
    )
    return LoadedImage(record=record, display=display, raw=display_values)


def _shape(img: Any, name: str) -> tuple[int, ...]:
    """The image's shape, a 2D image as one slice of a 3D one."""
    shape = tuple(int(s) for s in img.shape)
    if len(shape) < 3:
        if len(shape) != 2:
            raise EmptyImageError(name, f"NIfTI image has shape {shape}; need a 2D, 3D or 4D image")
        shape = (*shape, 1)
    if min(shape[:3]) == 0:
        raise EmptyImageError(name, f"NIfTI image has an empty dimension {shape}")
    return shape


def _read_slice(
    img: Any,
    name: str,
    shape: tuple[int, ...],
    array_axis: int,
    index: int,
    vol: int,
    others: list[int],
) -> np.ndarray:
    """Slice ``index`` along ``array_axis`` of volume ``vol``: float32, array axes ``others``."""
    slicer: list[int | slice] = [slice(None)] * len(img.shape)
    if len(img.shape) == 2:
        slicer = [slice(None), slice(None)]
    else:
        slicer[array_axis] = index
    if len(img.shape) > 3:
        slicer[3] = vol
        for extra in range(4, len(img.shape)):
            slicer[extra] = 0
    try:
        data = np.asarray(img.dataobj[tuple(slicer)], dtype=np.float32)
    except (EOFError, OSError, ValueError) as exc:
        raise CorruptImageError(name, f"truncated NIfTI data ({type(exc).__name__})") from None
    if data.ndim != 2:
        data = data.reshape(shape[others[0]], shape[others[1]])
    return data


def _displayed(
    data: np.ndarray, ornt: np.ndarray, others: list[int]
) -> tuple[np.ndarray, list[int]]:
    """The slice as a radiologist views it, and its array axes in world order.

    The data axes are array axes ``others``; they are put in world order and made to increase
    along +world (R, A, S). Display: rows from the higher axis (superior/anterior up), columns
    from the lower (radiological: right on left for x; anterior on the left for sagittal y).
    """
    world = [int(ornt[i, 0]) for i in others]
    if world[0] > world[1]:
        data = data.T
        others = others[::-1]
        world = world[::-1]
    for k, i in enumerate(others):
        if ornt[i, 1] < 0:
            data = np.flip(data, axis=k)
    values = np.flip(data.T, axis=0)
    if world[0] == 0 or world[0] == 1:  # x across columns: patient's right on the viewer's left
        values = np.flip(values, axis=1)
    return np.ascontiguousarray(values, dtype=np.float32), others
