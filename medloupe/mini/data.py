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

from medloupe.evaluation.data import is_closed
from medloupe.evaluation.scoring import canonical


@dataclass(frozen=True)
class Example:
    """One training question: image path, question, canonical answer, answer type, source."""

    image: str
    question: str
    answer: str
    closed: bool
    source: str


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
        out.append(
            Example(image, row["question"], answer_key(str(row["answer"])), closed, "vqa_rad")
        )
    for row in json.loads(slake_file.read_text(encoding="utf-8")):
        if row.get("q_lang") != "en":
            continue
        image = str((root / "slake" / "imgs" / row["img_name"]).resolve())
        if image in excluded:
            continue
        closed = is_closed(row.get("answer_type"))
        out.append(Example(image, row["question"], answer_key(str(row["answer"])), closed, "slake"))
    return out


def held_out(image: str, fraction: float = 0.1) -> bool:
    """Whether an image belongs to the held-out part (a stable hash of its path's name)."""
    p = Path(image)
    h = int(hashlib.sha256(f"{p.parent.name}/{p.name}".encode()).hexdigest()[:8], 16)
    return (h % 1000) < fraction * 1000
