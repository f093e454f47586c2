"""Python API: one call from an image file and a question to a grounded answer."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from medloupe.config import Settings
from medloupe.graphs.context import (
    Resources,
    load_resources,
    resolve_resources,
    shared_resources,
)
from medloupe.io.intake import read_input
from medloupe.options import RunOptions
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
    options: RunOptions | dict[str, Any] | None = None,
    registry: ToolRegistry | None = None,
) -> tuple[Run, Resources]:
    """Read the image (raising a typed error on bad input, before anything is written), load
    the backend and knowledge base (a bad spec or KB fails here too), then create the run
    directory. Returns the run and the resources it runs with.

    ``registry``: the tools (default: the shared default registry).
    """
    opts = RunOptions.of(options)
    loaded = read_input(image, opts, settings.max_pixels)
    spec = resolve_resources(vlm, kb, settings)
    resources = (
        shared_resources(spec) if registry is None else load_resources(spec, registry=registry)
    )
    run = create_run(
        loaded,
        question,
        settings=settings,
        out_dir=Path(out) if out else None,
        options=opts,
        resources=spec,
    )
    return run, resources


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
    run, resources = await asyncio.to_thread(
        prepare_run,
        image,
        question,
        settings=settings,
        out=out,
        vlm=vlm,
        kb=kb,
        options=options,
        registry=registry,
    )
    return await execute(run, settings=settings, resources=resources, review=review)


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
    """Answer ``question`` about ``image``; writes a run directory (``out`` or under the
    settings' ``home``/runs) with ``answer.json``, ``trace.json`` and ``overlay.png``.

    ``vlm``: a backend spec; ``None`` uses ``Settings.vlm``, else medloupe-mini shipped in the
    package (the answer's provenance says so); ``"none"``: no VLM, the evidence-only path.
    ``kb``: a knowledge-base folder or ``"default"``.
    ``registry``: the tools the run may use (default: built-ins, expert tools and the
    ``medloupe.tools`` entry points). ``options``: the fields of
    :class:`~medloupe.options.RunOptions` (``max_steps``, ``time_budget_s``,
    ``confidence_threshold``, ``rethink``, ``frame``, ``slice_index``, ``axis``,
    ``modality``).
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
