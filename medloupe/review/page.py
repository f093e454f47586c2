"""The trace-review page: one self-contained HTML file per run.

What a clinician reviewing a run needs on one page, with no JSON to read:

- the image with toggleable overlays: boxes (regions of tools and of the answer), masks,
  and the crops of each second look;
- the timeline: plan, each tool call (arguments, output, timing, status), the first look,
  each rethink round (its crops, the answer before and after), retrieval (passages and
  figures), model calls and errors;
- the final answer: each claim is a button; selecting it highlights its regions on the
  image, its citations and its evidence in the timeline; confidence or abstention; the
  disclaimer;
- the reviews, and (on the served page) a form to agree or disagree with a comment.

Images are embedded as ``data:`` URIs, so the file works offline and from e-mail; only the
review form talks to the server (``review_url``). All text from the run is HTML-escaped;
the page runs no code from the run's data.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import html
import io
import json
import string
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from medloupe.artifacts import ArtifactStore
from medloupe.config import Settings
from medloupe.trace import TraceDocument, TraceEvent

_MAX_EMBED_BYTES = 8_000_000  # per artifact; larger ones are left out with a note


def _esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _fmt_box(box: Iterable[float]) -> str:
    return "[" + ", ".join(f"{float(v):.0f}" for v in box) + "]"


def _json_block(value: Any, limit: int = 4000) -> str:
    text = json.dumps(value, indent=1, default=str)
    if len(text) > limit:
        text = text[:limit] + "\n… (cut; full text in trace.json)"
    return f"<pre>{_esc(text)}</pre>"


class _Artifacts:
    """Artifact ids of the run -> ``data:`` URIs (each encoded once)."""

    def __init__(self, store: ArtifactStore) -> None:
        self.store = store
        self._uris: dict[str, str | None] = {}

    def uri(self, artifact_id: str | None) -> str | None:
        if not artifact_id or not artifact_id.endswith(".png"):
            return None
        if artifact_id not in self._uris:
            try:
                data = self.store.path(artifact_id).read_bytes()
            except (KeyError, OSError):
                data = b""
            ok = 0 < len(data) <= _MAX_EMBED_BYTES
            self._uris[artifact_id] = (
                "data:image/png;base64," + base64.b64encode(data).decode() if ok else None
            )
        return self._uris[artifact_id]

    def mask_uri(self, artifact_id: str | None) -> str | None:
        """A mask artifact as a translucent coloured RGBA PNG (for drawing over the image)."""
        if not artifact_id or not self.store.exists(artifact_id):
            return None
        from PIL import Image

        values = np.asarray(self.store.load(artifact_id))
        mask = (values.max(axis=2) if values.ndim == 3 else values) > 0
        rgba = np.zeros((*mask.shape, 4), dtype=np.uint8)
        rgba[mask] = (255, 64, 160, 110)
        buf = io.BytesIO()
        Image.fromarray(rgba, mode="RGBA").save(buf, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _img(uri: str | None, alt: str, cls: str = "thumb") -> str:
    if uri is None:
        return f'<span class="missing">[{_esc(alt)}: not available]</span>'
    return f'<img class="{cls}" src="{uri}" alt="{_esc(alt)}">'


def _citation_item(c: dict[str, Any], art: _Artifacts, *, with_score: bool = False) -> str:
    """One cited or retrieved passage as a list item tied to its passage evidence id."""
    ev_id = "ev-passage-" + str(c.get("id", "")).removeprefix("cit-")
    score = f" (score {float(c.get('score') or 0):.2f})" if with_score else ""
    figure = _img(art.uri(c.get("figure_artifact")), "figure") if c.get("figure_artifact") else ""
    return (
        f'<li class="citation" data-evidence="{_esc(ev_id)}">'
        f"<b>{_esc(c.get('document'))}</b> {_esc(c.get('section') or '')} "
        f"p. {_esc(c.get('page') or '?')}{score}"
        f"<blockquote>{_esc(c.get('snippet'))}</blockquote>{figure}</li>"
    )


_Evidence = dict[str, dict[str, Any]]


def _evidence_map(doc: TraceDocument) -> _Evidence:
    """Evidence id -> evidence dict, from the stored evidence and, for a run cut short, the
    tool-call and retrieval events."""
    out: dict[str, dict[str, Any]] = {}
    for ev in doc.evidence:
        if isinstance(ev, dict) and "id" in ev:
            out[str(ev["id"])] = ev
    for e in doc.events:
        p = e.payload
        if e.kind == "tool_call" and p.get("evidence_id") and p["evidence_id"] not in out:
            out[p["evidence_id"]] = {
                "id": p["evidence_id"],
                "kind": "tool",
                "tool": e.name,
                "status": e.status,
                "summary": p.get("summary", ""),
                "regions": p.get("regions", []),
                "artifacts": p.get("artifacts", []),
            }
        if e.kind == "retrieval":
            for cit in p.get("passages", []) or []:
                ev_id = "ev-passage-" + str(cit.get("id", "")).removeprefix("cit-")
                out.setdefault(
                    ev_id,
                    {
                        "id": ev_id,
                        "kind": "passage",
                        "citation": cit,
                        "summary": cit.get("snippet"),
                    },
                )
    return out


def _regions(doc: TraceDocument, evidence: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Regions to draw: the answer's first (marked), then those of every tool result."""
    seen: dict[str, dict[str, Any]] = {}
    answer_regions = (doc.answer or {}).get("regions", []) or []
    for r in answer_regions:
        seen[str(r["id"])] = {**r, "in_answer": True}
    for ev in evidence.values():
        for r in ev.get("regions", []) or []:
            if r.get("label") == "crop":
                continue
            seen.setdefault(str(r["id"]), {**r, "in_answer": False})
    return list(seen.values())


