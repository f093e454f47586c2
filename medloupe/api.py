"""Python API: one call from an image file and a question to a grounded answer."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from medloupe.config import Settings
from medloupe.io import load_image
from medloupe.runner import ReviewCallback, Run, create_run, execute
from medloupe.schemas import GroundedAnswer
from medloupe.tools.registry import ToolRegistry

T = TypeVar("T")


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
    from medloupe.agents.protocol import load_backend, resolve_vlm

    vlm, vlm_default = resolve_vlm(vlm)
    if vlm:
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
        vlm_default=vlm_default,
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
    registry: ToolRegistry | None = None,
    **options: Any,
) -> GroundedAnswer:
    """Async :func:`ask`."""
    settings = settings or Settings.from_env()
    run = prepare_run(image, question, settings=settings, out=out, vlm=vlm, kb=kb, options=options)
    return await execute(run, settings=settings, review=review, registry=registry)


def ask(
    image: str | Path,
    question: str,
    *,
    out: str | Path | None = None,
    vlm: str | None = None,
    kb: str | None = None,
    settings: Settings | None = None,
    registry: ToolRegistry | None = None,
    **options: Any,
) -> GroundedAnswer:
    """Answer ``question`` about ``image``; writes a run directory (``out`` or under
    ``$MEDLOUPE_HOME/runs``) with ``answer.json``, ``trace.json`` and ``overlay.png``.

    ``vlm``: a backend spec; ``None`` uses ``$MEDLOUPE_VLM``, else medloupe-mini shipped in the
    package (the answer's provenance says so); ``"none"``: no VLM, the evidence-only path.
    ``registry``: the tools the run may use (default: built-ins, expert tools and the
    ``medloupe.tools`` entry points). Options: ``max_steps``, ``time_budget_s``,
    ``confidence_threshold``, ``rethink``, ``frame``, ``slice_index``, ``axis``, ``modality``.
    """
    return run_sync(
        ask_async(
            image,
            question,
            out=out,
            vlm=vlm,
            kb=kb,
            settings=settings,
            registry=registry,
            **options,
        )
    )


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion from synchronous code, also where an event loop is already
    running in this thread (Jupyter, IPython): then on a fresh loop in a worker thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="medloupe-ask") as pool:
        return pool.submit(asyncio.run, coro).result()
