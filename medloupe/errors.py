"""Typed errors. Every message names the problem and, where there is one, the fix.

The CLI maps :class:`InputError` (bad user input: image, arguments, unknown names) to exit
code 2 and writes nothing; other :class:`MedloupeError` subclasses exit with code 1.
"""

from __future__ import annotations

from typing import Any


class MedloupeError(Exception):
    """Base class of every error medloupe raises on purpose."""


class InputError(MedloupeError, ValueError):
    """The user gave something medloupe cannot use (CLI exit code 2)."""


# --- image intake ------------------------------------------------------------------------


class ImageIntakeError(InputError):
    """An image could not be read. ``path`` names the file (never its DICOM contents)."""

    def __init__(self, path: str, problem: str, fix: str | None = None) -> None:
        self.path = path
        self.problem = problem
        self.fix = fix
        msg = f"{path}: {problem}"
        if fix:
            msg += f" ({fix})"
        super().__init__(msg)


class EmptyImageError(ImageIntakeError):
    """The file has no bytes, or decodes to an image with no pixels."""


class CorruptImageError(ImageIntakeError):
    """The file is truncated or its bytes are not a valid image of the format it claims."""


class UnsupportedImageError(ImageIntakeError):
    """The file is not a format medloupe reads (PNG/JPEG/TIFF, DICOM, NIfTI)."""


class UnsupportedTransferSyntaxError(ImageIntakeError):
    """A DICOM file is compressed with a transfer syntax no installed decoder handles."""


class ImageTooLargeError(ImageIntakeError):
    """The image has more pixels than the configured limit (``Settings.max_pixels``)."""


# --- tools -------------------------------------------------------------------------------


class ToolError(MedloupeError):
    """Base class of tool registry and tool call errors."""


class DuplicateToolError(ToolError):
    """Two tools were registered under one name."""


class UnknownToolError(ToolError, InputError):
    """A tool name is not registered; the message carries a "did you mean" hint."""

    def __init__(self, name: str, known: list[str]) -> None:
        import difflib

        self.name = name
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        listing = ", ".join(sorted(known)) or "none"
        super().__init__(f"unknown tool {name!r}{hint} (registered tools: {listing})")


class ToolArgumentsError(ToolError, InputError):
    """Arguments for a tool failed validation against its input model."""


class ToolUnavailableError(ToolError):
    """A tool cannot run here (missing weights, device); the message gives the reason."""


class ToolTimeoutError(ToolError):
    """A tool call ran past its timeout."""


class ToolExecutionError(ToolError):
    """A tool raised while running. The original exception is chained."""


class WeightsMissingError(ToolUnavailableError, InputError):
    """A model's weights are not on this machine (and could not or may not be downloaded);
    the message names the file and how to provide it."""


class ChecksumError(ToolError):
    """A downloaded weight file does not have its published SHA-256."""


class PluginLoadError(ToolError):
    """A ``medloupe.tools`` entry point could not be imported or returned no tools."""


# --- graph, answer, runs -----------------------------------------------------------------


class DanglingEvidenceError(MedloupeError, ValueError):
    """A claim cites an evidence id that does not exist in the run."""


class RunNotFoundError(InputError):
    """No run with that id (or directory) is known."""


class RunStateError(InputError):
    """A run's files (``run.json``, ``trace.sqlite``, ``checkpoints.sqlite``) are unreadable."""


class BackendError(MedloupeError):
    """A VLM backend failed (endpoint down after retries, unparseable output, ...)."""


class ModelReplyError(BackendError):
    """The model answered, but not with a valid reply (unparseable or off-schema JSON after
    the repair rounds, or a refusal of this request: :class:`ModelRefusedError`). The graph
    degrades gracefully on this one; an unreachable endpoint
    (:class:`BackendUnavailableError`) ends the run."""

    def __init__(
        self, message: str, *, usage: Any = None, latency_ms: float = 0.0, attempts: int = 1
    ) -> None:
        super().__init__(message)
        self.usage = usage
        self.latency_ms = latency_ms
        self.attempts = attempts


class ModelRefusedError(ModelReplyError):
    """The server answered this request with a refusal it would not give a different request
    (an HTTP 4xx: a bad value, too many images, a prompt too long). The graph degrades on it
    like on an invalid reply: a traced failed model call, the run goes on."""


class ContextLengthError(ModelRefusedError):
    """The prompt (with the reply's ``max_tokens``) does not fit the model's context; a
    shorter prompt may. ``limit`` is the context length the server stated, if it did."""

    def __init__(self, message: str, *, limit: int | None = None) -> None:
        super().__init__(message)
        self.limit = limit


class SchemaUnsupportedError(BackendError):
    """The endpoint refused a JSON-schema ``response_format``; callers fall back to
    prompt-and-parse."""


class BackendUnavailableError(BackendError):
    """The endpoint could not be reached or kept failing after the retries."""


class ModelNotFoundError(BackendError, InputError):
    """The model named in a spec is not served by the endpoint, or its weights are missing."""


class BackendSpecError(InputError):
    """A ``--vlm`` spec string names no known backend or is malformed."""


class KnowledgeBaseError(InputError):
    """A knowledge base could not be opened."""


# --- validation messages -----------------------------------------------------------------


def validation_text(exc: Any, *, root: str = "(root)", skip: int = 0, limit: int = 8) -> str:
    """A pydantic ``ValidationError`` as ``field: message; ...`` — no links, no input echo.

    ``root`` names a problem with the whole value, ``skip`` drops leading location parts
    (FastAPI's ``body``), ``limit`` caps the count. Anything without ``errors()`` is ``str()``.
    """
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return str(exc)
    parts = []
    for e in errors()[:limit]:
        where = ".".join(str(x) for x in e["loc"][skip:]) or root
        msg = str(e["msg"]).removeprefix("Value error, ")
        parts.append(msg if msg.startswith(f"{where}:") else f"{where}: {msg}")
    return "; ".join(parts)
