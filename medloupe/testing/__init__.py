"""Test doubles that ship with the library, for tests of code built on medloupe.

- :class:`~medloupe.testing.fakes.ScriptedFakeVLM`: a FAKE backend for unit tests of
  orchestration logic only (it never looks at an image; replies come from per-role scripts).
- :func:`~medloupe.testing.tiny_model.build_tiny_qwen2_5_vl`: a real-architecture
  Qwen2.5-VL with random weights, built from a config (no download), for tests of the
  transformers and OpenAI-compatible paths.
"""

from __future__ import annotations

from medloupe.testing.fakes import ScriptedFakeVLM

__all__ = ["ScriptedFakeVLM"]
