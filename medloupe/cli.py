"""The ``medloupe`` command line (typer + rich). Heavy modules are imported inside commands."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from medloupe.options import MAX_STEPS, MAX_TIME_BUDGET_S

if TYPE_CHECKING:
    from medloupe.config import Settings
    from medloupe.graphs.context import Resources
    from medloupe.runner import Run
    from medloupe.schemas import GroundedAnswer
    from medloupe.trace import TraceEvent

app = typer.Typer(
    name="medloupe",
    help="Grounded, traced answers to diagnostic questions about medical images. "
    "Research tool, not a medical device.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
tools_app = typer.Typer(help="List and describe the registered tools.", no_args_is_help=True)
runs_app = typer.Typer(help="Runs recorded under MEDLOUPE_HOME.", no_args_is_help=True)
trace_app = typer.Typer(help="Show or export a run's trace.", no_args_is_help=True)
kb_app = typer.Typer(
    help="Knowledge bases: build from textbooks, search, inspect.", no_args_is_help=True
)
app.add_typer(tools_app, name="tools")
app.add_typer(kb_app, name="kb")
app.add_typer(runs_app, name="runs")
app.add_typer(trace_app, name="trace")
mcp_app = typer.Typer(help="medloupe over the Model Context Protocol.", no_args_is_help=True)
app.add_typer(mcp_app, name="mcp")

out_console = Console()
err_console = Console(stderr=True)
log = logging.getLogger("medloupe")

DEMO_QUESTION = "What imaging modality and body part is this, and how large is the image?"
# demo --all: a question whose answer needs looking (locate the lung, zoom in, judge it)
DEMO_LOOK_QUESTION = "Does the right lung look normal?"
# --vlm of ask, demo and eval
VlmOption = Annotated[
    str | None,
    typer.Option(
        help="VLM spec, e.g. openai:URL#MODEL (default: MEDLOUPE_VLM, else the shipped "
        "medloupe-mini; 'none': no VLM)"
    ),
]


# control characters (C0, C1, DEL) and bidirectional overrides: never sent to a terminal raw
_UNSAFE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def shown(value: object) -> str:
    """Text from a run, a file, a model or a plugin, safe to print: control characters shown
    as ``\\xNN`` escapes (no screen clears or fake colours) and rich markup escaped (a
    ``[/x]`` in a question prints as such instead of ending a style)."""
    text = _UNSAFE.sub(lambda m: ascii(m.group())[1:-1], str(value))
    return escape(text)


def _settings() -> Settings:
    from medloupe.config import Settings

    try:
        return Settings.from_env()
    except ValueError as exc:
        err_console.print(f"[red]error:[/red] {shown(exc)}")
        raise typer.Exit(2) from None


def _fail(exc: BaseException) -> typer.Exit:
    from medloupe.errors import InputError

    code = 2 if isinstance(exc, InputError) else 1
    err_console.print(f"[red]error:[/red] {shown(exc)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _progress(event: TraceEvent) -> None:
    if event.kind == "node_start":
        err_console.print(f"[dim]>[/dim] {shown(event.node)}", highlight=False)
    elif event.kind == "tool_call":
        mark = "[green]ok[/green]" if event.status == "ok" else "[red]error[/red]"
        detail = event.payload.get("summary") or event.payload.get("error") or ""
        err_console.print(
            f"    tool {shown(event.name)} {mark} {event.duration_ms or 0:.0f} ms  "
            f"[dim]{shown(detail[:110])}[/dim]",
            highlight=False,
        )
    elif event.kind == "model_call":
        err_console.print(
            f"    model {shown(event.name)} {event.duration_ms or 0:.0f} ms", highlight=False
        )
    elif event.kind == "rethink_round":
        p = event.payload
        err_console.print(
            f"    rethink round {p.get('round')}: {len(p.get('crops', []))} crop(s), "
            f"confidence {p.get('confidence_before', 0):.2f} -> {p.get('confidence_after', 0):.2f}",
            highlight=False,
        )
    elif event.kind == "node_error":
        err_console.print(
            f"[red]  {shown(event.node)} failed: {shown(event.payload.get('error'))}[/red]",
            highlight=False,
        )


def _review_in_terminal(payload: dict[str, Any]) -> dict[str, Any]:
    err_console.print("[bold]Plan for review[/bold]")
    if payload.get("problem"):
        err_console.print(
            f"[red]previous edit rejected:[/red] {shown(payload['problem'])}", highlight=False
        )
    err_console.print_json(json.dumps(payload["plan"]))
    choice = (
        typer.prompt("approve [a], edit [e] or reject [r]", default="a", err=True).strip().lower()
    )
    if choice.startswith("r"):
        return {"action": "reject"}
    if choice.startswith("e"):
        raw = typer.prompt("plan as JSON (one line)", err=True)
        try:
            return {"action": "edit", "plan": json.loads(raw)}
        except json.JSONDecodeError as exc:
            return {"action": "edit", "plan": {"calls": "invalid JSON: " + exc.msg}}
    return {"action": "approve"}


def _print_answer(answer: GroundedAnswer, run: Run) -> None:
    from rich.panel import Panel

    if answer.abstained:
        body = f"[yellow]Abstained:[/yellow] {shown(answer.abstention_reason)}"
    else:
        body = f"[bold]{shown(answer.short_answer)}[/bold]\n{shown(answer.explanation)}"
    body += f"\nconfidence {answer.confidence:.2f}"
    for claim in answer.claims:
        body += f"\n  - {shown(claim.text)} [dim]({shown(', '.join(claim.evidence_ids))})[/dim]"
    for i, region in enumerate(answer.regions, 1):
        box = ", ".join(f"{v:.0f}" for v in region.box_xyxy)
        source = region.tool or "the model's own look"
        body += f"\n  region {i}: {shown(region.label)} \\[{box}] from {shown(source)}"
    for c in answer.citations:
        body += f"\n  cites {shown(c.document)}{' - ' + shown(c.section) if c.section else ''}"
    prov = answer.provenance
    model = shown(prov.vlm or "none (evidence only)")
    if prov.vlm_default:
        model += " - medloupe-mini, the default (no VLM configured; --vlm to choose one)"
    body += f"\n[dim]model: {model}; answer from {shown(prov.answer_source)}[/dim]"
    body += f"\n[dim]{shown(answer.disclaimer)}[/dim]"
    out_console.print(
        Panel(body, title=f"medloupe - {shown(run.run_id)}", subtitle=shown(run.dir)),
        highlight=False,
    )


def _run_and_report(
    run: Run,
    settings: Settings,
    *,
    resources: Resources | None = None,
    as_json: bool,
    resume: bool = False,
    emit_json: bool = True,
) -> dict[str, Any]:
    """Run to the answer with progress on stderr; print it (JSON when ``as_json``, unless
    not ``emit_json``: the caller prints) and return it as JSON data."""
    from medloupe.errors import MedloupeError
    from medloupe.runner import execute

    try:
        answer = asyncio.run(
            execute(
                run,
                settings=settings,
                resources=resources,
                resume=resume,
                review=_review_in_terminal,
                on_event=None if as_json else _progress,
            )
        )
    except MedloupeError as exc:
        err_console.print(f"[dim]trace kept in {shown(run.dir / 'trace.json')}[/dim]")
        raise _fail(exc) from None
    except KeyboardInterrupt:
        err_console.print(
            f"[yellow]interrupted[/yellow]; continue from the last checkpoint with "
            f"`medloupe resume {shown(run.run_id)}` (trace in {shown(run.dir / 'trace.json')})"
        )
        raise typer.Exit(130) from None
    doc = {"run_id": run.run_id, "run_dir": str(run.dir), **answer.model_dump(mode="json")}
    if as_json and emit_json:
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    elif not as_json:
        _print_answer(answer, run)
    return doc


@app.command()
def ask(
    image: Annotated[Path, typer.Argument(help="PNG/JPEG/TIFF, DICOM or NIfTI file")],
    question: Annotated[str, typer.Argument(help="free-form question about the image")],
    as_json: Annotated[bool, typer.Option("--json", help="print the answer as JSON")] = False,
    out: Annotated[
        Path | None, typer.Option(help="run directory (default under MEDLOUPE_HOME/runs)")
    ] = None,
    vlm: VlmOption = None,
    kb: Annotated[
        str | None,
        typer.Option(help="knowledge base to cite: a KB folder or 'default' (HPO + ICD-10-CM)"),
    ] = None,
    max_steps: Annotated[
        int, typer.Option(min=1, max=MAX_STEPS, help="plan-act-rethink rounds at most")
    ] = 2,
    time_budget: Annotated[
        float,
        typer.Option(min=1.0, max=MAX_TIME_BUDGET_S, help="seconds before no further round starts"),
    ] = 300.0,
    review_plan: Annotated[
        bool, typer.Option("--review-plan", help="pause after planning for approval")
    ] = False,
    frame: Annotated[
        int | None, typer.Option(min=0, help="DICOM frame / TIFF page / NIfTI volume")
    ] = None,
    slice_index: Annotated[
        int | None, typer.Option("--slice", min=0, help="NIfTI slice index")
    ] = None,
    axis: Annotated[
        int, typer.Option(min=0, max=2, help="NIfTI axis: 0 sagittal, 1 coronal, 2 axial")
    ] = 2,
    modality: Annotated[
        str | None, typer.Option(help="modality code (CT, MR, CR, ...) if the file has none")
    ] = None,
) -> None:
    """Answer a question about one image, with evidence, regions and a trace."""
    from medloupe.api import prepare_run
    from medloupe.errors import MedloupeError

    settings = _settings()
    options: dict[str, Any] = {
        "max_steps": max_steps,
        "time_budget_s": time_budget,
        "review_plan": review_plan,
        "axis": axis,
    }
    for key, value in (("frame", frame), ("slice_index", slice_index), ("modality", modality)):
        if value is not None:
            options[key] = value
    if kb == "default":
        _prepare_default_kb()
    try:
        run, resources = prepare_run(
            image, question, settings=settings, out=out, vlm=vlm, kb=kb, options=options
        )
    except MedloupeError as exc:
        raise _fail(exc) from None
    _run_and_report(run, settings, resources=resources, as_json=as_json)


def _prepare_default_kb() -> None:
    """Build the default KB with a progress bar if this is its first use."""
    from medloupe.errors import MedloupeError
    from medloupe.knowledge_base.default import default_kb, default_kb_ready

    if default_kb_ready():
        return
    err_console.print(
        "[dim]first use: building the default knowledge base from HPO and ICD-10-CM "
        "(about a minute, cached afterwards)[/dim]"
    )
    try:
        with _progress_bars() as progress:
            default_kb(on_progress=progress).close()
    except MedloupeError as exc:
        raise _fail(exc) from None


class _progress_bars:
    """Rich progress bars fed by ``on_progress(stage, done, total)`` callbacks."""

    def __enter__(self) -> _progress_bars:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

        self._progress = Progress(
            "{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err_console,
            transient=False,
        )
        self._tasks: dict[str, Any] = {}
        self._progress.__enter__()
        return self

    def __call__(self, stage: str, done: int, total: int) -> None:
        labels = {"load": "reading sources", "embed": "embedding text", "figures": "figures"}
        if stage not in self._tasks:
            self._tasks[stage] = self._progress.add_task(
                labels.get(stage, stage), total=total or None
            )
        self._progress.update(self._tasks[stage], completed=done, total=total or None)

    def __exit__(self, *exc: object) -> None:
        self._progress.__exit__(None, None, None)


def demo_image() -> Path:
    """The bundled sample: a real chest radiograph (CR) from ``pydicom-data``."""
    import data_store

    path = Path(data_store.__file__).parent / "data" / "RG1_UNCR.dcm"
    if not path.is_file():
        raise FileNotFoundError(f"the demo image {path} is missing; reinstall pydicom-data")
    return path


@app.command()
def demo(
    as_json: Annotated[bool, typer.Option("--json", help="print the answer as JSON")] = False,
    out: Annotated[Path | None, typer.Option(help="run directory")] = None,
    vlm: VlmOption = None,
    kb: Annotated[
        str,
        typer.Option(help="knowledge base to cite; 'default' (HPO + ICD-10-CM) or 'none'"),
    ] = "default",
    all_questions: Annotated[
        bool,
        typer.Option(
            "--all",
            help=f"also ask {DEMO_LOOK_QUESTION!r}: the grounder finds the lung, the second "
            "look zooms into it (--json: a list of both answers; --out: the second run in "
            "OUT/look)",
        ),
    ] = False,
) -> None:
    """Ask a question about a bundled real chest radiograph (no network, no GPU)."""
    from medloupe.api import prepare_run
    from medloupe.errors import MedloupeError

    settings = _settings()
    image = demo_image()
    use_kb = None if kb == "none" else kb
    if use_kb == "default":
        _prepare_default_kb()
    asked = [(DEMO_QUESTION, out)]
    if all_questions:
        asked.append((DEMO_LOOK_QUESTION, out / "look" if out else None))
    docs = []
    for question, run_out in asked:
        err_console.print(
            f"[dim]demo image: {image.name} (pydicom-data); question: {question}[/dim]"
        )
        try:
            run, resources = prepare_run(
                image, question, settings=settings, out=run_out, vlm=vlm, kb=use_kb
            )
        except MedloupeError as exc:
            raise _fail(exc) from None
        docs.append(
            _run_and_report(
                run, settings, resources=resources, as_json=as_json, emit_json=not all_questions
            )
        )
    if as_json and all_questions:
        sys.stdout.write(json.dumps(docs, indent=2) + "\n")


@app.command()
def resume(
    run_id: Annotated[str, typer.Argument(help="run id or run directory")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Resume an interrupted run from its last checkpoint."""
    from medloupe.errors import MedloupeError
    from medloupe.runner import find_run

    settings = _settings()
    try:
        run = find_run(run_id, settings)
    except MedloupeError as exc:
        raise _fail(exc) from None
    _run_and_report(run, settings, as_json=as_json, resume=True)


