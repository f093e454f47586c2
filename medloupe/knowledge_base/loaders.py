"""Ingestion loaders: documents to passages that keep their place for citation.

Supported sources (:func:`load_source` picks by what the path is):

- an OpenStax CNXML book: a folder with ``collection.xml`` and ``modules/mNNNNN/index.cnxml``
  (section order from the collection; figures with titles, captions and alt text);
- PDF (pypdfium2): text per page, the page rendered as an image, embedded images;
- HTML and Markdown: sections from headings, ``<figure>``/``<img>`` with captions or alt text;
- JSONL pages: one ``{"document", "text", "section"?, "page"?, "title"?, "figures"?:
  [{"path", "caption"}]}`` per line.

Text is split into passages of at most :data:`MAX_WORDS` words that never cross a section or
page. A figure is a passage of kind ``"figure"`` (its text: title, caption, alt text) with the
image file or bytes; a figure whose image is missing is reported and kept as text only.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)

MAX_WORDS = 160
OVERLAP_WORDS = 30
_WS = re.compile(r"\s+")


@dataclass
class SourcePassage:
    """One passage as loaded, before embedding.

    Attributes:
        id: stable id within the knowledge base (document slug and position).
        document: document title (cited).
        section: chapter/section path, e.g. ``"1.1 Overview of Anatomy and Physiology"``.
        page: page number (PDF) or ``None``.
        kind: ``"text"`` or ``"figure"``.
        text: the passage text (for a figure: title, caption and alt text).
        figure_file: a figure's image file, or ``None``.
        figure_bytes: a figure's encoded image (rendered PDF page, embedded image), or ``None``.
        source: the file it came from.
    """

    id: str
    document: str
    section: str | None
    page: str | None
    kind: Literal["text", "figure"]
    text: str
    source: str
    figure_file: str | None = None
    figure_bytes: bytes | None = field(default=None, repr=False)


@dataclass
class LoadReport:
    """Problems met while loading: skipped figures and documents that failed."""

    problems: list[str] = field(default_factory=list)
    failed_documents: list[str] = field(default_factory=list)

    def warn(self, message: str) -> None:
        log.warning("%s", message)
        self.problems.append(message)


def clean(text: str) -> str:
    return _WS.sub(" ", text).strip()


def split_words(text: str, max_words: int = MAX_WORDS, overlap: int = OVERLAP_WORDS) -> list[str]:
    """Split ``text`` into chunks of at most ``max_words`` words, overlapping by ``overlap``."""
    words = text.split()
    if len(words) <= max_words:
        return [" ".join(words)] if words else []
    step = max(1, max_words - overlap)
    return [" ".join(words[i : i + max_words]) for i in range(0, len(words) - overlap, step)]


def pack_paragraphs(paragraphs: list[str], max_words: int = MAX_WORDS) -> list[str]:
    """Greedily pack paragraphs into passages of at most ``max_words`` words; a longer
    paragraph is split on its own with overlap."""
    out: list[str] = []
    current: list[str] = []
    count = 0
    for para in (clean(p) for p in paragraphs):
        if not para:
            continue
        n = len(para.split())
        if n > max_words:
            if current:
                out.append(" ".join(current))
                current, count = [], 0
            out.extend(split_words(para, max_words))
            continue
        if count + n > max_words and current:
            out.append(" ".join(current))
            current, count = [], 0
        current.append(para)
        count += n
    if current:
        out.append(" ".join(current))
    return out


def text_passages(
    paragraphs: list[str],
    ids: Iterator[str],
    *,
    document: str,
    section: str | None,
    source: Path,
    page: str | None = None,
) -> Iterator[SourcePassage]:
    """Text passages packed from ``paragraphs``, each taking the next id from ``ids``."""
    for chunk in pack_paragraphs(paragraphs):
        yield SourcePassage(
            id=next(ids),
            document=document,
            section=section,
            page=page,
            kind="text",
            text=chunk,
            source=str(source),
        )


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "doc"


# --- OpenStax CNXML -------------------------------------------------------------------------

_CNX = "{http://cnx.rice.edu/cnxml}"
_COL = "{http://cnx.rice.edu/collxml}"
_MD = "{http://cnx.rice.edu/mdml}"


def _collection_order(collection: Path) -> tuple[str, list[tuple[str, str | None]]]:
    """(book title, [(module id, section label prefix)]) in reading order."""
    root = ET.parse(collection).getroot()
    title_el = root.find(f"{_COL}metadata/{_MD}title") or root.find(f".//{_MD}title")
    book = clean(title_el.text or "") if title_el is not None else collection.parent.name
    order: list[tuple[str, str | None]] = []
    chapter = 0

    def walk(node: ET.Element) -> None:
        nonlocal chapter
        content = node.find(f"{_COL}content")
        if content is None:
            return
        modules = [c for c in content if c.tag == f"{_COL}module"]
        subs = [c for c in content if c.tag == f"{_COL}subcollection"]
        if modules and not subs and node.tag == f"{_COL}subcollection":
            chapter += 1
            title = clean(node.findtext(f"{_MD}title") or "")
            for i, m in enumerate(modules):
                label = f"Chapter {chapter} {title}: Introduction" if i == 0 else f"{chapter}.{i}"
                order.append((m.get("document", ""), label))
            return
        for child in content:
            if child.tag == f"{_COL}module":
                order.append((child.get("document", ""), None))
            elif child.tag == f"{_COL}subcollection":
                walk(child)

    walk(root)
    return book, order


def _text(el: ET.Element) -> str:
    return clean("".join(el.itertext()))


def load_openstax(folder: Path, report: LoadReport) -> Iterator[SourcePassage]:
    """Passages of an OpenStax CNXML book folder (``collection.xml``, ``modules/``)."""
    book, order = _collection_order(folder / "collection.xml")
    doc_slug = slug(folder.name)
    for module_id, label in order:
        path = folder / "modules" / module_id / "index.cnxml"
        try:
            root = ET.parse(path).getroot()
        except (OSError, ET.ParseError) as exc:
            report.failed_documents.append(f"{path}: {exc}")
            report.warn(f"{path}: skipped, unreadable ({exc})")
            continue
        title = clean(root.findtext(f"{_CNX}title") or module_id)
        if label is None:
            heading = title
        elif label.startswith("Chapter"):
            heading = label
        else:
            heading = f"{label} {title}"
        content = root.find(f"{_CNX}content")
        if content is None:
            continue
        yield from _cnx_module(content, path, module_id, heading, book, doc_slug, report)


def _cnx_module(
    content: ET.Element,
    path: Path,
    module_id: str,
    heading: str,
    book: str,
    doc_slug: str,
    report: LoadReport,
) -> Iterator[SourcePassage]:
    """Passages of one CNXML module's content, sections nested under ``heading``."""
    ids = (f"{doc_slug}:{module_id}:p{n}" for n in itertools.count(1))

    def emit(section: str, paragraphs: list[str]) -> Iterator[SourcePassage]:
        return text_passages(paragraphs, ids, document=book, section=section, source=path)

    def visit(node: ET.Element, section: str) -> Iterator[SourcePassage]:
        paragraphs: list[str] = []
        for child in node:
            tag = child.tag.replace(_CNX, "")
            if tag == "title":
                continue
            if tag == "section":
                yield from emit(section, paragraphs)
                paragraphs = []
                sub = clean(child.findtext(f"{_CNX}title") or "")
                yield from visit(child, f"{heading} > {sub}" if sub else section)
            elif tag == "figure":
                yield from emit(section, paragraphs)
                paragraphs = []
                yield from _cnx_figure(child, path, doc_slug, module_id, book, section, report)
            elif tag in ("para", "list", "note", "table", "equation", "example", "exercise"):
                figures = child.findall(f".//{_CNX}figure")
                for fig in figures:
                    yield from _cnx_figure(fig, path, doc_slug, module_id, book, section, report)
                if tag != "exercise":
                    paragraphs.append(_text(child))
        yield from emit(section, paragraphs)

    yield from visit(content, heading)


