"""What the CLI prints of text it did not write (questions, answers, file names, plugin
errors): no control character reaches the terminal raw, no markup is interpreted."""

from __future__ import annotations

import io

from rich.console import Console

from medloupe.cli import shown


def render(markup: str) -> str:
    buf = io.StringIO()
    Console(file=buf, force_terminal=False, width=200).print(markup, highlight=False)
    return buf.getvalue()


def test_control_characters_are_made_visible() -> None:
    text = shown("Is there\x1b[2J a mass?\x07\u202e\x9b")
    assert "\x1b" not in text and "\x07" not in text and "\u202e" not in text
    assert "\\x1b" in text and "\\x07" in text and "\\u202e" in text and "\\x9b" in text


def test_markup_in_user_text_is_printed_as_written() -> None:
    for raw in ("a [/x] question", "[red]fake alert[/red]", "pip install 'medloupe[codecs]'"):
        out = render(f"[bold]{shown(raw)}[/bold]")
        assert raw in out
    assert "/tmp/[red]scan.dcm" in render(f"error: {shown('/tmp/[red]scan.dcm')}")
