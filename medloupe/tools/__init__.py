"""Tools: the protocol, the registry, and medloupe's built-in tools.

>>> from medloupe.tools import default_registry
>>> "crop" in default_registry()
True
"""

from __future__ import annotations

from medloupe.tools.base import (
    Availability,
    FunctionTool,
    Requirements,
    Tool,
    ToolContext,
    ToolResult,
    tool,
)
from medloupe.tools.registry import ENTRY_POINT_GROUP, PluginProblem, ToolRegistry, evidence_id


def expert_tools() -> list[Tool]:
    """New instances of medloupe's expert tools: ``segment`` (SAM / MedSAM / classical),
    ``zoom``, ``contrast``, ``overlay``, ``count_cells``, ``read_text`` (OCR),
    ``find_markers`` (coloured dots and labels a question names), ``detect``
    (zero-shot detector, when configured) and ``classify`` (DenseNet121, when configured).
    Each instance owns its lazily loaded weights and caches. (``ground``, medloupe-mini's
    grounder, arrives through the ``medloupe.tools`` entry points like any plugin.)"""
    from medloupe.tools.cells import count_cells
    from medloupe.tools.classify import ClassifyTool
    from medloupe.tools.detect import DetectTool
    from medloupe.tools.imageops import image_op_tools
    from medloupe.tools.markers import FindMarkersTool
    from medloupe.tools.ocr import OcrEngine, ReadTextTool
    from medloupe.tools.segment import SegmentTool

    ocr = OcrEngine()  # one engine (its models and lock) for both OCR tools
    return [
        SegmentTool(),
        *image_op_tools(),
        count_cells,
        ReadTextTool(ocr),
        FindMarkersTool(ocr),
        DetectTool(),
        ClassifyTool(),
    ]


def default_registry(*, plugins: bool = True, mcp: str | None = None) -> ToolRegistry:
    """A new registry with the built-in and expert tools and, if ``plugins``, every
    ``medloupe.tools`` entry point of the installed distributions and the tools of the MCP
    servers ``mcp`` names (default: the ``mcp_servers`` setting; ``""``: none), connected now.

    Raises:
        medloupe.errors.InputError: ``mcp`` is malformed (a server that does not answer is
            a listed problem instead).
    """
    from medloupe.config import Settings
    from medloupe.tools.builtin import builtin_tools

    registry = ToolRegistry([*builtin_tools(), *expert_tools()])
    if plugins:
        registry.load_entry_points()
        settings = Settings.from_env()
        registry.load_mcp_servers(
            settings.mcp_servers if mcp is None else mcp, logs=settings.home / "logs"
        )
    return registry


__all__ = [
    "ENTRY_POINT_GROUP",
    "Availability",
    "FunctionTool",
    "PluginProblem",
    "Requirements",
    "Tool",
    "ToolContext",
    "ToolRegistry",
    "ToolResult",
    "default_registry",
    "evidence_id",
    "expert_tools",
    "tool",
]
