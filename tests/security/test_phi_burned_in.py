"""PHI in burned-in text is kept out by allow-list: the line rule itself, and a run whose plan
reads the text (several fonts, sizes and positions) scanned byte by byte afterwards — run
directory (trace, SQLite trace and checkpoints with their WAL, answer, overlay metadata),
the home's index and logs, stdout, stderr and the log records."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from medloupe.config import Settings
from medloupe.tools.ocr import safe_text

KEPT = [
    "R", "L", "LT", "AP PORTABLE", "PA ERECT", "SUPINE", "120 kVp", "2.5mm", "5.0 mm",
    "W: 400 L: 40", "W:400 L:40", "WW 1500 WL 300", "Se: 3 Im: 12/40", "T2 FLAIR", "C+ AXIAL",
    "x1.5", "-40 HU",
]
DROPPED = [
    "ZANZIBAROV QUIXOTICA", "03 MAR 1933", "GRIMSDITCH HOSP", "Smith, Alice", "KOWALSKI",
    "AB-4711", "PATIENT: DOE JOHN", "12 03 1933", "12.03.1933", "03 03 33", "MRN 123456",
    "ID: 4711", "1933", "Ex: 12345", "DOB 1933-03-03", "St Mary's", "A 4711", "", "   ",
    "R Smith", "Acc# 99", "4711 M", "Dr. Who", "RIGHT KNEE JONES",
]


@pytest.mark.parametrize("text", KEPT)
def test_markers_labels_and_measurements_are_kept(text: str) -> None:
    assert safe_text(text)


@pytest.mark.parametrize("text", DROPPED)
def test_everything_else_is_redacted(text: str) -> None:
    assert not safe_text(text)


PLANTED = {  # text -> the fragments that must not appear anywhere
    "ZANZIBAROV QUIXOTICA": ["ZANZIB", "QUIXOT"],
    "03 MAR 1933": ["1933"],
    "GRIMSDITCH HOSP": ["GRIMSD"],
    "Smith, Alice": ["Alice"],
    "KOWALSKI": ["KOWALS"],
    "AB-4711": ["4711"],
}


def leaked(fragment: str, data: bytes) -> bool:
    """``fragment`` in ``data`` (case-insensitive); a number only as a number of its own, not
    inside a longer number, a hex id or a decimal (a duration of 1933.2 ms or an id
    ...a1933f... is not the planted year)."""
    if not fragment.isdigit():
        return fragment.lower().encode() in data.lower()
    pattern = rb"(?<![0-9a-z.])" + fragment.encode() + rb"(?![0-9a-z]|\.[0-9])"
    return re.search(pattern, data, re.I) is not None


def leaks_in(blobs: dict[str, bytes]) -> list[tuple[str, str]]:
    """Every (place, planted fragment) found in ``blobs``."""
    return [
        (where, fragment)
        for where, data in blobs.items()
        for fragments in PLANTED.values()
        for fragment in fragments
        if leaked(fragment, data)
    ]


def _fonts() -> list[ImageFont.FreeTypeFont | ImageFont.ImageFont]:
    fonts: list[ImageFont.FreeTypeFont | ImageFont.ImageFont] = [
        ImageFont.load_default(size=22), ImageFont.load_default(size=30)
    ]
    for name in ("DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf"):
        path = Path("/usr/share/fonts/truetype/dejavu") / name
        if path.is_file():
            fonts.append(ImageFont.truetype(str(path), 26))
    return fonts


def burned_in_image(path: Path) -> Path:
    rng = np.random.default_rng(7)
    base = (rng.normal(40, 6, (640, 640))).clip(0, 255).astype(np.uint8)
    img = Image.fromarray(base).convert("RGB")
    d = ImageDraw.Draw(img)
    d.ellipse((200, 200, 440, 440), fill=(150, 150, 150))  # something to look at
    fonts = _fonts()
    spots = [(16, 12), (330, 12), (16, 590), (330, 590), (16, 300), (420, 480)]
    for i, text in enumerate(PLANTED):
        d.text(spots[i], text, fill="white", font=fonts[i % len(fonts)])
    d.text((600, 300), "R", fill="white", font=fonts[1])
    d.text((16, 520), "AP PORTABLE", fill="white", font=fonts[0])
    img.save(path)
    return path


@pytest.mark.slow
def test_a_run_that_reads_burned_in_text_leaks_none_of_it(
    settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    from medloupe.api import ask_async
    from medloupe.tools.ocr import OcrEngine

    image = burned_in_image(tmp_path / "burned.png")
    # the planted text is really on the image, legible to the OCR the tool uses
    raw = " ".join(t.text for t in OcrEngine().read(np.asarray(Image.open(image).convert("RGB"))))
    assert "KOWALSKI" in raw.upper() and "1933" in raw, raw

    def reviewer(payload: dict) -> dict:
        return {"action": "edit", "plan": {"calls": [{"tool": "read_text", "arguments": {}}]}}

    caplog.set_level(logging.DEBUG)
    run_dir = tmp_path / "run"
    answer = asyncio.run(ask_async(
        image, "What do the markers on this image say?", out=run_dir, vlm="none",
        settings=settings, review=reviewer, review_plan=True,
    ))
    from medloupe.review.page import export_review_html

    export_review_html(run_dir)  # the review page a reviewer opens (the service renders it alike)
    out, err = capsys.readouterr()
    files = [p for p in [*run_dir.rglob("*"), *settings.home.rglob("*")] if p.is_file()]
    assert any(p.name.startswith("checkpoints.sqlite") for p in files)
    assert any(p.name == "review.html" for p in files)
    blobs = {str(p): p.read_bytes() for p in files}
    blobs["stdout"], blobs["stderr"] = out.encode(), err.encode()
    blobs["log"] = "\n".join(r.getMessage() for r in caplog.records).encode()
    blobs["answer"] = answer.model_dump_json().encode()
    assert not leaks_in(blobs), leaks_in(blobs)
    # the safe markers are still read, and the redacted lines keep their boxes
    trace = blobs[str(run_dir / "trace.json")].decode()
    assert "AP PORTABLE" in trace
    assert trace.count("[redacted]") >= len(PLANTED)


@pytest.mark.slow
def test_through_the_service_the_db_stream_and_page_leak_none(tmp_path: Path) -> None:
    """The same image through ``medloupe serve`` (no VLM: the rule-based plan reads the text
    because the question asks what is written): the event stream, the trace and the review
    page as served, and every file of the server's home, hold none of the planted text."""
    import httpx

    from tests.service_helpers import Server, post_run, sse_events, wait_done

    image = burned_in_image(tmp_path / "burned.png")
    home = tmp_path / "svc"
    srv = Server(home, "--vlm", "none").start()
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            run_id = post_run(c, image, "What do the markers on this image say?").json()["run_id"]
            stream = json.dumps([data for _, data in sse_events(c, run_id)])
            info = wait_done(c, run_id)
            assert info["status"] == "done", info
            served = {
                "events": stream.encode(),
                "run": c.get(f"/v1/runs/{run_id}").content,
                "trace": c.get(f"/v1/runs/{run_id}/trace").content,
                "page": c.get(f"/runs/{run_id}").content,
            }
    finally:
        srv.stop()
    assert b"read_text" in served["trace"] and b"[redacted]" in served["trace"]
    blobs = {**served, **{str(p): p.read_bytes() for p in home.rglob("*") if p.is_file()}}
    assert not leaks_in(blobs), leaks_in(blobs)
