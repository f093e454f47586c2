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


def default_registry(*, plugins: bool = True) -> ToolRegistry:
    """A new registry with the built-in tools and, if ``plugins``, every ``medloupe.tools``
    entry point of the installed distributions."""
    from medloupe.tools.builtin import builtin_tools

    registry = ToolRegistry(builtin_tools())
    if plugins:
        registry.load_entry_points()
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
    "tool",
]