def _cnx_figure(
    fig: ET.Element,
    module_path: Path,
    doc_slug: str,
    module_id: str,
    book: str,
    section: str,
    report: LoadReport,
) -> Iterator[SourcePassage]:
    fig_id = fig.get("id") or "figure"
    title = clean(fig.findtext(f"{_CNX}title") or "")
    caption_el = fig.find(f"{_CNX}caption")
    caption = _text(caption_el) if caption_el is not None else ""
    media = fig.find(f".//{_CNX}media")
    alt = clean(media.get("alt", "")) if media is not None else ""
    image = fig.find(f".//{_CNX}image")
    text = clean(" ".join(t for t in (title, caption, alt) if t))
    if not text:
        return
    figure_file = None
    if image is not None and image.get("src"):
        candidate = (module_path.parent / image.get("src", "")).resolve()
        if candidate.is_file():
            figure_file = str(candidate)
        else:
            report.warn(
                f"{module_path}: figure {fig_id} names {image.get('src')}, which is missing; "
                "kept as text only"
            )
    yield SourcePassage(
        id=f"{doc_slug}:{module_id}:{fig_id}",
        document=book,
        section=section,
        page=None,
        kind="figure" if figure_file else "text",
        text=text,
        source=str(module_path),
        figure_file=figure_file,
    )


# --- PDF ------------------------------------------------------------------------------------