@app.command("serve")
def serve_api(
    host: Annotated[str, typer.Option(help="interface to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port")] = 8080,
    workers: Annotated[int, typer.Option(min=1, help="runs executing at once")] = 2,
    queue: Annotated[int, typer.Option(min=0, help="accepted runs waiting for a worker")] = 16,
    vlm: Annotated[
        str | None,
        typer.Option(
            help="VLM spec for every run (default: MEDLOUPE_VLM, else medloupe-mini; 'none': "
            "no VLM)"
        ),
    ] = None,
    kb: Annotated[str | None, typer.Option(help="knowledge base: 'default' or a folder")] = None,
    lease: Annotated[
        float | None,
        typer.Option(
            min=1.0,
            help="seconds a killed replica's runs wait before another replica takes them over "
            "(default 20)",
        ),
    ] = None,
) -> None:
    """Serve the HTTP API: runs with streamed steps, traces, artifacts, review pages.

    Runs are kept under MEDLOUPE_HOME and survive a restart (unfinished runs are resumed).
    With MEDLOUPE_DATABASE_URL (PostgreSQL), several replicas share the runs. A non-loopback
    --host requires MEDLOUPE_API_TOKEN. OpenAPI docs at /docs.
    """

    from medloupe.errors import MedloupeError
    from medloupe.service import serve

    try:
        serve(
            host,
            port,
            workers=workers,
            queue_size=queue,
            vlm=vlm,
            kb=kb,
            lease_s=lease,
            settings=_settings(),
        )
    except MedloupeError as exc:
        raise _fail(exc) from None