def _plan_row(e: TraceEvent, head: str, art: _Artifacts, evidence: _Evidence) -> str:
    p = e.payload
    plan = p.get("plan", {}) or {}
    calls = "".join(
        f"<li><code>{_esc(c.get('tool'))}</code> "
        f"<code class='args'>{_esc(json.dumps(c.get('arguments', {})))}</code>"
        f" — {_esc(c.get('reason'))}</li>"
        for c in plan.get("calls", [])
    )
    problems = p.get("problems") or []
    extra = (
        "<p class='warn'>Repaired plan; problems: " + _esc("; ".join(map(str, problems))) + "</p>"
        if problems
        else ""
    )
    return (
        f'<li class="ev ev-plan"><h4>Plan (step {_esc(p.get("step"))}) {head}</h4>'
        f"<p>{_esc(plan.get('rationale'))}</p><ol>{calls}</ol>{extra}</li>"
    )


def _tool_row(e: TraceEvent, head: str, art: _Artifacts, evidence: _Evidence) -> str:
    p = e.payload
    ev_id = p.get("evidence_id")
    ev = evidence.get(ev_id or "", {})
    arts = "".join(
        _img(art.uri(a), a)
        for a in (p.get("artifacts") or ev.get("artifacts") or [])[:6]
        if not a.startswith("mask-")
    )
    err = f"<p class='err'>{_esc(p.get('error'))}</p>" if p.get("error") else ""
    output = (
        f"<details><summary>output</summary>{_json_block(ev.get('output'))}</details>"
        if ev.get("output")
        else ""
    )
    return (
        f'<li class="ev ev-tool" data-evidence="{_esc(ev_id)}">'
        f"<h4>Tool <code>{_esc(e.name)}</code> ({_esc(e.node)}) {head}</h4>"
        f"<p class='eid'>evidence <code>{_esc(ev_id)}</code></p>"
        f"<details><summary>arguments</summary>{_json_block(p.get('arguments', {}))}</details>"
        f"<p>{_esc(p.get('summary'))}</p>{err}{output}<div class='arts'>{arts}</div></li>"
    )