def _pdf_figure(
    pid: str, document: str, page: str, caption: str, path: Path, pil: Any
) -> SourcePassage:
    """A figure passage of a PDF page holding ``pil`` (a PIL image) as PNG bytes."""
    import io

    buf = io.BytesIO()
    pil.convert("RGB").save(buf, format="PNG")
    return SourcePassage(
        id=pid,
        document=document,
        section=None,
        page=page,
        kind="figure",
        text=caption.strip(),
        source=str(path),
        figure_bytes=buf.getvalue(),
    )


def load_pdf(path: Path, report: LoadReport, *, render_px: int = 1024) -> Iterator[SourcePassage]:
    """Text per page, each page rendered as an image, and embedded images (pypdfium2)."""

    import pypdfium2 as pdfium
    import pypdfium2.raw as pdfium_c

    pdf = pdfium.PdfDocument(str(path))
    try:
        meta_title = (pdf.get_metadata_dict() or {}).get("Title") or ""
        document = clean(meta_title) or path.stem
        doc_slug = slug(path.stem)
        for index in range(len(pdf)):
            page = pdf[index]
            number = str(index + 1)
            textpage = page.get_textpage()
            text = textpage.get_text_range()
            textpage.close()
            yield from text_passages(
                re.split(r"\n\s*\n", text),
                (f"{doc_slug}:p{number}:{i}" for i in itertools.count(1)),
                document=document,
                section=None,
                source=path,
                page=number,
            )
            width, height = page.get_size()
            scale = render_px / max(width, height, 1.0)
            first = clean(text)[:200]
            rendered = page.render(scale=scale).to_pil()
            caption = f"Page {number} of {document}. {first}"
            yield _pdf_figure(
                f"{doc_slug}:p{number}:page", document, number, caption, path, rendered
            )
            for j, obj in enumerate(page.get_objects(filter=[pdfium_c.FPDF_PAGEOBJ_IMAGE]), 1):
                try:
                    pil = obj.get_bitmap().to_pil().convert("RGB")
                except (pdfium.PdfiumError, OSError, ValueError) as exc:
                    report.warn(f"{path}: page {number} image {j} unreadable ({exc}); skipped")
                    continue
                if pil.width < 32 or pil.height < 32:
                    continue
                caption = f"Figure on page {number} of {document}. {first}"
                yield _pdf_figure(
                    f"{doc_slug}:p{number}:img{j}", document, number, caption, path, pil
                )
            page.close()
    finally:
        pdf.close()


# --- HTML and Markdown -----------------------------------------------------------------------


def _load_html_text(html: str, path: Path, report: LoadReport) -> Iterator[SourcePassage]:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(html, "html.parser")
    title_el = soup.find("title") or soup.find("h1")
    document = clean(title_el.get_text()) if title_el else path.stem
    doc_slug = slug(path.stem)
    section: str | None = None
    paragraphs: list[str] = []
    ids = (f"{doc_slug}:{n}" for n in itertools.count(1))

    def flush() -> Iterator[SourcePassage]:
        nonlocal paragraphs
        yield from text_passages(paragraphs, ids, document=document, section=section, source=path)
        paragraphs = []

    body = soup.body or soup
    for el in body.find_all(["h1", "h2", "h3", "h4", "p", "li", "figure", "img", "pre", "td"]):
        name = el.name
        if name in ("h1", "h2", "h3", "h4"):
            yield from flush()
            section = clean(el.get_text()) or section
        elif name in ("figure", "img"):
            if name == "img" and el.find_parent("figure") is not None:
                continue
            yield from flush()  # the text before the figure keeps its place
            img = el if name == "img" else el.find("img")
            cap_el = el.find("figcaption") if name == "figure" else None
            caption = clean(cap_el.get_text()) if cap_el else ""
            alt = clean(str(img.get("alt", ""))) if img else ""
            text = clean(f"{caption} {alt}")
            src = str(img.get("src", "")) if img else ""
            figure_file = None
            if src and not src.startswith(("http://", "https://", "data:")):
                candidate = (path.parent / src).resolve()
                if candidate.is_file():
                    figure_file = str(candidate)
                else:
                    report.warn(f"{path}: image {src} is missing; kept as text only")
            elif src:
                report.warn(f"{path}: image {src[:80]} is not a local file; kept as text only")
            if text or figure_file:
                yield SourcePassage(
                    id=next(ids),
                    document=document,
                    section=section,
                    page=None,
                    kind="figure" if figure_file else "text",
                    text=text or f"Figure in {document}",
                    source=str(path),
                    figure_file=figure_file,
                )
        elif el.find_parent(["li", "figure"]) is None or name == "li":
            if name == "p" and el.find_parent("li") is not None:
                continue
            paragraphs.append(el.get_text(" "))
    yield from flush()


def load_html(path: Path, report: LoadReport) -> Iterator[SourcePassage]:
    yield from _load_html_text(path.read_text(encoding="utf-8", errors="replace"), path, report)