@mcp_app.command("serve")
def mcp_serve(
    transport: Annotated[
        str, typer.Option(help="stdio (a client starts this command) or http (streamable HTTP)")
    ] = "stdio",
    host: Annotated[str, typer.Option(help="interface to bind (http)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port (http)")] = 8765,
    root: Annotated[
        list[Path] | None,
        typer.Option(
            help="folder image_path may read from (repeatable; default: MEDLOUPE_MCP_ROOTS, "
            "else the working directory)"
        ),
    ] = None,
    vlm: VlmOption = None,
    kb: Annotated[
        str | None, typer.Option(help="knowledge base of diagnose: 'default' or a folder")
    ] = None,
) -> None:
    """Serve every available tool and `diagnose` (the whole workflow) to MCP clients.

    The http transport serves http://HOST:PORT/mcp; a non-loopback --host requires
    MEDLOUPE_API_TOKEN (clients send Authorization: Bearer <token>).
    """
    from medloupe.errors import InputError, MedloupeError
    from medloupe.service.mcp import serve_mcp

    if transport not in ("stdio", "http"):
        raise _fail(InputError(f"--transport {transport!r}: use stdio or http"))
    try:
        serve_mcp(
            "stdio" if transport == "stdio" else "http",
            host=host,
            port=port,
            roots=root or None,
            vlm=vlm,
            kb=kb,
            settings=_settings(),
        )
    except MedloupeError as exc:
        raise _fail(exc) from None


