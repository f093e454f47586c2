"""medloupe: grounded, traced answers to diagnostic questions about medical images.

The public surface is small and imports nothing heavy:

- :func:`medloupe.io.load_image` reads PNG/JPEG/TIFF, DICOM and NIfTI into a record + pixels;
- :mod:`medloupe.tools` holds the tool protocol, the ``@tool`` decorator and the registry;
- :mod:`medloupe.graphs.diagnose` exports the compiled LangGraph ``graph``;
- :func:`medloupe.ask` runs one question end to end and returns the grounded answer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from medloupe.version import __version__

if TYPE_CHECKING:
    from medloupe.schemas import GroundedAnswer


def ask(image: str, question: str, **kwargs: Any) -> GroundedAnswer:
    """Answer ``question`` about the image file ``image``; see :func:`medloupe.api.ask`."""
    from medloupe.api import ask as _ask

    return _ask(image, question, **kwargs)


__all__ = ["__version__", "ask"]