def _model_result(result: dict[str, Any]) -> str:
    """What a model call's validated reply said: answer, findings, regions, note."""
    body = ""
    if "answer" in result or "short_answer" in result:
        ans = result.get("answer", result.get("short_answer"))
        conf = result.get("confidence")
        body += f"<p>answer: <b>{_esc(ans)}</b>"
        body += f", confidence {float(conf):.2f}</p>" if conf is not None else "</p>"
    if result.get("findings"):
        body += "<ul>" + "".join(f"<li>{_esc(f)}</li>" for f in result["findings"]) + "</ul>"
    if result.get("regions"):
        looks = "; ".join(
            f"{_fmt_box(r['box_xyxy'])} {_esc(r.get('reason'))}" for r in result["regions"]
        )
        body += f"<p>regions to look at: {looks}</p>"
    if result.get("note"):
        body += f"<p class='note'>{_esc(result['note'])}</p>"
    return body


def _model_row(e: TraceEvent, head: str, art: _Artifacts, evidence: _Evidence) -> str:
    p = e.payload
    result = p.get("result")
    title = {"first look": "First look (whole image)", "second look": "Model: second look"}.get(
        str(p.get("purpose")), f"Model call: {p.get('purpose')}"
    )
    body = _model_result(result) if isinstance(result, dict) else ""
    if p.get("error"):
        body += f"<p class='err'>{_esc(p['error'])}</p>"
    tokens = f"{p.get('prompt_tokens', 0)}+{p.get('completion_tokens', 0)} tokens"
    return (
        f'<li class="ev ev-model"><h4>{_esc(title)} {head}</h4>'
        f"<p class='meta'>{_esc(e.name)} · {_esc(p.get('model'))} · {tokens} · "
        f"{_esc(p.get('attempts'))} attempt(s)</p>{body}</li>"
    )


def _rethink_row(e: TraceEvent, head: str, art: _Artifacts, evidence: _Evidence) -> str:
    p = e.payload
    crops = "".join(
        "<figure>" + _img(art.uri(c), c, "crop") + f"<figcaption>{_fmt_box(b)}</figcaption>"
        "</figure>"
        for c, b in zip(p.get("crops", []), p.get("boxes", []), strict=False)
    )
    before, after = p.get("answer_before"), p.get("answer_after")
    changed = "changed" if before != after else "unchanged"
    note = f"<p class='note'>{_esc(p.get('note'))}</p>" if p.get("note") else ""
    more = (
        f"<p class='note'>asks for more: {_esc(p.get('request'))}</p>"
        if p.get("needs_more_evidence")
        else ""
    )
    return (
        f'<li class="ev ev-rethink"><h4>Rethink round {_esc(p.get("round"))} {head}</h4>'
        f"<div class='crops'>{crops}</div>"
        f"<p class='delta {changed}'>answer: <b>{_esc(before)}</b> "
        f"({float(p.get('confidence_before') or 0):.2f}) → <b>{_esc(after)}</b> "
        f"({float(p.get('confidence_after') or 0):.2f}) — {changed}</p>{note}{more}</li>"
    )


def _retrieval_row(e: TraceEvent, head: str, art: _Artifacts, evidence: _Evidence) -> str:
    p = e.payload
    if e.status == "skipped":
        return (
            f'<li class="ev ev-retrieval"><h4>Retrieval {head}</h4>'
            f"<p>{_esc(p.get('reason'))}</p></li>"
        )
    items = "".join(_citation_item(c, art, with_score=True) for c in p.get("passages", []))
    return (
        f'<li class="ev ev-retrieval"><h4>Retrieval ({_esc(e.name)}) {head}</h4>'
        f"<p>query: <i>{_esc(p.get('query'))}</i></p><ol>{items}</ol></li>"
    )


def _review_row(e: TraceEvent, head: str, art: _Artifacts, evidence: _Evidence) -> str:
    return (
        f'<li class="ev ev-review"><h4>Plan review: {_esc(e.status)} {head}</h4>'
        f"{_json_block(e.payload.get('plan'))}</li>"
    )


def _error_row(e: TraceEvent, head: str, art: _Artifacts, evidence: _Evidence) -> str:
    msg = e.payload.get("error") or e.payload.get("message")
    return (
        f'<li class="ev ev-error"><h4>{_esc(e.kind)} {_esc(e.node or "")} {head}</h4>'
        f"<p class='err'>{_esc(msg)}</p></li>"
    )