@app.command("serve-vlm")
def serve_vlm(
    model: Annotated[
        str,
        typer.Argument(
            help="mini (medloupe-mini, shipped), hf:HUB_ID, hf:/path/to/model, a bare hub id "
            "or folder, or any spec"
        ),
    ],
    host: Annotated[str, typer.Option(help="interface to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port")] = 8000,
    served_name: Annotated[
        str | None, typer.Option(help="model name clients use (default: folder name or hub id)")
    ] = None,
) -> None:
    """Serve a VLM behind an OpenAI-compatible /v1/chat/completions and /v1/models."""
    from medloupe.agents.protocol import backend_schemes, load_backend
    from medloupe.agents.server import default_served_name, serve
    from medloupe.errors import MedloupeError

    # a spec, or a bare scheme ("mini": the model shipped in the package); else a hub id/folder
    is_spec = ":" in model.split("/")[0] or model in backend_schemes()
    spec = model if is_spec else f"hf:{model}"
    try:
        backend = load_backend(spec)
        backend.load()  # fail now, with the reason, rather than on the first request
    except MedloupeError as exc:
        raise _fail(exc) from None
    target = spec.partition(":")[2]
    name = served_name or (default_served_name(target) if target else "medloupe-mini")
    err_console.print(
        f"serving {shown(spec)} as [bold]{shown(name)}[/bold] at http://{shown(host)}:{port}/v1 "
        f"(use --vlm openai:http://{shown(host)}:{port}/v1#{shown(name)})"
    )
    serve(backend, host=host, port=port, served_name=name)


