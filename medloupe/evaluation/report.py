"""``report.html``: one self-contained page with the metrics, plots and a card per item.

Plots (matplotlib, Agg backend): the reliability diagram and accuracy by modality and by
task. Each card shows the item's image with the run's overlay (downscaled, embedded as PNG),
the question, the answer or abstention, the ground truth and pass/fail.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

THUMB_SIDE = 256


def _png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _thumbnail(path: Path) -> str | None:
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        return None
    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB")
    except (OSError, UnidentifiedImageError):  # the item's own image may be the broken input
        return None
    rgb.thumbnail((THUMB_SIDE, THUMB_SIDE))
    buf = io.BytesIO()
    rgb.save(buf, format="PNG", optimize=True)
    return _png_uri(buf.getvalue())


def _figure_uri(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return _png_uri(buf.getvalue())


def plots(metrics: dict[str, Any]) -> dict[str, str]:
    """PNG data URIs: ``reliability``, ``by_modality``, ``by_task`` (those with data)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict[str, str] = {}
    bins = [b for b in metrics["calibration"]["bins"] if b["count"]]
    if bins:
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
        ax.bar(
            [(b["low"] + b["high"]) / 2 for b in bins],
            [b["accuracy"] for b in bins],
            width=0.09,
            alpha=0.7,
            label="accuracy",
        )
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o", color="C3")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy (answered items)")
        ece = metrics["calibration"]["ece"]
        ax.set_title(f"reliability (ECE {ece:.3f})" if ece is not None else "reliability")
        ax.legend(loc="upper left", fontsize=8)
        out["reliability"] = _figure_uri(fig)
    for key in ("modality", "task"):
        groups = metrics["by"].get(key, {})
        if not groups:
            continue
        names = list(groups)
        fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(names)), 3.2))
        ax.bar(names, [groups[n]["accuracy"] or 0.0 for n in names], label="accuracy")
        ax.plot(
            names,
            [groups[n]["abstention_rate"] or 0.0 for n in names],
            "o",
            color="C1",
            label="abstained",
        )
        ax.set_ylim(0, 1)
        ax.set_title(f"by {key}")
        ax.tick_params(axis="x", rotation=30, labelsize=8)
        ax.legend(fontsize=8)
        out[f"by_{key}"] = _figure_uri(fig)
    return out


def _table(title: str, rows: dict[str, Any]) -> str:
    cells = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>"
        for k, v in rows.items()
    )
    return f"<h2>{html.escape(title)}</h2><table>{cells}</table>"


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _card(out: Path, r: dict[str, Any]) -> str:
    run_dir = out / r.get("run_dir", "")
    thumb = _thumbnail(run_dir / "overlay.png") or _thumbnail(Path(r["image"]))
    if r.get("error"):
        verdict, cls = "run failed", "fail"
    elif r.get("abstained"):
        verdict, cls = "abstained", "abstain"
    elif r.get("correct"):
        verdict, cls = "pass", "pass"
    else:
        verdict, cls = "fail", "fail"
    answer = r.get("prediction") or r.get("abstention_reason") or r.get("error") or ""
    extra = []
    if r.get("iou") is not None:
        extra.append(f"IoU {r['iou']:.2f}")
    if r.get("confidence") is not None:
        extra.append(f"confidence {r['confidence']:.2f}")
    extra.append(f"{r.get('latency_s', 0):.1f} s, {r.get('tool_calls', 0)} tool calls")
    img = f'<img src="{thumb}" alt="">' if thumb else "<div class=noimg>no image</div>"
    return (
        f'<div class="card {cls}">{img}<div class=body>'
        f"<div class=meta>{html.escape(r['id'])} · {html.escape(r['task'])} · "
        f"{html.escape(str(r.get('modality')))}</div>"
        f"<div class=q>{html.escape(r['question'])}</div>"
        f"<div><b>answer</b> {html.escape(str(answer))[:400]}</div>"
        f"<div><b>truth</b> {html.escape(str(r['truth']))}"
        + (f" {html.escape(json.dumps(r['truth_boxes']))}" if r.get("truth_boxes") else "")
        + f"</div><div class=verdict>{verdict}</div>"
        f"<div class=meta>{html.escape(' · '.join(extra))}</div></div></div>"
    )


STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin-bottom:1em}th,td{border:1px solid #ccc;padding:2px 8px;
text-align:left;font-size:13px}.plots img{margin-right:1em;vertical-align:top}
.cards{display:flex;flex-wrap:wrap;gap:10px}.card{width:520px;display:flex;gap:8px;
border:2px solid #ccc;border-radius:6px;padding:6px;font-size:13px}.card img{width:180px;
height:180px;object-fit:contain;background:#000}.pass{border-color:#3a3}.fail{border-color:#c33}
.abstain{border-color:#e90}.verdict{font-weight:bold}.meta{color:#666;font-size:12px}
.q{font-style:italic;margin:2px 0}
"""


def write_report(
    out: str | Path, records: Sequence[dict[str, Any]], metrics: dict[str, Any]
) -> Path:
    """Write ``out/report.html`` (atomically) and return its path."""
    from medloupe.artifacts import atomic_write_bytes
    from medloupe.schemas import DISCLAIMER

    out = Path(out)
    figs = plots(metrics)
    cfg = metrics.get("config", {})
    parts = [
        "<!doctype html><html><head><meta charset=utf-8><title>medloupe evaluation</title>",
        f"<style>{STYLE}</style></head><body><h1>medloupe evaluation</h1>",
        f"<p>{html.escape(json.dumps(cfg))}</p>",
        _table("overall", metrics["overall"]),
        _table("runtime", metrics["runtime"]),
        '<div class="plots">'
        + "".join(f'<img src="{uri}" alt="{name}">' for name, uri in figs.items())
        + "</div>",
    ]
    for key, groups in metrics["by"].items():
        head = "<tr><th>" + html.escape(key) + "</th><th>items</th><th>accuracy</th>"
        head += "<th>answered</th><th>acc. answered</th><th>abstained</th></tr>"
        body = "".join(
            f"<tr><td>{html.escape(name)}</td><td>{g['items']}</td><td>{_fmt(g['accuracy'])}</td>"
            f"<td>{g['answered']}</td><td>{_fmt(g['accuracy_answered'])}</td>"
            f"<td>{_fmt(g['abstention_rate'])}</td></tr>"
            for name, g in groups.items()
        )
        parts.append(f"<h2>by {html.escape(key)}</h2><table>{head}{body}</table>")
    parts.append(f"<h2>items ({len(records)})</h2><div class=cards>")
    parts += [_card(out, r) for r in records]
    parts.append(f"</div><p><small>{html.escape(DISCLAIMER)}</small></p></body></html>")
    path = out / "report.html"
    atomic_write_bytes(path, "".join(parts).encode("utf-8"))
    return path
