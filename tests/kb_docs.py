"""Small real documents for knowledge-base tests: Markdown, HTML, JSONL, PDF, figures."""

from __future__ import annotations

import json
import textwrap
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def picture(kind: str, size: int = 200) -> np.ndarray:
    """Distinct synthetic figures: ``rings``, ``stripes``, ``blob``, ``grid``."""
    im = Image.new("RGB", (size, size), (245, 240, 230))
    d = ImageDraw.Draw(im)
    if kind == "rings":
        for r in range(10, size // 2, 14):
            d.ellipse(
                [size / 2 - r, size / 2 - r, size / 2 + r, size / 2 + r],
                outline=(180, 30, 40),
                width=4,
            )
    elif kind == "stripes":
        for x in range(0, size, 16):
            d.rectangle([x, 0, x + 7, size], fill=(20, 60, 160))
    elif kind == "blob":
        d.ellipse([30, 50, 150, 160], fill=(90, 160, 60))
        d.ellipse([110, 20, 180, 90], fill=(200, 170, 30))
    elif kind == "grid":
        for x in range(0, size, 25):
            d.line([x, 0, x, size], fill=(0, 0, 0), width=2)
            d.line([0, x, size, x], fill=(0, 0, 0), width=2)
    else:
        raise ValueError(kind)
    return np.asarray(im)


def save_picture(path: Path, kind: str) -> Path:
    Image.fromarray(picture(kind)).save(path)
    return path


def write_markdown(folder: Path) -> Path:
    save_picture(folder / "rings.png", "rings")
    text = """# Pleura and effusions

## Pleural effusion

A pleural effusion is an abnormal accumulation of fluid in the pleural space between the
visceral and parietal pleura. On an upright chest radiograph it blunts the costophrenic angle
and forms a meniscus.

![Concentric rings drawn for the pleura figure](rings.png)

## Pneumothorax

A pneumothorax is air in the pleural space; the visceral pleural line is seen with no lung
markings beyond it, and the lung may collapse toward the hilum.
"""
    path = folder / "pleura.md"
    path.write_text(text)
    return path


def write_html(folder: Path) -> Path:
    save_picture(folder / "stripes.png", "stripes")
    html = """<html><head><title>Renal anatomy notes</title></head><body>
<h1>Renal anatomy notes</h1>
<h2>The nephron</h2>
<p>The nephron is the functional unit of the kidney: a glomerulus filters blood plasma into
Bowman's capsule, and the renal tubule reabsorbs water and solutes.</p>
<figure><img src="stripes.png" alt="striped pattern"><figcaption>Figure 2. Tubules of the
renal medulla drawn as parallel stripes.</figcaption></figure>
<h2>Renal calculi</h2>
<p>Kidney stones are crystalline concretions in the urinary tract that cause colicky flank
pain and may obstruct the ureter.</p>
<img src="missing.png" alt="a figure whose file is missing">
</body></html>"""
    path = folder / "renal.html"
    path.write_text(html)
    return path


def write_jsonl(folder: Path) -> Path:
    save_picture(folder / "blob.png", "blob")
    pages = [
        {
            "document": "Cardiology handbook",
            "section": "Cardiomegaly",
            "page": 12,
            "text": "Cardiomegaly is an enlarged heart; on a posteroanterior chest radiograph "
            "the cardiothoracic ratio exceeds 0.5.",
            "figures": [{"path": "blob.png", "caption": "Two overlapping blobs, figure 12.1"}],
        },
        {
            "document": "Cardiology handbook",
            "section": "Pericardial effusion",
            "page": 13,
            "text": "Fluid in the pericardial sac gives a globular water-bottle heart.",
            "figures": [{"path": "gone.png", "caption": "A figure that is not there"}],
        },
        "not an object",
    ]
    path = folder / "cardio.jsonl"
    path.write_text("\n".join(json.dumps(p) for p in pages) + "\n{broken json\n")
    return path


def write_pdf(path: Path, pages: list[str], title: str = "Chest radiology primer") -> Path:
    """A small real PDF with a text layer (Helvetica), one page per string, and a title."""
    objects: list[bytes] = []

    def add(body: bytes) -> int:
        objects.append(body)
        return len(objects)

    font = add(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    page_ids = []
    pages_id = len(objects) + 1 + 2 * len(pages)
    for text in pages:
        lines = textwrap.wrap(text, 80)
        ops = ["BT", "/F1 11 Tf", "14 TL", "50 780 Td"]
        for line in lines:
            safe = line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
            ops.append(f"({safe}) Tj T*")
        ops.append("ET")
        stream = zlib.compress("\n".join(ops).encode("latin-1"))
        content = add(
            b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(stream)
            + stream
            + b"\nendstream"
        )
        page_ids.append(
            add(
                b"<< /Type /Page /Parent %d 0 R /MediaBox [0 0 595 842] "
                b"/Resources << /Font << /F1 %d 0 R >> >> /Contents %d 0 R >>"
                % (pages_id, font, content)
            )
        )
    kids = b" ".join(b"%d 0 R" % i for i in page_ids)
    assert add(b"<< /Type /Pages /Kids [%s] /Count %d >>" % (kids, len(page_ids))) == pages_id
    catalog = add(b"<< /Type /Catalog /Pages %d 0 R >>" % pages_id)
    info = add(b"<< /Title (%s) >>" % title.encode("latin-1"))
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for i, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    for off in offsets:
        out += b"%010d 00000 n \n" % off
    out += b"trailer\n<< /Size %d /Root %d 0 R /Info %d 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        catalog,
        info,
        xref,
    )
    path.write_bytes(bytes(out))
    return path


def write_image_pdf(path: Path, kind: str = "grid") -> Path:
    """A one-page PDF that holds an embedded image (written by Pillow)."""
    Image.fromarray(picture(kind, 300)).save(path, format="PDF", resolution=72.0)
    return path


def write_tiny_clip(folder: Path) -> Path:
    """A CLIP model with random weights (the real architecture, 24-d projections, 32 px
    input) and its image processor, saved in ``folder``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    config = CLIPConfig(
        text_config={
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "vocab_size": 99,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=24,
    )
    CLIPModel(config).save_pretrained(folder)
    CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(folder)
    return folder