@app.command("tiny-vlm")
def tiny_vlm(
    path: Annotated[Path, typer.Argument(help="folder to write the model to")],
    seed: Annotated[int, typer.Option(help="seed of the random weights")] = 0,
) -> None:
    """Write a tiny random-weight Qwen2.5-VL (for smoke tests of serving; it answers noise)."""
    from medloupe.testing.tiny_model import build_tiny_qwen2_5_vl

    out = build_tiny_qwen2_5_vl(path, seed=seed)
    err_console.print(f"tiny Qwen2.5-VL (random weights) written to {shown(out)}")


@tools_app.command("list")
def tools_list(
    as_json: Annotated[
        bool, typer.Option("--json", help="every field (and the descriptions) as JSON")
    ] = False,
) -> None:
    """Every registered tool: ready or not and why, the modalities it is for, where it
    comes from (``medloupe tools describe NAME`` for its description and schemas)."""
    from rich import box
    from rich.table import Table

    from medloupe.errors import MedloupeError
    from medloupe.tools import default_registry

    try:
        registry = default_registry()
    except MedloupeError as exc:
        raise _fail(exc) from None
    rows: list[dict[str, Any]] = []
    for t in registry:
        a = t.available()
        rows.append(
            {
                "name": t.name,
                "available": a.ok,
                "reason": a.reason,
                "modalities": sorted(t.modalities) if t.modalities else None,
                "origin": registry.origin(t.name),
                "description": t.description,
            }
        )
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
    else:
        table = Table("tool", "ready", "for", "why", box=box.SIMPLE_HEAD, pad_edge=False)
        for r in rows:
            why = r["reason"] if r["origin"] == "medloupe" else f"{r['reason']} ({r['origin']})"
            table.add_row(
                shown(r["name"]),
                "[green]yes[/green]" if r["available"] else "[red]no[/red]",
                shown(", ".join(r["modalities"]) if r["modalities"] else "any"),
                shown(why),
            )
        out_console.print(table)
    for p in registry.problems:
        source = f" ({shown(p.distribution)})" if p.distribution else ""
        err_console.print(
            f"[red]not loaded:[/red] {shown(p.entry_point)}{source}: {shown(p.error)}"
        )


@tools_app.command("describe")
def tools_describe(name: Annotated[str, typer.Argument(help="tool name")]) -> None:
    """Print a tool's JSON schemas (input and output)."""
    from medloupe.errors import MedloupeError
    from medloupe.tools import default_registry

    try:
        tool = default_registry().get(name)
    except MedloupeError as exc:
        raise _fail(exc) from None
    sys.stdout.write(json.dumps(tool.describe(), indent=2) + "\n")


@app.command("eval")
def eval_(
    dataset: Annotated[
        Path, typer.Argument(help="generic JSONL (like dev.jsonl), VQA-RAD JSON or SLAKE JSON")
    ],
    out: Annotated[Path, typer.Option(help="output folder (a re-run resumes it)")],
    vlm: VlmOption = None,
    kb: Annotated[
        str | None, typer.Option(help="knowledge base: a KB folder or 'default'; none by default")
    ] = None,
    images: Annotated[
        Path | None, typer.Option(help="image folder for VQA-RAD / SLAKE files")
    ] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="first N items (after filters)")] = None,
    workers: Annotated[int, typer.Option(min=1, max=64, help="items in flight at once")] = 1,
    modality: Annotated[
        str | None, typer.Option(help="only items whose modality contains this")
    ] = None,
    task: Annotated[
        str | None,
        typer.Option(
            help="only this task: vqa, grounding, classification, count, relative_position"
        ),
    ] = None,
    no_tools: Annotated[bool, typer.Option("--no-tools", help="ablation: no tool calls")] = False,
    no_retrieval: Annotated[
        bool, typer.Option("--no-retrieval", help="ablation: no knowledge-base retrieval")
    ] = False,
    no_rethink: Annotated[
        bool, typer.Option("--no-rethink", help="ablation: no second look at crops")
    ] = False,
    ablate: Annotated[
        bool,
        typer.Option(
            "--ablate",
            help="run full, --no-tools, --no-retrieval, --no-rethink; compare them item by item "
            "(McNemar p-values, bootstrap 95 % intervals)",
        ),
    ] = False,
    seed: Annotated[int, typer.Option(help="seed of the --ablate bootstrap")] = 0,
) -> None:
    """Evaluate on a dataset: each item a fresh run; metrics.json, items.jsonl, report.html."""
    import asyncio

    from medloupe.errors import MedloupeError
    from medloupe.evaluation import Ablation, Evaluation, filter_items, load_dataset, run_ablations
    from medloupe.evaluation.harness import comparison_table

    settings = _settings()
    try:
        items = filter_items(
            load_dataset(dataset, images=images), modality=modality, task=task, limit=limit
        )
    except MedloupeError as exc:
        raise _fail(exc) from None
    if not items:
        err_console.print("[red]error:[/red] no items left after the filters")
        raise typer.Exit(2)
    if kb and kb != "default" and not Path(kb).is_dir():
        err_console.print(f"[red]error:[/red] knowledge base {shown(kb)} not found")
        raise typer.Exit(2)
    from medloupe.agents.protocol import resolve_vlm

    common = {"vlm": resolve_vlm(vlm)[0], "kb": kb, "workers": workers, "settings": settings}
    if ablate:
        results = asyncio.run(
            run_ablations(items, out, seed=seed, **common)  # type: ignore[arg-type]
        )
        out_console.print(comparison_table(results))
        out_console.print((out / "paired.md").read_text(encoding="utf-8"))
        out_console.print(f"comparison written to {shown(out / 'comparison.md')}")
        return
    ablation = Ablation(tools=not no_tools, retrieval=not no_retrieval, rethink=not no_rethink)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    evaluation = Evaluation(out, ablation=ablation, **common)  # type: ignore[arg-type]
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
    ) as progress:
        bar = progress.add_task(f"evaluating ({ablation.name})", total=len(items))
        finished = {i.id for i in items} & _finished_ids(out / "items.jsonl")
        progress.update(bar, completed=len(finished))
        try:
            metrics = asyncio.run(evaluation.run(items, on_item=lambda _r: progress.advance(bar)))
        except MedloupeError as exc:
            raise _fail(exc) from None
    o = metrics["overall"]
    out_console.print(
        f"{o['items']} items: accuracy {_num(o['accuracy'])}, answered {o['answered']} "
        f"(accuracy {_num(o['accuracy_answered'])}), abstained {_num(o['abstention_rate'])}; "
        f"{shown(out / 'metrics.json')}, {shown(out / 'report.html')}"
    )