def _node_row(e: TraceEvent, head: str, art: _Artifacts, evidence: _Evidence) -> str:
    name = e.node if e.kind == "node_end" else e.kind
    return f'<li class="ev ev-node"><span class="node">{_esc(name)}</span> {head}</li>'


_ROWS: dict[str, Callable[[TraceEvent, str, _Artifacts, _Evidence], str]] = {
    "plan": _plan_row,
    "tool_call": _tool_row,
    "model_call": _model_row,
    "rethink_round": _rethink_row,
    "retrieval": _retrieval_row,
    "review": _review_row,
    "node_error": _error_row,
    "run_error": _error_row,
    "node_end": _node_row,
    "run_start": _node_row,
    "resume": _node_row,
    "run_end": _node_row,
}


def _event_row(e: TraceEvent, art: _Artifacts, evidence: _Evidence) -> str | None:
    """One timeline entry, or ``None`` for an event the timeline leaves out."""
    dur = f'<span class="dur">{e.duration_ms:.0f} ms</span>' if e.duration_ms is not None else ""
    status = f'<span class="st st-{_esc(e.status)}">{_esc(e.status)}</span>' if e.status else ""
    head = f'<span class="seq">#{e.seq}</span> {status} {dur}'
    row = _error_row if e.kind == "note" and e.status == "error" else _ROWS.get(e.kind)
    return row(e, head, art, evidence) if row else None


def _viewer(doc: TraceDocument, art: _Artifacts, evidence: _Evidence) -> str:
    """The image with its overlays: SVG in image pixels (XYXY maps straight to the viewBox)."""
    image = doc.meta.get("image") or {}
    width, height = int(image.get("width") or 1), int(image.get("height") or 1)
    shapes: list[str] = []
    masks: list[str] = []
    for r in _regions(doc, evidence):
        x0, y0, x1, y1 = (float(v) for v in r["box_xyxy"])
        cls = "box" + (" in-answer" if r.get("in_answer") else "")
        shapes.append(
            f'<rect class="{cls}" data-region="{_esc(r["id"])}" '
            f'data-evidence="{_esc(r.get("evidence_id"))}" x="{x0:.1f}" y="{y0:.1f}" '
            f'width="{x1 - x0:.1f}" height="{y1 - y0:.1f}"><title>{_esc(r.get("label"))} '
            f"{_fmt_box(r['box_xyxy'])} ({_esc(r.get('tool') or 'answer')})</title></rect>"
        )
        uri = art.mask_uri(r.get("mask_artifact"))
        if uri:
            masks.append(
                f'<image class="mask" data-evidence="{_esc(r.get("evidence_id"))}" href="{uri}" '
                f'x="0" y="0" width="{width}" height="{height}" preserveAspectRatio="none"/>'
            )
    crops = [
        f'<rect class="crop" data-round="{_esc(e.payload.get("round"))}" '
        f'x="{x0:.1f}" y="{y0:.1f}" width="{x1 - x0:.1f}" height="{y1 - y0:.1f}">'
        f"<title>rethink round {_esc(e.payload.get('round'))} crop</title></rect>"
        for e in doc.events
        if e.kind == "rethink_round"
        for x0, y0, x1, y1 in ((float(v) for v in b) for b in e.payload.get("boxes", []))
    ]
    image_uri = art.uri(image.get("display_artifact"))
    return (
        f'<div class="viewer" id="viewer" style="aspect-ratio:{width}/{height}">'
        + (_img(image_uri, "the run's image", "base") if image_uri else "")
        + f'<svg id="overlay" viewBox="0 0 {width} {height}" preserveAspectRatio="none">'
        + f'<g id="layer-masks">{"".join(masks)}</g>'
        + f'<g id="layer-crops">{"".join(crops)}</g>'
        + f'<g id="layer-boxes">{"".join(shapes)}</g></svg></div>'
        + '<div class="toggles">'
        + f'<label><input type="checkbox" id="toggle-boxes" checked> boxes ({len(shapes)})</label>'
        + f'<label><input type="checkbox" id="toggle-masks" checked> masks ({len(masks)})</label>'
        + f'<label><input type="checkbox" id="toggle-crops" checked> crops ({len(crops)})</label>'
        + "</div>"
    )


