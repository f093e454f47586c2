"""A mutation fuzz of intake over pydicom-data's corpus: bit flips, truncation, header values
swapped or made nonsense, NaN/Inf pixels. Each mutant either loads (a uint8 display image,
finite raw values or none) or is the typed input error naming the file — never another
exception (which the CLI would show as a traceback, the service as a 500)."""

from __future__ import annotations

import math
import random
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest

from medloupe.errors import InputError
from medloupe.io import load_image

pytestmark = pytest.mark.slow

MAX_BYTES = 600_000
SWAPS = [
    ("Rows", lambda v: v * 3), ("Columns", lambda v: 0), ("BitsAllocated", lambda v: 12),
    ("BitsStored", lambda v: 40), ("HighBit", lambda v: 99), ("SamplesPerPixel", lambda v: 3),
    ("PixelRepresentation", lambda v: 7), ("PhotometricInterpretation", lambda v: "YBR_FULL"),
    ("RescaleSlope", lambda v: "nan"), ("RescaleIntercept", lambda v: "inf"),
    ("WindowWidth", lambda v: 0), ("WindowCenter", lambda v: "-inf"),
    ("NumberOfFrames", lambda v: 0), ("PlanarConfiguration", lambda v: 5),
]


def corpus(dicom_dir: Path) -> list[Path]:
    files = sorted(p for p in dicom_dir.glob("*.dcm") if p.stat().st_size <= MAX_BYTES)
    return files[:40]


def check(path: Path) -> str:
    """``loaded`` or ``refused``; anything but an InputError fails the test."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = load_image(path)
    except InputError as exc:
        assert path.name in str(exc), exc
        return "refused"
    assert loaded.display.dtype == np.uint8 and loaded.display.size > 0
    if loaded.raw is not None and loaded.raw.size:
        bad = float(np.mean(~np.isfinite(loaded.raw)))
        # a few non-numbers render black; beyond 5 % the image is flagged (the run abstains)
        assert bad <= 0.05 or loaded.record.quality, (path, bad)
    w = loaded.record.window
    assert w is None or all(math.isfinite(v) for v in w), (path, w)
    return "loaded"


def test_bit_flips_and_truncation(dicom_dir: Path, tmp_path: Path) -> None:
    rng = random.Random(20261202)
    outcomes: dict[str, int] = {"loaded": 0, "refused": 0}
    for src in corpus(dicom_dir):
        data = bytearray(src.read_bytes())
        for k in range(3):
            flipped = bytearray(data)
            for _ in range(rng.randint(1, 40)):
                i = rng.randrange(len(flipped))
                flipped[i] ^= 1 << rng.randrange(8)
            mutant = tmp_path / f"flip{k}-{src.name}"
            mutant.write_bytes(bytes(flipped))
            outcomes[check(mutant)] += 1
        for frac in (0.05, 0.3, 0.7, 0.98):
            mutant = tmp_path / f"cut{int(frac * 100)}-{src.name}"
            mutant.write_bytes(bytes(data[: int(len(data) * frac)]))
            outcomes[check(mutant)] += 1
    assert outcomes["refused"] > 0 and outcomes["loaded"] > 0, outcomes


def test_header_values_made_nonsense(dicom_dir: Path, tmp_path: Path) -> None:
    outcomes: dict[str, int] = {"loaded": 0, "refused": 0}
    for src in corpus(dicom_dir)[:20]:
        try:
            base = pydicom.dcmread(src)
        except Exception:  # noqa: BLE001 - a corpus file pydicom itself cannot read is skipped
            continue
        for keyword, change in SWAPS:
            ds = base.copy()
            try:
                setattr(ds, keyword, change(getattr(ds, keyword, 1)))
            except (TypeError, ValueError, OverflowError):
                continue  # pydicom will not store that value
            mutant = tmp_path / f"{keyword}-{src.name}"
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    ds.save_as(mutant)
            except Exception:  # noqa: BLE001 - pydicom refuses to write it: not a case
                continue
            outcomes[check(mutant)] += 1
    assert sum(outcomes.values()) > 100, outcomes


def test_nan_and_inf_pixels(dicom_dir: Path, tmp_path: Path) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    cases = [("nan", np.nan, 1), ("inf", np.inf, 1), ("-inf", -np.inf, 1), ("nan-rows", np.nan, 20)]
    for name, value, rows in cases:
        arr = np.linspace(-100, 100, 64 * 64, dtype=np.float32).reshape(64, 64)
        arr[3 : 3 + rows, 5] = value
        arr[3 : 3 + rows] = value if rows > 1 else arr[3 : 3 + rows]
        meta = FileMetaDataset()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, generate_uid()
        ds.Modality, ds.Rows, ds.Columns = "OT", 64, 64
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated = 32
        ds.FloatPixelData = arr.tobytes()
        path = tmp_path / f"float-{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert check(path) in ("loaded", "refused")
        if rows > 1:  # a third of the image is not numbers: flagged, never answered from
            assert load_image(path).record.quality, name