def _finished_ids(path: Path) -> set[str]:
    from medloupe.evaluation.harness import read_records

    return {r["id"] for r in read_records(path)}


def _num(v: object) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


train_app = typer.Typer(help="Train medloupe-mini's models on the public train splits.")
app.add_typer(train_app, name="train")


@train_app.command("mini")
def train_mini(
    data: Annotated[Path, typer.Option(help="the shared datasets folder (../shared/datasets)")],
    out: Annotated[Path, typer.Option(help="output folder for the checkpoints and the card")],
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    max_examples: Annotated[
        int | None, typer.Option(min=50, help="train on a subset (quick runs)")
    ] = None,
) -> None:
    """Train medloupe-mini (answerer and grounder) on the public train splits (VQA-RAD train,
    SLAKE English train, NIH ChestX-ray14 boxes, BCCD train; dev images and test splits out)."""
    from medloupe.mini.train import train_mini as train

    with _progress_bars() as progress:
        try:
            meta, grounder = train(
                data, out, seed=seed, max_examples=max_examples, on_progress=progress
            )
        except FileNotFoundError as exc:
            err_console.print(f"[red]error:[/red] {shown(exc)}")
            raise typer.Exit(2) from None
    held = meta["held_out"]
    out_console.print(
        f"answerer: {len(meta['vocab'])} answers, {meta['epochs']} epochs, held-out accuracy "
        f"{_num(held['accuracy_in_vocab'])} (closed {_num(held['closed_accuracy'])}), "
        f"temperature {meta['temperature']:.2f}, {meta['train_seconds']:.0f} s\n"
        f"grounder: {len(grounder['labels'])} targets, {grounder['epochs']} epochs, held-out "
        f"hit rate {_num(grounder['held_out']['hit_rate_iou50'])} (prior alone "
        f"{_num(grounder['held_out']['prior_only_hit_rate'])}), "
        f"{grounder['train_seconds']:.0f} s -> {out}"
    )


@app.command()
def schema(
    which: Annotated[str, typer.Argument(help="answer | trace | evidence | image")] = "answer",
) -> None:
    """Print the JSON schema of an output document."""
    from pydantic import BaseModel

    from medloupe.io.records import ImageRecord
    from medloupe.schemas import Evidence, GroundedAnswer
    from medloupe.trace import TraceDocument

    models: dict[str, type[BaseModel]] = {
        "answer": GroundedAnswer,
        "trace": TraceDocument,
        "evidence": Evidence,
        "image": ImageRecord,
    }
    if which not in models:
        err_console.print(
            f"[red]error:[/red] unknown schema {shown(repr(which))}; "
            f"choose from {', '.join(models)}"
        )
        raise typer.Exit(2)
    sys.stdout.write(json.dumps(models[which].model_json_schema(), indent=2) + "\n")


