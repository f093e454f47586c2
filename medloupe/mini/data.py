"""Training data of medloupe-mini: VQA-RAD's train split and SLAKE's English train split only.

Never a test split. Every image that the development set (``dev.jsonl``) uses is left out, so
dev numbers stay honest (dev's VQA-RAD items come from VQA-RAD's train split). A held-out
tenth of the training *images* (not questions) chooses epochs and the calibration temperature.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from medloupe.text import canonical, is_closed


@dataclass(frozen=True)
class Example:
    """One training question: image path, question, canonical answer, answer type, source, and
    the body region the dataset states for the image (a value of
    :data:`medloupe.mini.attributes.ANSWERS` ``["region"]``, ``None`` where it states none)."""

    image: str
    question: str
    answer: str
    closed: bool
    source: str
    region: str | None = None


# the datasets' own region fields -> region values
VQA_RAD_REGIONS = {"HEAD": "head", "CHEST": "chest", "ABD": "abdomen"}
SLAKE_REGIONS = {
    "Brain": "head",
    "Brain_Tissue": "head",
    "Brain_Face": "head",
    "Neck": "neck",
    "Lung": "chest",
    "Chest_lung": "chest",
    "Chest_heart": "chest",
    "Chest_mediastinal": "chest",
    "Abdomen": "abdomen",
    "Pelvic Cavity": "pelvis",
}


def answer_key(answer: str) -> str:
    """The class an answer trains as: its canonical form (yes/no, numbers, sides folded)."""
    return canonical(answer.strip())


def dev_images(datasets: Path) -> set[str]:
    """Resolved paths of every image ``dev.jsonl`` uses."""
    dev = datasets / "dev.jsonl"
    if not dev.is_file():
        return set()
    return {
        str((datasets / json.loads(line)["image"]).resolve())
        for line in dev.read_text(encoding="utf-8").splitlines()
        if line.strip()
    }


def training_examples(datasets: str | Path) -> list[Example]:
    """Examples from ``datasets/vqa_rad/trainset.json`` and ``datasets/slake/splits/train.json``
    (English), minus dev images.

    Raises:
        FileNotFoundError: a training file is missing (named).
    """
    root = Path(datasets)
    excluded = dev_images(root)
    out: list[Example] = []
    rad_file = root / "vqa_rad" / "trainset.json"
    slake_file = root / "slake" / "splits" / "train.json"
    for f in (rad_file, slake_file):
        if not f.is_file():
            raise FileNotFoundError(f"training file {f} is missing (see ../shared/README)")
    for row in json.loads(rad_file.read_text(encoding="utf-8")):
        image = str((root / "vqa_rad" / "images" / row["image_name"]).resolve())
        if image in excluded:
            continue
        closed = is_closed(row.get("answer_type"))
        region = VQA_RAD_REGIONS.get(str(row.get("image_organ", "")).strip().upper())
        out.append(
            Example(
                image, row["question"], answer_key(str(row["answer"])), closed, "vqa_rad", region
            )
        )
    for row in json.loads(slake_file.read_text(encoding="utf-8")):
        if row.get("q_lang") != "en":
            continue
        image = str((root / "slake" / "imgs" / row["img_name"]).resolve())
        if image in excluded:
            continue
        closed = is_closed(row.get("answer_type"))
        region = SLAKE_REGIONS.get(str(row.get("location", "")))
        out.append(
            Example(
                image, row["question"], answer_key(str(row["answer"])), closed, "slake", region
            )
        )
    return out


T = TypeVar("T")


def every_kth(items: list[T], at_most: int | None) -> list[T]:
    """``items``, or every k-th of them so that at most ``at_most`` remain (quick training runs
    and tests; ``None`` keeps all)."""
    if at_most is None or len(items) <= at_most:
        return items
    return items[:: -(-len(items) // at_most)]


def held_out(image: str, fraction: float = 0.1) -> bool:
    """Whether an image belongs to the held-out part (a stable hash of its path's name)."""
    p = Path(image)
    h = int(hashlib.sha256(f"{p.parent.name}/{p.name}".encode()).hexdigest()[:8], 16)
    return (h % 1000) < fraction * 1000


def fold(image: str, folds: int) -> int:
    """The cross-validation fold of an image, in ``[0, folds)`` (a stable hash of its path's
    name, independent of :func:`held_out`'s)."""
    p = Path(image)
    return int(hashlib.sha256(f"{p.parent.name}/{p.name}".encode()).hexdigest()[8:16], 16) % folds


@dataclass(frozen=True)
class BoxExample:
    """One grounding target: image path, size, label, modality, its boxes (XYXY pixels)."""

    image: str
    width: int
    height: int
    label: str
    modality: str
    boxes: tuple[tuple[float, float, float, float], ...]
    source: str


def split_images(file: Path) -> dict[str, str]:
    """Image folder name -> modality, for every question of a SLAKE split file."""
    return {
        row["img_name"].split("/")[0]: row["modality"]
        for row in json.loads(file.read_text(encoding="utf-8"))
    }


def grounding_examples(datasets: str | Path) -> list[BoxExample]:
    """Boxes to train the grounder on: SLAKE detection labels of train-split images, NIH
    ChestX-ray14 radiologist boxes, BCCD white cells of its train list. Left out: every image
    that SLAKE's test split or BCCD's test list uses (SLAKE's splits share images), and every
    image ``dev.jsonl`` uses.

    Raises:
        FileNotFoundError: a source file is missing (named).
    """
    import xml.etree.ElementTree as ET

    from PIL import Image

    root = Path(datasets)
    excluded = dev_images(root)
    slake = root / "slake"
    for f in (slake / "splits" / "train.json", slake / "splits" / "test.json"):
        if not f.is_file():
            raise FileNotFoundError(f"grounding data {f} is missing (see ../shared/README)")
    train = split_images(slake / "splits" / "train.json")
    test = set(split_images(slake / "splits" / "test.json"))
    out: list[BoxExample] = []
    for name, modality in sorted(train.items()):
        folder = slake / "imgs" / name
        image = str((folder / "source.jpg").resolve())
        if name in test or image in excluded or not (folder / "detection.json").is_file():
            continue
        with Image.open(image) as im:
            w, h = im.size
        grouped: dict[str, list[tuple[float, float, float, float]]] = {}
        for entry in json.loads((folder / "detection.json").read_text(encoding="utf-8")):
            for label, (x, y, bw, bh) in entry.items():
                grouped.setdefault(label, []).append((x, y, x + bw, y + bh))
        for label, boxes in sorted(grouped.items()):
            out.append(BoxExample(image, w, h, label, modality, tuple(boxes), "slake"))
    nih = root / "nih_cxr14_sample" / "labels.json"
    if nih.is_file():
        for row in json.loads(nih.read_text(encoding="utf-8")):
            image = str((nih.parent / row["image"]).resolve())
            if image in excluded or not row.get("bboxes_1024"):
                continue
            grouped = {}
            for b in row["bboxes_1024"]:
                x, y, bw, bh = b["xywh"]
                grouped.setdefault(b["label"], []).append((x, y, x + bw, y + bh))
            for label, boxes in sorted(grouped.items()):
                out.append(BoxExample(image, 1024, 1024, label, "X-Ray", tuple(boxes), "nih"))
    bccd = root / "bccd" / "BCCD"
    lists = bccd / "ImageSets" / "Main"
    if (lists / "train.txt").is_file():
        test_ids = (
            set((lists / "test.txt").read_text().split())
            if (lists / "test.txt").is_file()
            else set()
        )
        for stem in (lists / "train.txt").read_text().split():
            image = str((bccd / "JPEGImages" / f"{stem}.jpg").resolve())
            ann = bccd / "Annotations" / f"{stem}.xml"
            if stem in test_ids or image in excluded or not ann.is_file():
                continue
            tree = ET.parse(ann).getroot()
            w = int(tree.findtext("size/width") or 0)
            h = int(tree.findtext("size/height") or 0)
            wbc = [
                tuple(
                    float(o.findtext(f"bndbox/{k}") or 0) for k in ("xmin", "ymin", "xmax", "ymax")
                )
                for o in tree.iter("object")
                if o.findtext("name") == "WBC"
            ]
            if wbc and w and h:
                out.append(
                    BoxExample(image, w, h, "White Blood Cell", "microscopy", tuple(wbc), "bccd")  # type: ignore[arg-type]
                )
    return out
