"""DICOM intake with pydicom.

Only an allow-list of technical attributes leaves this module (:data:`SAFE_TECHNICAL_ATTRIBUTES`);
patient-identifying elements (names, ids, dates, institutions, UIDs, free text) are never read
into records, logs or error messages. pydicom's own value-validation warnings, which can quote
element values, are silenced while a file is read.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medloupe.config import env_name
from medloupe.errors import (
    CorruptImageError,
    EmptyImageError,
    ImageIntakeError,
    ImageTooLargeError,
    UnsupportedTransferSyntaxError,
)
from medloupe.io.records import ImageRecord, LoadedImage
from medloupe.io.render import content_hash, percentile_window, to_uint8, window_linear

log = logging.getLogger(__name__)

#: The only DICOM attributes intake reads into an :class:`ImageRecord`. None identifies a person.
# PS3.16 Annex L body part values (and PS3.3 view positions): a header value is kept only when
# it is one of these; anything else (a misfiled name, free text) is dropped with a note.
BODY_PARTS = frozenset(
    [
        "ABDOMEN",
        "ABDOMENPELVIS",
        "ADRENAL",
        "ANKLE",
        "AORTA",
        "ARM",
        "AXILLA",
        "BACK",
        "BLADDER",
        "BRAIN",
        "BREAST",
        "BRONCHUS",
        "BUTTOCK",
        "CALCANEUS",
        "CALF",
        "CAROTID",
        "CEREBELLUM",
        "CERVIX",
        "CHEEK",
        "CHEST",
        "CHESTABDOMEN",
        "CHESTABDPELVIS",
        "CIRCLEOFWILLIS",
        "CLAVICLE",
        "COCCYX",
        "COLON",
        "CORNEA",
        "CORONARYARTERY",
        "CSPINE",
        "CTSPINE",
        "DUODENUM",
        "EAR",
        "ELBOW",
        "ESOPHAGUS",
        "EXTREMITY",
        "EYE",
        "EYELID",
        "FACE",
        "FEMUR",
        "FINGER",
        "FOOT",
        "FOREARM",
        "GALLBLADDER",
        "HAND",
        "HEAD",
        "HEADNECK",
        "HEART",
        "HIP",
        "HUMERUS",
        "IAC",
        "ILEUM",
        "ILIUM",
        "JAW",
        "JEJUNUM",
        "KIDNEY",
        "KNEE",
        "LARYNX",
        "LEG",
        "LIVER",
        "LSPINE",
        "LSSPINE",
        "LUNG",
        "MAXILLA",
        "MEDIASTINUM",
        "MOUTH",
        "NECK",
        "NECKCHEST",
        "NECKCHESTABDOMEN",
        "NECKCHESTABDPELV",
        "NOSE",
        "ORBIT",
        "OVARY",
        "PANCREAS",
        "PAROTID",
        "PATELLA",
        "PELVIS",
        "PENIS",
        "PHARYNX",
        "PROSTATE",
        "RECTUM",
        "RIB",
        "SACRUM",
        "SCALP",
        "SCAPULA",
        "SCLERA",
        "SCROTUM",
        "SELLA",
        "SHOULDER",
        "SKULL",
        "SPINE",
        "SPLEEN",
        "SSPINE",
        "STERNUM",
        "STOMACH",
        "SUBMANDIBULAR",
        "TESTIS",
        "THIGH",
        "THORAX",
        "THUMB",
        "THYMUS",
        "THYROID",
        "TIBIA",
        "TLSPINE",
        "TOE",
        "TONGUE",
        "TRACHEA",
        "TSPINE",
        "URETER",
        "URETHRA",
        "UTERUS",
        "VAGINA",
        "VULVA",
        "WHOLEBODY",
        "WRIST",
        "ZYGOMA",
    ]
)
VIEW_POSITIONS = frozenset(
    [
        "AP",
        "PA",
        "LL",
        "RL",
        "RLD",
        "LLD",
        "RLO",
        "LLO",
        "LAT",
        "OBL",
        "CC",
        "MLO",
        "ML",
        "LM",
        "LMO",
        "SIO",
        "XCCL",
        "XCCM",
        "FB",
        "AT",
        "LAO",
        "RAO",
    ]
)
SAFE_TECHNICAL_ATTRIBUTES = (
    "Modality",
    "BodyPartExamined",
    "ViewPosition",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "BitsStored",
    "PixelSpacing",
    "ImagerPixelSpacing",
    "SliceThickness",
    "RescaleSlope",
    "RescaleIntercept",
    "RescaleType",
    "WindowCenter",
    "WindowWidth",
)

#: Keywords of elements that identify a patient (DICOM PS3.15 Basic Profile, abridged to the
#: ones that commonly carry values). Tests use this list to prove none reaches a run's outputs.
PHI_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "OtherPatientIDs",
    "OtherPatientNames",
    "PatientMotherBirthName",
    "MedicalRecordLocator",
    "AccessionNumber",
    "InstitutionName",
    "InstitutionAddress",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "OperatorsName",
    "StudyID",
    "StudyDate",
    "SeriesDate",
    "AcquisitionDate",
    "ContentDate",
    "StudyTime",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "FrameOfReferenceUID",
    "StationName",
    "DeviceSerialNumber",
    "StudyDescription",
    "SeriesDescription",
    "ImageComments",
    "AdditionalPatientHistory",
)

_DECODER_FIX = (
    "install the decoders with `pip install 'medloupe[codecs]'` "
    "(pylibjpeg, pylibjpeg-libjpeg, pylibjpeg-openjpeg) or GDCM, or convert the file to an "
    "uncompressed transfer syntax"
)


def _get(ds: Any, keyword: str) -> Any:
    if keyword not in SAFE_TECHNICAL_ATTRIBUTES:  # guard against future misuse
        raise KeyError(f"{keyword} is not an allow-listed technical attribute")
    return ds.get(keyword, None)


def _first_float(value: Any) -> float | None:
    if value is None:
        return None
    try:
        seq = (
            list(value)
            if not isinstance(value, str | bytes) and hasattr(value, "__iter__")
            else [value]
        )
        number = float(seq[0]) if seq else None
    except (TypeError, ValueError):
        return None
    return number if number is not None and math.isfinite(number) else None


def _spacing(ds: Any, notes: list[str]) -> tuple[tuple[float, float] | None, str | None]:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = _get(ds, keyword)
        if value is None:
            continue
        try:
            row, col = float(value[0]), float(value[1])
        except (TypeError, ValueError, IndexError):
            notes.append(f"{keyword} is malformed; ignored")
            continue
        if row > 0 and col > 0:
            if keyword == "ImagerPixelSpacing":
                notes.append(
                    "spacing from ImagerPixelSpacing (detector plane, not corrected for "
                    "geometric magnification)"
                )
            return (row, col), keyword
        notes.append(f"{keyword} is {row:g}\\{col:g} (not positive); spacing unknown")
    return None, None


def read_dicom(
    path: Path, *, frame: int | None, max_pixels: int, modality_override: str | None = None
) -> LoadedImage:
    """Decode one frame of a DICOM file.

    Args:
        path: the file.
        frame: frame index for multi-frame files (default: the middle frame).
        max_pixels: rows x columns limit, checked before the pixel data is decoded.
        modality_override: replaces the file's Modality in the record.

    Returns:
        A :class:`LoadedImage` whose ``raw`` holds modality values (rescale slope/intercept
        applied; Hounsfield units for CT) for grayscale images, and whose ``display`` is the
        8-bit rendering after the VOI LUT or window centre/width (or a 0.5-99.5 percentile
        window when the file has neither), with MONOCHROME1 inverted so that higher
        attenuation is brighter.
    """
    name = str(path)
    with _quiet_pydicom():
        ds = _read_dataset(path, name)
        n_frames, index = _check_header(ds, name, max_pixels, frame)
        arr = _decode_frame(ds, name, index, n_frames)
    notes: list[str] = []
    photometric = str(_get(ds, "PhotometricInterpretation") or "MONOCHROME2")
    modality = modality_override or str(_get(ds, "Modality") or "OT")
    spacing, spacing_source = _spacing(ds, notes)
    try:
        shown = _render(arr, ds, photometric, modality, notes)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, struct.error) as exc:
        # a malformed lookup table, rescale or palette element: named, never a traceback
        raise CorruptImageError(
            name, f"the pixel values could not be rendered: {_reason(exc)}"
        ) from None
    display = shown.display
    if display.size == 0:
        raise EmptyImageError(name, "the decoded image has no pixels")
    thickness = _first_float(_get(ds, "SliceThickness"))
    record = ImageRecord(
        content_hash=content_hash(arr),
        format="dicom",
        modality=modality,
        body_part=_defined(_get(ds, "BodyPartExamined"), BODY_PARTS, "BodyPartExamined", notes),
        view_position=_defined(_get(ds, "ViewPosition"), VIEW_POSITIONS, "ViewPosition", notes),
        width=int(display.shape[1]),
        height=int(display.shape[0]),
        channels=shown.channels,  # type: ignore[arg-type]
        frames=n_frames,
        frame=index,
        spacing_mm=spacing,
        spacing_source=spacing_source,  # type: ignore[arg-type]
        slice_thickness_mm=thickness if thickness and thickness > 0 else None,
        photometric=photometric,
        value_unit=shown.value_unit,
        window=shown.window,
        notes=notes,
    )
    return LoadedImage(record=record, display=display, raw=shown.raw)


@contextlib.contextmanager
def _quiet_pydicom() -> Iterator[None]:
    """pydicom's warnings and log lines silenced: they may quote element values (PHI)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pydicom_logger = logging.getLogger("pydicom")
        old_level = pydicom_logger.level
        pydicom_logger.setLevel(logging.CRITICAL)
        try:
            yield
        finally:
            pydicom_logger.setLevel(old_level)


