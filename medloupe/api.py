"""Python API: one call from an image file and a question to a grounded answer."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from medloupe.config import Settings
from medloupe.io import load_image
from medloupe.runner import ReviewCallback, Run, create_run, execute
from medloupe.schemas import GroundedAnswer


def prepare_run(
    image: str | Path,
    question: str,
    *,
    settings: Settings,
    out: str | Path | None = None,
    vlm: str | None = None,
    kb: str | None = None,
    options: dict[str, Any] | None = None,
) -> Run:
    """Read the image (raising a typed error on bad input, before anything is written),
    validate the backend spec and knowledge base, then create the run directory."""
    opts = dict(options or {})
    loaded = load_image(
        image,
        frame=opts.get("frame"),
        slice_index=opts.get("slice_index"),
        axis=opts.get("axis", 2),
        modality=opts.get("modality"),
        max_pixels=settings.max_pixels,
    )
    if vlm:
        from medloupe.agents.protocol import load_backend

        load_backend(vlm)  # fail on a bad spec before writing anything
    if kb:
        from medloupe.knowledge_base import open_knowledge_base

        open_knowledge_base(kb).close()  # fail on a bad KB before writing anything
    return create_run(
        loaded,
        question,
        settings=settings,
        out_dir=Path(out) if out else None,
        options=opts,
        vlm_spec=vlm,
        kb_path=(kb if kb == "default" else str(Path(kb).resolve())) if kb else None,
    )


async def ask_async(
    image: str | Path,
    question: str,
    *,
    out: str | Path | None = None,
    vlm: str | None = None,
    kb: str | None = None,
    settings: Settings | None = None,
    review: ReviewCallback | None = None,
    **options: Any,
) -> GroundedAnswer:
    """Async :func:`ask`."""
    settings = settings or Settings.from_env()
    run = prepare_run(image, question, settings=settings, out=out, vlm=vlm, kb=kb, options=options)
    return await execute(run, settings=settings, review=review)


def ask(
    image: str | Path,
    question: str,
    *,
    out: str | Path | None = None,
    vlm: str | None = None,
    kb: str | None = None,
    settings: Settings | None = None,
    **options: Any,
) -> GroundedAnswer:
    """Answer ``question`` about ``image``; writes a run directory (``out`` or under
    ``$MEDLOUPE_HOME/runs``) with ``answer.json``, ``trace.json`` and ``overlay.png``.

    Options: ``max_steps``, ``time_budget_s``, ``confidence_threshold``, ``frame``,
    ``slice_index``, ``axis``, ``modality``.
    """
    return asyncio.run(
        ask_async(image, question, out=out, vlm=vlm, kb=kb, settings=settings, **options)
    )