def _answer_html(
    answer: dict[str, Any], art: _Artifacts, status: str | None, error: str | None
) -> str:
    """The answer: short answer or abstention, claims as buttons, citations, provenance."""
    if not answer:
        return (
            f"<p class='err'>No answer: the run {_esc(status or 'did not finish')}"
            + (f" — {_esc(error)}" if error else "")
            + ".</p>"
        )
    if answer.get("abstained"):
        head = f"<p class='abstain'>Abstained: {_esc(answer.get('abstention_reason'))}</p>"
    else:
        head = (
            f"<p class='short'>{_esc(answer.get('short_answer'))}</p>"
            f"<p>confidence <b>{float(answer.get('confidence') or 0):.2f}</b></p>"
        )
    claims = "".join(
        f'<li><button type="button" class="claim" data-claim="{i}" '
        f'data-evidence="{_esc(" ".join(c.get("evidence_ids", [])))}">{_esc(c.get("text"))}'
        f"</button> <span class='cites'>"
        + ", ".join(f"<code>{_esc(x)}</code>" for x in c.get("evidence_ids", []))
        + "</span></li>"
        for i, c in enumerate(answer.get("claims", []))
    )
    cits = "".join(_citation_item(c, art) for c in answer.get("citations", []))
    prov = answer.get("provenance") or {}
    return (
        head
        + f"<p>{_esc(answer.get('explanation'))}</p>"
        + (f"<h3>Claims</h3><ol class='claims'>{claims}</ol>" if claims else "")
        + (f"<h3>Citations</h3><ol class='citations'>{cits}</ol>" if cits else "")
        + f"<p class='meta'>answered by {_esc(prov.get('answer_source'))}"
        + f" · VLM {_esc(prov.get('vlm') or 'none')}"
        + f" · tools {_esc(', '.join(prov.get('tools', [])) or 'none')}"
        + f" · retriever {_esc(prov.get('retriever') or 'none')}"
        + f" · medloupe {_esc(prov.get('medloupe_version'))}</p>"
    )


_REVIEW_FORM = (
    '<form id="review-form"><fieldset><legend>Your review of the answer</legend>'
    '<label><input type="radio" name="verdict" value="agree" required> agree</label> '
    '<label><input type="radio" name="verdict" value="disagree"> disagree</label><br>'
    '<textarea name="comment" rows="3" cols="60" maxlength="4000" '
    'placeholder="comment"></textarea><br>'
    '<input name="reviewer" maxlength="100" placeholder="reviewer (optional)"> '
    '<button type="submit" id="review-submit">submit review</button> '
    '<span id="review-status" role="status"></span></fieldset></form>'
)
_EXPORTED_NOTE = (
    "<p class='meta'>Exported page: reviews are shown as stored; add one on the "
    "served page (<code>medloupe serve</code>, <code>/runs/RUN_ID</code>).</p>"
)


def _reviews_html(doc: TraceDocument) -> str:
    items = "".join(
        f'<li class="review verdict-{_esc(r.get("verdict"))}"><b>{_esc(r.get("verdict"))}</b>'
        f" — {_esc(r.get('comment'))} <span class='meta'>{_esc(r.get('reviewer') or '')} "
        f"{_esc(r.get('created'))}</span></li>"
        for r in doc.reviews
    )
    return items or "<li class='none'>no review yet</li>"