def _read_dataset(path: Path, name: str) -> Any:
    """The dataset of ``path`` (read with ``force`` when it has no preamble)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    forced = False
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError:
        forced = True
        try:
            ds = pydicom.dcmread(path, force=True)
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types on bad bytes
            raise CorruptImageError(
                name, f"not a readable DICOM file ({type(exc).__name__})"
            ) from None
    except (EOFError, OSError, ValueError, KeyError, TypeError, struct.error) as exc:
        raise CorruptImageError(
            name, f"truncated or corrupt DICOM file ({type(exc).__name__})"
        ) from None
    if forced and ("PixelData" not in ds or "Rows" not in ds):
        raise CorruptImageError(name, "not a DICOM file (no preamble, no image elements)")
    if forced and "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
        # no file meta (an old or bare file): the syntax is the one the bytes were read in
        from pydicom.dataset import FileMetaDataset
        from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

        meta = getattr(ds, "file_meta", None) or FileMetaDataset()
        meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if ds.original_encoding[0] else ExplicitVRLittleEndian
        )
        ds.file_meta = meta
    return ds


def _check_header(ds: Any, name: str, max_pixels: int, frame: int | None) -> tuple[int, int]:
    """(frames, frame index) after checking there are pixels, within ``max_pixels``."""
    if "PixelData" not in ds and "FloatPixelData" not in ds and "Rows" in ds:
        raise CorruptImageError(
            name,
            "the file describes an image (Rows, Columns) but ends before its pixel data: "
            "truncated; copy or export it again",
        )
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise EmptyImageError(
            name,
            "the DICOM file has no pixel data",
            "it may be a structured report or presentation state; give an image object",
        )
    rows, cols = _get(ds, "Rows"), _get(ds, "Columns")
    if not rows or not cols:
        raise EmptyImageError(name, "the DICOM image has zero rows or columns")
    rows, cols = int(rows), int(cols)
    if rows * cols > max_pixels:
        raise ImageTooLargeError(
            name,
            f"{cols}x{rows} = {rows * cols:,} pixels exceeds the limit of {max_pixels:,}",
            f"raise {env_name('max_pixels')} or downsample the image",
        )
    try:
        n_frames = int(_get(ds, "NumberOfFrames") or 1)
    except (TypeError, ValueError):
        n_frames = 0
    if n_frames < 1:
        raise CorruptImageError(name, "NumberOfFrames is not a positive frame count")
    index = n_frames // 2 if frame is None else frame
    if not 0 <= index < n_frames:
        raise ImageIntakeError(
            name,
            f"frame {index} requested but the file has {n_frames} frame(s)",
            f"choose a frame from 0 to {n_frames - 1}",
        )
    return n_frames, index


def _decode_frame(ds: Any, name: str, index: int, n_frames: int) -> np.ndarray:
    """The stored pixel values of one frame."""
    from pydicom.pixels import pixel_array

    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    ts_name = getattr(ts, "name", str(ts))
    try:
        return np.asarray(pixel_array(ds, index=index if n_frames > 1 else None))
    except NotImplementedError as exc:
        raise UnsupportedTransferSyntaxError(
            name, f"no installed decoder handles transfer syntax {ts_name!r}", _DECODER_FIX
        ) from exc
    except RuntimeError as exc:
        if "plugin" in str(exc).lower() or "decoder" in str(exc).lower():
            raise UnsupportedTransferSyntaxError(
                name,
                f"no available decoder could decode transfer syntax {ts_name!r}",
                _DECODER_FIX,
            ) from None
        raise CorruptImageError(name, "the pixel data could not be decoded") from None
    except (ValueError, EOFError, OSError, IndexError, TypeError, KeyError) as exc:
        raise CorruptImageError(
            name,
            f"the pixel data is truncated or inconsistent with the header ({type(exc).__name__})",
        ) from None
    except (AttributeError, struct.error) as exc:  # a header element decoding needs is absent
        raise CorruptImageError(
            name, f"the header lacks what decoding the pixel data needs ({_reason(exc)})"
        ) from None


@dataclass(frozen=True)
class _Shown:
    display: np.ndarray
    channels: int
    raw: np.ndarray | None = None
    window: tuple[float, float] | None = None
    value_unit: str | None = None


def _render(arr: np.ndarray, ds: Any, photometric: str, modality: str, notes: list[str]) -> _Shown:
    """The 8-bit display of a frame and, for grayscale, its modality values and window."""
    from pydicom.pixels import apply_color_lut, apply_rescale, apply_voi_lut

    if photometric == "PALETTE COLOR":
        return _Shown(to_uint8(apply_color_lut(arr, ds)), 3)
    if arr.ndim == 3:  # RGB / YBR (pydicom converts YBR to RGB)
        return _Shown(to_uint8(arr), 3)
    values = np.asarray(apply_rescale(arr, ds), dtype=np.float32)
    window: tuple[float, float] | None = None
    center = _first_float(_get(ds, "WindowCenter"))
    width = _first_float(_get(ds, "WindowWidth"))
    if center is not None and width is not None and width > 1:
        window = (center, width)
        display = window_linear(values, center, width)
    elif "VOILUTSequence" in ds:
        display = to_uint8(np.asarray(apply_voi_lut(values, ds), dtype=np.float32))
        notes.append("rendered with the file's VOI LUT")
    else:
        window = percentile_window(values)
        display = window_linear(values, *window)
        notes.append("no window in the file; rendered with a 0.5-99.5 percentile window")
    if photometric == "MONOCHROME1":
        display = 255 - display
        notes.append("MONOCHROME1 inverted for display (higher attenuation is brighter)")
    return _Shown(display, 1, values, window, "HU" if modality == "CT" else None)


# decoder messages that name a missing element or module, never a value: the only ones passed
# on (others may quote an element's value, which could be anything a file holds)
_SAFE_REASON = re.compile(
    r"^(Missing required element: \([0-9A-Fa-f]{4},[0-9A-Fa-f]{4}\) '[A-Za-z][A-Za-z ]*'"
    r"|No suitable [A-Za-z ]+ found)$"
)


def _reason(exc: BaseException) -> str:
    """The exception's type, with its message only when that names an element or module (an
    allow-list of pydicom's message forms) and quotes no value."""
    text = str(exc).strip()
    if _SAFE_REASON.match(text):
        return f"{type(exc).__name__}: {text}"
    if isinstance(exc, struct.error):
        return "a lookup table holds fewer entries than its descriptor says"
    if isinstance(exc, TypeError):
        return "a rescale, window or lookup-table value is not a number"
    return type(exc).__name__


def _defined(value: Any, terms: frozenset[str], keyword: str, notes: list[str]) -> str | None:
    """``value`` when it is one of the attribute's defined ``terms`` (case, spaces and
    underscores ignored), else ``None`` with a note that names the attribute, not the value."""
    text = _safe_str(value)
    if text is None:
        return None
    key = text.upper().replace(" ", "").replace("_", "")
    if key in terms:
        return key
    notes.append(f"{keyword} is not one of its defined terms; left out")
    return None


def _safe_str(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None
