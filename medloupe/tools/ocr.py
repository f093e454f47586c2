"""Burned-in text: reading it (OCR with RapidOCR's bundled PP-OCR ONNX models) and redacting it.

RapidOCR (``rapidocr`` + ``onnxruntime``) ships its detection and recognition models inside
the wheel, so OCR works offline. The engine loads on first use.

Burned-in text on medical images often carries identifiers (name, ID, birth date). Two guards:

- :func:`redact_burned_in_text` paints over every detected text box; the OpenAI-compatible
  backend applies it before an image leaves the machine when redaction is on
  (``Settings.redact_text``, default ``remote``: for endpoints that are not loopback).
- the ``read_text`` tool reports a line only when :func:`safe_text` allows it (markers,
  labels, measurements, window values: an allow-list); every other line is ``[redacted]``
  with its box, so it reaches no prompt, trace, checkpoint, answer, log or terminal.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from medloupe.errors import ToolUnavailableError
from medloupe.io.records import ImageRecord
from medloupe.schemas import Box, Region
from medloupe.tools.base import Availability, Tool, ToolContext, ToolResult
from medloupe.tools.builtin import _check_inside, _clamp_box

log = logging.getLogger(__name__)

REDACTED = "[redacted]"

def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


#: words burned-in text may show (case-insensitive): side, orientation and view markers,
#: positioning, sequence and phase names, and the labels of technical values
SAFE_WORDS = _words(
    """
    l r lt rt left right a p s i h f ant post sup inf anterior posterior superior inferior
    ap pa lat lateral ll rl lao rao lpo rpo obl oblique view
    supine prone erect upright standing sitting semi-erect semierect portable mobile
    decub decubitus lld rld inspiration expiration insp exp
    axial ax coronal cor sagittal sag transverse trans long
    t1 t2 t1w t2w pd flair dwi adc stir gre swi tof mra cta dixon fs fatsat
    pre post contrast c+ c- iv oral delayed arterial venous portal native
    w l ww wl wc c win lev window level zoom mag scale se im sl ser img slice thk thickness
    kv kvp mas ma ms fov tr te ti fa grid
    """
)
_UNIT = r"(?:mm|cm|m|ml|cc|hu|%|kv|kvp|mas|ma|ms|s|x|°|deg|mm2|cm2|mm²|cm²|px|mgy|t)"
_NUMBER = r"[+-]?\d{1,4}(?:[.,]\d{1,3})?"
_MEASURE = rf"[+-]?\d{{1,3}}(?:[.,]\d{{1,3}})?{_UNIT}"  # at most 3 integer digits
_SAFE_TOKEN = re.compile(
    rf"^(?:{_MEASURE}|x{_NUMBER}|{_NUMBER}(?:/{_NUMBER})?|[:/=().,+\-]+)$", re.I
)
_UNIT_WORD = re.compile(rf"^{_UNIT}$", re.I)
_NUMBER_ONLY = re.compile(rf"^{_NUMBER}$")
#: labels a bare number may follow (a window, a series, a tube setting)
VALUE_LABELS = _words(
    "w l ww wl wc c win lev window level se im sl ser img slice thk kv kvp mas ma fov tr te ti fa"
)
_LABELLED = re.compile(r"^([a-z][a-z0-9+\-]*)[:=](.+)$", re.I)
_BARE_INTEGER = re.compile(r"^\d{3,}$")
#: questions about what is written on the image (the rule-based planner reads it)
_ABOUT_TEXT = re.compile(
    r"\b(text|written|writing|label(?:led|s)?|annotation|caption|side marker|markers?|"
    r"letters?|what does .* say|says?)\b",
    re.I,
)


def safe_text(text: str) -> bool:
    """Whether a line of burned-in text may be shown: every token is a marker or label of
    :data:`SAFE_WORDS`, a measurement (a number with a unit), a window or position value
    after its label, or punctuation. Everything else (names, dates, places, identifiers,
    free words) is not: PHI by allow-list, nothing guessed."""
    tokens = [t for t in re.split(r"[\s,;|]+", text.strip()) if t]
    if not tokens:
        return False
    merged: list[str] = []  # "120 kVp" -> "120kVp": a number and its unit
    for t in tokens:
        if merged and _UNIT_WORD.match(t) and _NUMBER_ONLY.match(merged[-1]):
            merged[-1] += t
        else:
            merged.append(t)
    labelled = meaningful = False
    for token in merged:
        m = _LABELLED.match(token)
        if m and m.group(1).lower() in SAFE_WORDS and _SAFE_TOKEN.match(m.group(2)):
            labelled, meaningful = False, True
            continue
        word = token.rstrip(":=").lower()
        if word in SAFE_WORDS:
            labelled, meaningful = word in VALUE_LABELS, True
            continue
        if not _SAFE_TOKEN.match(token):
            return False
        if _BARE_INTEGER.match(token) and not labelled:
            return False  # a lone long number (an ID, a year) without its label
        meaningful = meaningful or bool(re.search(r"[a-z%°²]", token, re.I))  # a unit
        labelled = False
    return meaningful  # numbers alone (a date written with spaces) are not shown


@dataclass(frozen=True)
class TextLine:
    """One detected line: its text, recognition score and XYXY pixel box."""

    text: str
    score: float
    box_xyxy: tuple[float, float, float, float]


class OcrEngine:
    """RapidOCR, loaded on first use (thread-safe; calls are serialised)."""

    def __init__(self) -> None:
        self._engine: Any = None
        self._lock = threading.Lock()

    @staticmethod
    def installed() -> Availability:
        import importlib.util

        missing = [
            m for m in ("rapidocr", "onnxruntime", "cv2") if importlib.util.find_spec(m) is None
        ]
        if missing:
            return Availability(
                False,
                f"OCR needs {', '.join(missing)}: pip install rapidocr onnxruntime "
                "opencv-python-headless",
            )
        return Availability(True, "ready (RapidOCR, bundled PP-OCR models)")

    def read(
        self, rgb: np.ndarray, min_score: float = 0.5, max_height_fraction: float = 0.25
    ) -> list[TextLine]:
        """Text lines of an ``(H, W, 3)`` uint8 RGB image, top to bottom.

        Lines taller than ``max_height_fraction`` of the image are dropped: burned-in text is
        small, and round anatomy (a vessel, a nodule) is sometimes read as an "O".
        """
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"OCR expects (H, W, 3) uint8 RGB, got {rgb.dtype} {rgb.shape}")
        with self._lock:
            if self._engine is None:
                ok = self.installed()
                if not ok.ok:
                    raise ToolUnavailableError(ok.reason)
                from rapidocr import RapidOCR

                self._engine = RapidOCR()
                # RapidOCR logs every model file at INFO and empty pages at WARNING through
                # its own handler; keep its errors only (set after construction, which resets)
                logging.getLogger("RapidOCR").setLevel(logging.ERROR)
            # RapidOCR takes OpenCV's BGR order for arrays
            result = self._engine(np.ascontiguousarray(rgb[:, :, ::-1]))
        if result.boxes is None or result.txts is None:
            return []
        lines = []
        for poly, text, score in zip(result.boxes, result.txts, result.scores, strict=True):
            if float(score) < min_score or not str(text).strip():
                continue
            pts = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
            box = (
                float(pts[:, 0].min()),
                float(pts[:, 1].min()),
                float(pts[:, 0].max()),
                float(pts[:, 1].max()),
            )
            if box[3] - box[1] > max_height_fraction * rgb.shape[0]:
                continue
            lines.append(TextLine(text=str(text), score=float(score), box_xyxy=box))
        lines.sort(key=lambda t: (t.box_xyxy[1], t.box_xyxy[0]))
        return lines


def redact_burned_in_text(
    rgb: np.ndarray, engine: OcrEngine, *, min_score: float = 0.3, pad: int = 3
) -> tuple[np.ndarray, int]:
    """A copy of ``rgb`` with every detected text box (grown by ``pad`` px) filled black.

    Returns:
        The redacted ``(H, W, 3)`` uint8 image and the number of boxes painted.
    """
    lines = engine.read(rgb, min_score=min_score)
    out = rgb.copy()
    h, w = out.shape[:2]
    for line in lines:
        x0, y0, x1, y1 = line.box_xyxy
        out[
            max(0, int(y0) - pad) : min(h, int(np.ceil(y1)) + pad),
            max(0, int(x0) - pad) : min(w, int(np.ceil(x1)) + pad),
        ] = 0
    return out, len(lines)


class ReadTextArgs(BaseModel):
    model_config = {"extra": "forbid"}

    box_xyxy: Box | None = Field(default=None, description="read only inside this region")
    min_score: float = Field(default=0.5, ge=0.0, le=1.0, description="recognition score floor")


class TextLineOut(BaseModel):
    text: str
    score: float
    box_xyxy: Box


class ReadTextResult(ToolResult):
    lines: list[TextLineOut]
    redacted_lines: int = Field(
        description="lines shown as [redacted]: not only markers, labels and measurements"
    )

    def summary(self) -> str:
        if not self.lines:
            return "no burned-in text found"
        text = " | ".join(line.text for line in self.lines)[:400]
        return f"{len(self.lines)} line(s) of burned-in text: {text}"


class ReadTextTool(Tool):
    """OCR of burned-in text (annotations, markers, scale labels) with RapidOCR."""

    name = "read_text"
    description = (
        "Read burned-in text with OCR: side and view markers, positioning, sequence names, "
        "measurements and window values are reported; any other line (names, dates, places, "
        "identifiers, free text) is [redacted] with its box."
    )
    input_model = ReadTextArgs
    output_model = ReadTextResult
    timeout_s = 120.0

    def __init__(self, engine: OcrEngine | None = None) -> None:
        self.engine = engine or OcrEngine()

    def available(self) -> Availability:
        return self.engine.installed()

    def suggest(self, question: str, image: ImageRecord) -> dict[str, Any] | None:
        """Read the image's text when the question asks what is written or marked on it."""
        return {} if _ABOUT_TEXT.search(question) else None

    def run(self, args: BaseModel, ctx: ToolContext) -> ReadTextResult:
        a: Any = args
        rgb = ctx.rgb()
        full_height = rgb.shape[0]
        ox = oy = 0.0
        if a.box_xyxy is not None:
            h, w = rgb.shape[:2]
            _check_inside(a.box_xyxy, w, h)
            x0, y0, x1, y1 = _clamp_box(a.box_xyxy, w, h)
            rgb = rgb[y0:y1, x0:x1]
            ox, oy = float(x0), float(y0)
        lines = self.engine.read(
            np.ascontiguousarray(rgb),
            min_score=a.min_score,
            max_height_fraction=0.25 * full_height / rgb.shape[0],  # of the whole image
        )
        out: list[TextLineOut] = []
        regions: list[Region] = []
        hidden = 0
        for line in lines:
            box = (
                line.box_xyxy[0] + ox,
                line.box_xyxy[1] + oy,
                line.box_xyxy[2] + ox,
                line.box_xyxy[3] + oy,
            )
            if box[2] <= box[0] or box[3] <= box[1]:
                continue
            text = line.text
            if not safe_text(text):
                text = REDACTED
                hidden += 1
            out.append(TextLineOut(text=text, score=line.score, box_xyxy=box))
            regions.append(Region(id="pending", box_xyxy=box, label=f"text: {text}"[:80]))
        return ReadTextResult(lines=out, redacted_lines=hidden, regions=regions)