def render_review_page(
    doc: TraceDocument,
    run_dir: str | Path,
    *,
    status: str | None = None,
    error: str | None = None,
    review_url: str | None = None,
) -> str:
    """The review page of one run as a self-contained HTML string (``page.html`` filled in).

    Args:
        doc: the run's trace document (:func:`medloupe.trace.read_trace`).
        run_dir: the run directory (for artifacts).
        status: run status to show (``done``, ``running``, ``failed``...).
        error: the failure reason of a failed run.
        review_url: where the review form posts JSON (``{"verdict", "comment",
            "reviewer"}``); ``None`` (an exported file) shows reviews read-only.
    """
    art = _Artifacts(ArtifactStore(Path(run_dir)))
    meta = doc.meta
    image = meta.get("image") or {}
    answer = doc.answer or {}
    evidence = _evidence_map(doc)
    rows = [r for r in (_event_row(e, art, evidence) for e in doc.events) if r]
    header_bits = [
        f"run <code>{_esc(doc.run_id)}</code>",
        f"status <b id='run-status'>{_esc(status or ('done' if answer else 'unknown'))}</b>",
        f"{_esc(image.get('modality'))} {int(image.get('width') or 1)}x"
        f"{int(image.get('height') or 1)} px",
        f"VLM {_esc(meta.get('vlm') or 'none')}",
        f"KB {_esc(meta.get('kb') or 'none')}",
    ]
    disclaimer = answer.get("disclaimer") or "medloupe is a research tool, not a medical device."
    return _asset("page.html").substitute(
        run_id=_esc(doc.run_id),
        css=_asset_text("page.css"),
        js=_asset_text("page.js"),
        question=_esc(meta.get("question") or answer.get("question") or ""),
        header=" · ".join(header_bits),
        disclaimer=_esc(disclaimer),
        viewer=_viewer(doc, art, evidence),
        answer=_answer_html(answer, art, status, error),
        reviews=_reviews_html(doc),
        form=_REVIEW_FORM if review_url else _EXPORTED_NOTE,
        timeline=f"<ol class='timeline'>{''.join(rows)}</ol>",
        # raw text inside <script>: JSON with "<" escaped cannot close the element
        config=json.dumps({"reviewUrl": review_url}).replace("<", "\\u003c"),
    )


@functools.cache
def content_security_policy() -> str:
    """The review page's Content-Security-Policy: its one inline script allowed by hash,
    nothing loaded from elsewhere, no framing."""
    digest = hashlib.sha256(_asset_text("page.js").encode("utf-8")).digest()
    script = "sha256-" + base64.b64encode(digest).decode("ascii")
    return (
        f"default-src 'self'; script-src '{script}'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data: blob:; connect-src 'self'; frame-ancestors 'none'; "
        "base-uri 'none'; form-action 'self'"
    )


@functools.lru_cache(maxsize=8)
def _asset_text(name: str) -> str:
    """A file of the page shipped beside this module (``page.html``, ``.css``, ``.js``)."""
    return (Path(__file__).parent / name).read_text(encoding="utf-8")


def _asset(name: str) -> string.Template:
    return string.Template(_asset_text(name))


def export_review_html(
    run_dir: str | Path, out: str | Path | None = None, settings: Settings | None = None
) -> Path:
    """Write the self-contained review page of the run in ``run_dir`` (default
    ``<run_dir>/review.html``), atomically; returns the path written. ``settings``: where
    the trace is (a shared database), when not in the run directory."""
    from medloupe.artifacts import atomic_write_bytes
    from medloupe.errors import RunNotFoundError
    from medloupe.trace import read_trace

    run_dir = Path(run_dir)
    meta_path = run_dir / "run.json"
    if not meta_path.is_file():
        raise RunNotFoundError(f"{run_dir} is not a run directory (no run.json)")
    meta = json.loads(meta_path.read_text())
    doc = read_trace(run_dir, meta["run_id"], settings=settings)
    status, error = _status_from_events(doc)
    target = Path(out) if out else run_dir / "review.html"
    atomic_write_bytes(
        target, render_review_page(doc, run_dir, status=status, error=error).encode("utf-8")
    )
    return target


def _status_from_events(doc: TraceDocument) -> tuple[str, str | None]:
    """(status, error) of a run as its trace tells it."""
    status, error = "created", None
    for e in doc.events:
        if e.kind in ("run_start", "resume"):
            status, error = "running", None
        elif e.kind == "run_end":
            status = "done"
        elif e.kind == "run_error":
            status, error = "failed", str(e.payload.get("error"))
    if doc.answer and status != "failed":
        status = "done"
    return status, error