@runs_app.command("list")
def runs_list(limit: Annotated[int, typer.Option(min=1)] = 20) -> None:
    """Recent runs: id, status, question, answer."""
    from rich.table import Table

    from medloupe.errors import MedloupeError
    from medloupe.runner import RunIndex

    settings = _settings()
    try:
        rows = RunIndex(settings).list(limit)
    except MedloupeError as exc:
        raise _fail(exc) from None
    if not rows:
        err_console.print(f"no runs yet under {shown(settings.home)}")
        return
    table = Table("run", "status", "question", "answer", "dir")
    for r in rows:
        table.add_row(
            shown(r["run_id"]),
            shown(r["status"]),
            shown(r["question"] or ""),
            shown(r["answer"] or r["error"] or ""),
            shown(r["dir"]),
        )
    out_console.print(table)


@trace_app.command("show")
def trace_show(run_id: Annotated[str, typer.Argument(help="run id or run directory")]) -> None:
    """A terminal timeline of a run: nodes, tool calls, model calls, rethink rounds."""
    from rich.table import Table

    from medloupe.errors import MedloupeError
    from medloupe.runner import find_run
    from medloupe.trace import TraceRecorder

    settings = _settings()
    try:
        run = find_run(run_id, settings)
        rec = TraceRecorder(run.trace_path, settings=settings, run_id=run.run_id)
    except MedloupeError as exc:
        raise _fail(exc) from None
    try:
        events = rec.events()
    finally:
        rec.close()
    t0 = events[0].ts if events else 0.0
    table = Table(
        "t (s)",
        "event",
        "node",
        "name",
        "status",
        "ms",
        "detail",
        title=f"{shown(run.run_id)}: {shown(run.spec.question)}",
    )
    for e in events:
        detail = e.payload.get("summary") or e.payload.get("error") or e.payload.get("note") or ""
        if e.kind == "plan":
            detail = ", ".join(c["tool"] for c in e.payload.get("plan", {}).get("calls", []))
        elif e.kind == "rethink_round":
            detail = f"{e.payload.get('answer_before')!r} -> {e.payload.get('answer_after')!r}"
        table.add_row(
            f"{e.ts - t0:.2f}",
            shown(e.kind),
            shown(e.node or ""),
            shown(e.name or ""),
            shown(e.status or ""),
            f"{e.duration_ms:.0f}" if e.duration_ms is not None else "",
            shown(str(detail)[:80]),
        )
    out_console.print(table)


@trace_app.command("export")
def trace_export(
    run_id: Annotated[str, typer.Argument(help="run id or run directory")],
    html: Annotated[
        bool, typer.Option("--html", help="the self-contained review page instead of JSON")
    ] = False,
    out: Annotated[
        Path | None,
        typer.Option(help="file to write (default: <run>/review.html, or stdout for JSON)"),
    ] = None,
) -> None:
    """Export a run's trace: ``trace.json`` content, or with --html the review page (image
    with overlays, timeline, claims linked to evidence, reviews) as one offline HTML file."""
    from medloupe.errors import MedloupeError
    from medloupe.review.page import export_review_html
    from medloupe.runner import find_run
    from medloupe.trace import read_trace

    settings = _settings()
    try:
        run = find_run(run_id, settings)
        if html:
            path = export_review_html(run.dir, out, settings)
            out_console.print(f"review page: {shown(path)}", highlight=False)
            return
        text = read_trace(run.dir, run.run_id, settings=settings).model_dump_json(indent=2)
    except (MedloupeError, OSError) as exc:
        raise _fail(exc) from None
    if out is None:
        sys.stdout.write(text + "\n")
    else:
        from medloupe.artifacts import atomic_write_bytes

        atomic_write_bytes(out, (text + "\n").encode())
        out_console.print(f"trace: {shown(out)}", highlight=False)


# --- knowledge bases -----------------------------------------------------------------------


def _report_build(stats: Any, out: Path) -> None:
    for problem in stats.report.problems[:20]:
        err_console.print(f"[yellow]warning:[/yellow] {shown(problem)}", highlight=False)
    if len(stats.report.problems) > 20:
        err_console.print(
            f"[yellow]... {len(stats.report.problems) - 20} more warnings in the manifest[/yellow]"
        )
    for failed in stats.report.failed_documents:
        err_console.print(f"[red]failed:[/red] {shown(failed)}", highlight=False)
    out_console.print(
        f"{shown(out)}: {stats.passages} passage(s), {stats.figures} figure(s) from "
        f"{stats.documents} document(s) in {stats.seconds:.1f} s",
        highlight=False,
    )


