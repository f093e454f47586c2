"""Evaluation items and the dataset formats medloupe reads.

- **Generic JSONL** (the format of ``../shared/datasets/dev.jsonl``): one object a line with
  ``id``, ``task`` (``vqa`` | ``grounding`` | ``classification`` | ``relative_position`` |
  ``count``), ``image`` (relative to the JSONL file), ``question``, ``answer``,
  ``answer_type`` (``closed`` | ``open`` | ``box``) and optional ``source``, ``modality``,
  ``boxes_xyxy``, ``points_xy``, ``mask``, ``question_type``...; unknown keys are kept.
- **VQA-RAD** JSON (``trainset.json`` / ``testset.json``): a list of ``qid``, ``image_name``,
  ``question``, ``answer``, ``answer_type`` (CLOSED/OPEN), ``question_type``,
  ``image_organ``; images in ``--images`` (default: ``images/`` next to the file).
- **SLAKE**: a split file (``train.json`` / ``validate.json`` / ``test.json``, or an image
  folder's ``question.json``) with ``img_name`` (``xmlabN/source.jpg``), ``question``,
  ``answer``, ``answer_type``, ``modality``, ``q_lang``; images under ``--images`` (default:
  the ``imgs/`` folder of the SLAKE root). English questions only. Each image's
  ``detection.json`` (``[{"Liver": [x, y, w, h]}, ...]``) adds one grounding item per organ.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from medloupe.errors import InputError
from medloupe.text import is_closed

Task = Literal["vqa", "grounding", "classification", "relative_position", "count"]
AnswerType = Literal["closed", "open", "box"]


class EvalItem(BaseModel):
    """One question about one image, with its ground truth."""

    model_config = ConfigDict(extra="allow")

    id: str
    task: Task = "vqa"
    image: str = Field(description="absolute path once loaded")
    question: str
    answer: str
    answer_type: AnswerType = "open"
    source: str = "unknown"
    modality: str = "unknown"
    question_type: str | None = None
    boxes_xyxy: list[tuple[float, float, float, float]] | None = None
    points_xy: dict[str, tuple[float, float]] | list[tuple[float, float]] | None = None


def load_jsonl(path: str | Path) -> list[EvalItem]:
    """Items of a generic JSONL file; image paths are resolved against its folder.

    Raises:
        InputError: a line is not JSON or misses a required field (the line is named).
    """
    p = Path(path)
    items = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
            data["image"] = str((p.parent / data["image"]).resolve())
            items.append(EvalItem.model_validate(data))
        except (json.JSONDecodeError, KeyError, ValueError) as exc:
            raise InputError(f"{p}:{n}: not a valid evaluation item ({exc})") from None
    _check_unique(items, p)
    return items


def load_vqa_rad(path: str | Path, images: str | Path | None = None) -> list[EvalItem]:
    """Items of a VQA-RAD ``trainset.json`` / ``testset.json``."""
    p = Path(path)
    image_dir = Path(images) if images else p.parent / "images"
    rows = json.loads(p.read_text(encoding="utf-8"))
    items = []
    for row in rows:
        items.append(
            EvalItem(
                id=f"vqa_rad-{row['qid']}",
                task="vqa",
                image=str((image_dir / row["image_name"]).resolve()),
                question=row["question"],
                answer=str(row["answer"]),
                answer_type="closed" if is_closed(row.get("answer_type")) else "open",
                source="vqa_rad",
                modality=str(row.get("image_organ") or "unknown"),
                question_type=row.get("question_type"),
            )
        )
    _check_unique(items, p)
    return items


def load_slake(path: str | Path, images: str | Path | None = None) -> list[EvalItem]:
    """Items of a SLAKE split or ``question.json`` file, plus grounding items from each image's
    ``detection.json``."""
    p = Path(path)
    if images:
        image_dir = Path(images)
    elif p.name == "question.json":
        image_dir = p.parent.parent
    else:
        root = p.parent.parent if p.parent.name == "splits" else p.parent
        image_dir = root / "imgs"
    rows = [r for r in json.loads(p.read_text(encoding="utf-8")) if r.get("q_lang", "en") == "en"]
    items: list[EvalItem] = []
    seen_images: dict[str, dict[str, Any]] = {}
    for row in rows:
        image = (image_dir / row["img_name"]).resolve()
        qid = row.get("qid", f"{row['img_name']}-{len(items)}")
        items.append(
            EvalItem(
                id=f"slake-{qid}",
                task="vqa",
                image=str(image),
                question=row["question"],
                answer=str(row["answer"]),
                answer_type="closed" if is_closed(row.get("answer_type")) else "open",
                source="slake",
                modality=str(row.get("modality") or "unknown"),
                question_type=row.get("content_type"),
            )
        )
        seen_images.setdefault(str(image), row)
    for image, row in seen_images.items():
        detection = Path(image).parent / "detection.json"
        if not detection.is_file():
            continue
        for k, entry in enumerate(json.loads(detection.read_text(encoding="utf-8"))):
            for organ, (x, y, w, h) in entry.items():
                items.append(
                    EvalItem(
                        id=f"slake-{Path(image).parent.name}-box{k}",
                        task="grounding",
                        image=image,
                        question=f"Locate the {organ.lower()} in this image and give its "
                        "bounding box.",
                        answer=organ,
                        answer_type="box",
                        source="slake",
                        modality=str(row.get("modality") or "unknown"),
                        boxes_xyxy=[(float(x), float(y), float(x + w), float(y + h))],
                    )
                )
    _check_unique(items, p)
    return items


def load_mirp(path: str | Path, images: str | Path | None = None) -> list[EvalItem]:
    """Items of a MIRP ("Your other Left") QA file: ``qa.json`` of RQ1 (organ names; images
    in ``images/``) or ``qa_dots.json`` / ``qa_letters.json`` / ``qa_numbers.json`` of RQ2,
    RQ3 and the ablation study (markers; images in ``image_dots/`` ...). Each becomes a
    closed relative-position item answered yes or no, with both objects' centres as
    ``points_xy`` (pixels of the slice as shown)."""
    p = Path(path)
    kind = p.stem.removeprefix("qa").lstrip("_")
    image_dir = Path(images) if images else p.parent / (f"image_{kind}" if kind else "images")
    study = p.parent.name
    items: list[EvalItem] = []
    for row in json.loads(p.read_text(encoding="utf-8")):
        for k, qa in enumerate(row["question_answer"]):
            points: dict[str, tuple[float, float]] = {}
            for n in ("1", "2"):
                name = str(
                    qa.get(f"object{n}_name") or qa.get(f"object{n}_label")
                    or qa.get(f"object{n}_gray") or f"object {n}"
                )  # fmt: skip
                points[name] = (float(qa[f"object{n}_center_x"]), float(qa[f"object{n}_center_y"]))
            items.append(
                EvalItem(
                    id=f"mirp-{study}-{kind or 'plain'}-{Path(row['filename']).stem}-{k}",
                    task="relative_position",
                    image=str((image_dir / row["filename"]).resolve()),
                    question=str(qa["question"]),
                    answer="yes" if int(qa["answer"]) else "no",
                    answer_type="closed",
                    source="mirp",
                    modality="CT",
                    question_type=f"{study} {kind or 'names'}",
                    points_xy=points,
                )
            )
    return items


def load_dataset(path: str | Path, *, images: str | Path | None = None) -> list[EvalItem]:
    """Items of ``path`` in whichever supported format it is (by extension and content).

    Raises:
        InputError: the file is missing or in no supported format.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"dataset {p} not found")
    if p.suffix == ".jsonl":
        return load_jsonl(p)
    try:
        rows = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"{p} is neither JSONL nor JSON ({exc})") from None
    if isinstance(rows, list) and rows and isinstance(rows[0], dict):
        if "image_name" in rows[0] and "qid" in rows[0]:
            return load_vqa_rad(p, images)
        if "img_name" in rows[0]:
            return load_slake(p, images)
        if "question_answer" in rows[0] and "filename" in rows[0]:
            return load_mirp(p, images)
    raise InputError(
        f"{p}: not a format medloupe reads (generic JSONL, VQA-RAD JSON, SLAKE question JSON "
        "or MIRP QA JSON); see the README's evaluation section"
    )


def filter_items(
    items: Iterable[EvalItem],
    *,
    modality: str | None = None,
    task: str | None = None,
    limit: int | None = None,
) -> list[EvalItem]:
    """Items whose modality contains ``modality`` (case-insensitive) and whose task is
    ``task``, the first ``limit`` of them."""
    out = [
        i
        for i in items
        if (modality is None or modality.lower() in i.modality.lower())
        and (task is None or i.task == task)
    ]
    return out[:limit] if limit is not None else out


def _check_unique(items: list[EvalItem], path: Path) -> None:
    seen: set[str] = set()
    for item in items:
        if item.id in seen:
            raise InputError(f"{path}: item id {item.id!r} appears twice")
        seen.add(item.id)