def load_markdown(path: Path, report: LoadReport) -> Iterator[SourcePassage]:
    from markdown_it import MarkdownIt

    html = MarkdownIt("commonmark").render(path.read_text(encoding="utf-8", errors="replace"))
    yield from _load_html_text(html, path, report)


# --- JSONL pages ---------------------------------------------------------------------------


def load_jsonl(path: Path, report: LoadReport) -> Iterator[SourcePassage]:
    """Pages from JSONL: ``document`` and ``text`` required; ``id``, ``section``, ``page``,
    ``figures`` (``[{"path", "caption"}]``, paths relative to the file) optional.

    Read line by line (a corpus may be larger than memory); a line that is not UTF-8 JSON is
    reported and skipped."""
    doc_slug = slug(path.stem)
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            yield from _jsonl_line(path, n, raw, doc_slug, report)


def _jsonl_line(
    path: Path, n: int, raw: bytes, doc_slug: str, report: LoadReport
) -> Iterator[SourcePassage]:
    if not raw.strip():
        return
    try:
        item = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        report.warn(f"{path}:{n}: not UTF-8 ({exc.reason}); line skipped")
        return
    except json.JSONDecodeError as exc:
        report.warn(f"{path}:{n}: not JSON ({exc.msg}); line skipped")
        return
    if not isinstance(item, dict) or not {"document", "text"} <= item.keys():
        report.warn(f"{path}:{n}: a page needs `document` and `text`; line skipped")
        return
    base = str(item.get("id") or f"{doc_slug}:{n}")
    page = str(item["page"]) if item.get("page") is not None else None
    chunks = pack_paragraphs(str(item["text"]).split("\n\n"))
    for i, chunk in enumerate(chunks, 1):
        yield SourcePassage(
            id=base if len(chunks) == 1 else f"{base}:{i}",
            document=str(item["document"]),
            section=item.get("section"),
            page=page,
            kind="text",
            text=chunk,
            source=str(path),
        )
    for j, fig in enumerate(item.get("figures") or [], 1):
        fpath = (path.parent / str(fig.get("path", ""))).resolve()
        caption = clean(str(fig.get("caption", "")))
        if not fpath.is_file():
            report.warn(f"{path}:{n}: figure {fig.get('path')} is missing; kept as text only")
        yield SourcePassage(
            id=f"{base}:fig{j}",
            document=str(item["document"]),
            section=item.get("section"),
            page=page,
            kind="figure" if fpath.is_file() else "text",
            text=caption or f"Figure {j} of {item['document']}",
            source=str(path),
            figure_file=str(fpath) if fpath.is_file() else None,
        )


# --- dispatch -------------------------------------------------------------------------------


def source_kind(path: Path) -> str:
    """``openstax``, ``pdf``, ``html``, ``markdown`` or ``jsonl``.

    Raises:
        ValueError: not a supported source.
    """
    if path.is_dir():
        if (path / "collection.xml").is_file():
            return "openstax"
        raise ValueError(f"{path} is a folder without collection.xml (not an OpenStax book)")
    suffix = path.suffix.lower()
    kinds = {
        ".pdf": "pdf",
        ".html": "html",
        ".htm": "html",
        ".md": "markdown",
        ".markdown": "markdown",
        ".jsonl": "jsonl",
    }
    if suffix not in kinds:
        raise ValueError(
            f"{path}: unsupported source type {suffix or '(none)'}; give a PDF, HTML, "
            "Markdown or JSONL file, or an OpenStax CNXML book folder"
        )
    return kinds[suffix]


def load_source(path: str | Path, report: LoadReport) -> Iterator[SourcePassage]:
    """Passages of one source. A document that cannot be read is reported in
    ``report.failed_documents`` (with its name) and yields nothing; others go on."""
    p = Path(path)
    try:
        kind = source_kind(p)
        loaders: dict[str, Callable[[Path, LoadReport], Iterator[SourcePassage]]] = {
            "openstax": load_openstax,
            "pdf": load_pdf,
            "html": load_html,
            "markdown": load_markdown,
            "jsonl": load_jsonl,
        }
        loader = loaders[kind]
        if kind == "jsonl":  # a corpus, streamed: its bad lines are skipped one by one
            yield from loader(p, report)
            return
        # the whole document first: one that fails half-way contributes nothing
        passages = list(loader(p, report))
    except FileNotFoundError:
        report.failed_documents.append(f"{p}: does not exist")
        report.warn(f"{p}: does not exist; skipped")
    except Exception as exc:  # noqa: BLE001 - one corrupt document must not stop the build
        report.failed_documents.append(f"{p}: {type(exc).__name__}: {exc}")
        report.warn(f"{p}: failed ({type(exc).__name__}: {exc}); skipped, the build goes on")
    else:
        yield from passages