@kb_app.command("build")
def kb_build(
    sources: Annotated[
        list[Path],
        typer.Argument(help="PDF, HTML, Markdown or JSONL files, OpenStax CNXML book folders"),
    ],
    out: Annotated[Path, typer.Option(help="the KB folder to write")],
    name: Annotated[str | None, typer.Option(help="name shown in citations")] = None,
    text_embedder: Annotated[
        str | None, typer.Option(help="sentence-transformers id or folder (default MiniLM)")
    ] = None,
    text_backend: Annotated[
        str,
        typer.Option(
            help="torch | onnx-int8 | auto (int8 ONNX Runtime on a CPU where it is installed)"
        ),
    ] = "auto",
    image_embedder: Annotated[
        str | None,
        typer.Option(
            help="auto | efficientnet-lite0 | pixels | none | a CLIP model id or folder "
            "(default: $MEDLOUPE_IMAGE_EMBEDDER, else auto)"
        ),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing KB")] = False,
    attribution: Annotated[
        list[str] | None, typer.Option(help="attribution line(s) kept in the manifest")
    ] = None,
) -> None:
    """Build a knowledge base: passages, embeddings, FAISS index, figures."""
    from medloupe.errors import MedloupeError
    from medloupe.knowledge_base import build_kb
    from medloupe.knowledge_base.embedders import TextEmbedder
    from medloupe.knowledge_base.image_embedders import image_embedder_from_spec

    try:
        with _progress_bars() as progress:
            stats = build_kb(
                list(sources),
                out,
                embedder=TextEmbedder(text_embedder, backend=text_backend),
                image_embedder=image_embedder_from_spec(image_embedder),
                name=name,
                attribution=attribution,
                on_progress=progress,
                overwrite=overwrite,
            )
    except MedloupeError as exc:
        raise _fail(exc) from None
    _report_build(stats, out)


@kb_app.command("add")
def kb_add(
    kb: Annotated[Path, typer.Argument(help="an existing KB folder")],
    sources: Annotated[list[Path], typer.Argument(help="documents to add")],
) -> None:
    """Add documents to a KB (passages already in it are skipped; only new ones are embedded)."""
    from medloupe.errors import MedloupeError
    from medloupe.knowledge_base import add_to_kb

    try:
        with _progress_bars() as progress:
            stats = add_to_kb(kb, list(sources), on_progress=progress)
    except MedloupeError as exc:
        raise _fail(exc) from None
    _report_build(stats, kb)


@kb_app.command("search")
def kb_search(
    kb: Annotated[str, typer.Argument(help="a KB folder or 'default'")],
    query: Annotated[str, typer.Argument(help="text query (may be empty with --image)")] = "",
    image: Annotated[
        Path | None, typer.Option(help="an image crop to match figures against")
    ] = None,
    k: Annotated[int, typer.Option("-k", min=1, max=50, help="passages to return")] = 5,
    mmr: Annotated[
        float | None,
        typer.Option(min=0.0, max=1.0, help="diversify: MMR weight of relevance (e.g. 0.7)"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON lines")] = False,
) -> None:
    """Search a knowledge base by text, by an image crop, or both (fused)."""
    import numpy as np

    from medloupe.errors import MedloupeError
    from medloupe.knowledge_base import open_knowledge_base

    if not query.strip() and image is None:
        err_console.print("[red]error:[/red] give a text query, --image, or both")
        raise typer.Exit(2)
    crop = None
    if image is not None:
        from medloupe.errors import ImageIntakeError
        from medloupe.io import load_image

        try:
            crop = load_image(image).rgb()
        except ImageIntakeError as exc:
            raise _fail(exc) from None
        crop = np.ascontiguousarray(crop)
    if kb == "default":
        _prepare_default_kb()
    try:
        base = open_knowledge_base(kb)
        hits = base.search_sync(query, image=crop, k=k, mmr=mmr)
    except MedloupeError as exc:
        raise _fail(exc) from None
    if as_json:
        for h in hits:
            sys.stdout.write(h.model_dump_json() + "\n")
        return
    from rich.table import Table

    table = Table("score", "document", "section / page", "kind", "text", title=shown(base.name))
    for h in hits:
        where = h.section or ""
        if h.page:
            where += f" p. {h.page}"
        table.add_row(
            f"{h.score:.3f}", shown(h.document), shown(where), h.kind, shown(h.text[:160])
        )
    out_console.print(table)


@kb_app.command("info")
def kb_info(kb: Annotated[str, typer.Argument(help="a KB folder or 'default'")]) -> None:
    """What a KB holds: embedders, index, counts, sources, problems met when building."""
    from medloupe.errors import MedloupeError
    from medloupe.knowledge_base import open_knowledge_base

    if kb == "default":
        _prepare_default_kb()
    try:
        base = open_knowledge_base(kb)
        info = base.info()
    except MedloupeError as exc:
        raise _fail(exc) from None
    sys.stdout.write(json.dumps(info, indent=2) + "\n")


def main() -> None:
    """Console-script entry point."""
    from medloupe.config import Settings

    try:
        level = Settings.from_env().log_level
    except ValueError:
        level = "WARNING"  # the command reports the bad setting itself
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    main()
