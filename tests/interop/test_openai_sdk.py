"""The official `openai` client against `medloupe serve-vlm mini` (the documented command):
models, an image question, `n`, `stop`, streaming with a usage chunk, OpenAI-shaped errors on
every route (a 413 for an oversized body), and `medloupe ask` through the served model giving
the kind of answer `--vlm mini:` gives."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from tests.interop.servers import free_port, running

pytestmark = pytest.mark.interop


@pytest.fixture(scope="module")
def served_mini(tmp_path_factory: pytest.TempPathFactory):
    port = free_port()
    exe = str(Path(sys.executable).parent / "medloupe")
    log = tmp_path_factory.mktemp("serve-vlm") / "serve.log"
    cmd = [exe, "serve-vlm", "mini", "--host", "127.0.0.1", "--port", str(port)]
    with running(cmd, ready=f"http://127.0.0.1:{port}/health", log=log) as server:
        yield server, f"http://127.0.0.1:{port}/v1"


def chest_uri(chest_dcm: Path) -> str:
    from medloupe.io import load_image

    loaded = load_image(chest_dcm)
    buf = io.BytesIO()
    Image.fromarray(np.asarray(loaded.display)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def question(uri: str, text: str = "Question: Is there a pneumothorax?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                         {"type": "text", "text": text}]}]


def test_the_openai_client_against_serve_vlm(served_mini, chest_dcm: Path) -> None:
    server, url = served_mini
    client = openai.OpenAI(base_url=url, api_key="unused")
    assert [m.id for m in client.models.list()] == ["medloupe-mini"]
    msgs = question(chest_uri(chest_dcm))

    reply = client.chat.completions.create(model="medloupe-mini", messages=msgs, n=2)
    assert [c.index for c in reply.choices] == [0, 1]
    answer = reply.choices[0].message.content
    assert answer in ("yes", "no")
    assert reply.usage.prompt_tokens > 1 and reply.usage.completion_tokens >= 2  # counted

    cut = client.chat.completions.create(model="medloupe-mini", messages=msgs, stop=[answer[1:]])
    assert cut.choices[0].message.content == answer[:1]
    assert cut.choices[0].finish_reason == "stop"

    chunks = list(client.chat.completions.create(
        model="medloupe-mini", messages=msgs, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == answer
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0
    assert any(c.choices and c.choices[0].finish_reason for c in chunks)

    structured = client.chat.completions.create(
        model="medloupe-mini", messages=msgs,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": {
            "type": "object", "properties": {"answer": {"type": "string"},
                                             "confidence": {"type": "number"}},
            "required": ["answer", "confidence"]}}})
    assert json.loads(structured.choices[0].message.content)["answer"] == answer


def test_errors_are_openai_shaped(served_mini) -> None:
    server, url = served_mini
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", messages=question("data:,"))
    assert "not served here" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="medloupe-mini",
            messages=question("data:image/png;base64," + base64.b64encode(b"junk" * 10).decode()),
        )
    assert "no image" in err.value.message and "BytesIO" not in err.value.message
    big = "data:image/png;base64," + "A" * (49 * 1024 * 1024)
    with pytest.raises(openai.APIStatusError) as err:
        client.chat.completions.create(model="medloupe-mini", messages=question(big))
    assert err.value.status_code == 413
    for method, path in (("GET", "/nope"), ("DELETE", "/models")):
        r = httpx.request(method, url + path)
        assert r.status_code in (404, 405) and set(r.json()["error"]) >= {"message", "type"}


def test_ask_through_serve_vlm_answers_like_mini(served_mini, chest_dcm: Path,
                                                 tmp_path: Path) -> None:
    """`medloupe ask --vlm openai:URL` (the served mini) gives the answer `--vlm mini:` gives."""
    _, url = served_mini
    answers = []
    for spec in (f"openai:{url}", "mini:"):
        done = subprocess.run(
            [sys.executable, "-m", "medloupe", "ask", str(chest_dcm),
             "Is there a pneumothorax?", "--vlm", spec, "--json"],
            capture_output=True, text=True, timeout=300,
            env={**os.environ, "MEDLOUPE_HOME": str(tmp_path / spec.split(":")[0])},
        )
        assert done.returncode == 0, done.stderr[-3000:]
        answers.append(json.loads(done.stdout))
    served, local = answers
    assert served["short_answer"] == local["short_answer"]
    assert abs(served["confidence"] - local["confidence"]) < 0.01
    assert served["provenance"]["answer_source"] == "vlm"
