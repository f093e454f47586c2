"""VLM backends: the transformers backend on a tiny real-architecture Qwen2.5-VL built from a
config (real tokenizer, processor, model code; random weights), served by `serve-vlm` and
driven through the OpenAI-compatible backend over real loopback HTTP; retries, fallbacks and
failures against a scripted FAKE endpoint (a loopback server whose replies are scripted)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import Request
from pydantic import BaseModel, Field

from medloupe.agents.hf_backend import TransformersBackend
from medloupe.agents.openai_backend import OpenAIBackend, parse_spec
from medloupe.agents.protocol import ChatMessage, ImagePart, TextPart, load_backend
from medloupe.agents.server import create_app, running_server
from medloupe.agents.structured import extract_json, parse_reply
from medloupe.artifacts import ArtifactStore
from medloupe.errors import (
    BackendSpecError,
    BackendUnavailableError,
    ModelNotFoundError,
    ModelReplyError,
)
from tests.conftest import cli_env


class Finding(BaseModel):
    label: str = Field(max_length=12)
    size_mm: int = Field(ge=0, le=100)


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from medloupe.testing.tiny_model import build_tiny_qwen2_5_vl

    return build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny-qwen2.5-vl"))


@pytest.fixture(scope="session")
def tiny_backend(tiny_vlm_dir: Path) -> TransformersBackend:
    return TransformersBackend(str(tiny_vlm_dir))


@pytest.fixture(scope="session")
def served(tiny_backend: TransformersBackend) -> Iterator[str]:
    with running_server(create_app(tiny_backend, served_name="tiny")) as url:
        yield url


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "store")


def image_message(store: ArtifactStore, h: int = 300, w: int = 240, text: str = "Look.") -> list:
    rng = np.random.default_rng(0)
    aid = store.put_png(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    return [ChatMessage(role="user", content=[ImagePart(artifact=aid), TextPart(text=text)])]


# --- parsing --------------------------------------------------------------------------------


def test_replies_are_parsed_from_fences_and_prose() -> None:
    assert extract_json('Sure!\n```json\n{"a": 1}\n```') == {"a": 1}
    assert extract_json('{"a": "line\nbreak"} trailing') == {"a": "line\nbreak"}
    assert extract_json('x {bad} then {"b": [1, 2]}') == {"b": [1, 2]}
    with pytest.raises(ValueError, match="no JSON object"):
        extract_json("no json here")
    with pytest.raises(ValueError, match="size_mm"):
        parse_reply('{"label": "x", "size_mm": 500}', Finding)


def test_backend_specs() -> None:
    assert parse_spec("http://h:1/v1/#org/m") == ("http://h:1/v1", "org/m")
    assert load_backend("openai:http://127.0.0.1:1/v1#m").spec == "openai:http://127.0.0.1:1/v1#m"
    with pytest.raises(BackendSpecError, match="http"):
        load_backend("openai:127.0.0.1:8000#m")
    with pytest.raises(BackendSpecError, match="did you mean 'openai'"):
        load_backend("opneai:http://x/v1")


# --- the transformers backend, in process ----------------------------------------------------


@pytest.mark.slow
def test_transformers_backend_loads_lazily_and_constrains_json(
    tiny_vlm_dir: Path, store: ArtifactStore
) -> None:
    backend = TransformersBackend(str(tiny_vlm_dir))
    assert not backend.loaded  # nothing loads at construction
    gen = asyncio.run(backend.generate(image_message(store), store=store, schema=Finding))
    assert backend.loaded and isinstance(gen.parsed, Finding)
    assert gen.usage.prompt_tokens > 20 and gen.usage.completion_tokens > 0
    text_only = [ChatMessage.text("user", "Look.")]
    plain = asyncio.run(backend.generate(text_only, store=store, max_tokens=7))
    assert plain.usage.completion_tokens <= 7
    assert plain.usage.prompt_tokens < gen.usage.prompt_tokens  # the image added its tokens


def test_generation_runs_on_one_thread_whoever_asks(
    tiny_vlm_dir: Path, store: ArtifactStore
) -> None:
    """Requests from many threads and event loops queue for the model's one generation thread
    (on CUDA a different driving thread per request cost 2-4x; see BENCHMARKS.md)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    backend = TransformersBackend(str(tiny_vlm_dir))
    backend.load()
    seen: list[str] = []
    running = threading.Semaphore(1)  # fails if two generate calls overlap
    generate = backend._model.generate

    def recording(*args: Any, **kwargs: Any) -> Any:
        assert running.acquire(blocking=False), "two generate calls at once"
        try:
            seen.append(threading.current_thread().name)
            return generate(*args, **kwargs)
        finally:
            running.release()

    backend._model.generate = recording
    msgs = image_message(store)
    with ThreadPoolExecutor(4) as pool:
        done = list(
            pool.map(
                lambda i: asyncio.run(backend.generate(msgs, store=store, max_tokens=2)),
                range(8),
            )
        )
    backend.complete_sync(msgs, store=store, max_tokens=2)  # the caller's own thread too
    assert len(done) == 8 and all(g.usage.completion_tokens >= 1 for g in done)
    assert len(seen) == 9 and len(set(seen)) == 1
    assert seen[0].startswith("medloupe-generate") and seen[0] != threading.current_thread().name


@pytest.mark.slow
def test_images_above_the_models_pixel_cap_are_downscaled(
    tiny_backend: TransformersBackend, store: ArtifactStore
) -> None:
    small = asyncio.run(
        tiny_backend.generate(image_message(store, 200, 250), store=store, max_tokens=1)
    )
    huge = asyncio.run(
        tiny_backend.generate(image_message(store, 3000, 3750), store=store, max_tokens=1)
    )
    cap = tiny_backend.max_image_pixels
    assert cap < 3000 * 3750
    # the huge image costs no more tokens than one at the cap (merged 28x28 patches)
    assert huge.usage.prompt_tokens - small.usage.prompt_tokens <= cap // (28 * 28)
    client = OpenAIBackend("http://127.0.0.1:1/v1", "m", max_image_pixels=100_000)
    aid = image_message(store, 3000, 2000)[0].content[0].artifact
    uri = client.encode_image(store, aid)
    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as im:
        assert im.width * im.height <= 100_000 and abs(im.width / im.height - 2000 / 3000) < 0.01


def test_missing_weights_offline_name_the_model_and_the_fix(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelNotFoundError, match=r"hf download medloupe-test/absent-vlm"):
        load_backend("hf:medloupe-test/absent-vlm")
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_backend(f"hf:{tmp_path / 'nothing-here'}")


# --- served over real HTTP ------------------------------------------------------------------


def test_served_tiny_model_through_the_openai_backend(served: str, store: ArtifactStore) -> None:
    backend = OpenAIBackend(served, None)  # no model named: the only served one is used

    async def go() -> tuple[Any, Any, Any]:
        try:
            structured = await backend.generate(image_message(store), store=store, schema=Finding)
            text = await backend.generate(image_message(store), store=store, max_tokens=5)
            many = await asyncio.gather(
                *(
                    backend.generate(image_message(store), store=store, max_tokens=3)
                    for _ in range(4)
                )
            )
            return structured, text, many
        finally:
            await backend.aclose()

    structured, text, many = asyncio.run(go())
    assert backend.model == "tiny"
    assert isinstance(structured.parsed, Finding) and structured.attempts == 1
    assert structured.usage.prompt_tokens > 20
    assert text.usage.completion_tokens <= 5 and text.model == "tiny"
    assert all(g.usage.completion_tokens <= 3 for g in many)


def test_wrong_model_name_is_explained(served: str, store: ArtifactStore) -> None:
    backend = OpenAIBackend(served, "tiny-vl")
    with pytest.raises(ModelNotFoundError, match=r"serves \['tiny'\]\. Did you mean 'tiny'"):
        asyncio.run(backend.generate(image_message(store), store=store))


def test_server_rejects_bad_requests_clearly(served: str) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with httpx.Client(base_url=served) as client:
        ok = client.post("/chat/completions", json=body)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 2
        remote = {
            **body,
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}],
                }
            ],
        }
        r = client.post("/chat/completions", json=remote)
        assert r.status_code == 400 and "data URI" in r.json()["error"]["message"]
        r = client.post("/chat/completions", json={**body, "max_tokens": 0})
        assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"]
        r = client.post("/chat/completions", json={**body, "model": "gpt-4o"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        assert client.get("/models").json()["data"][0]["id"] == "tiny"


# --- retries, fallbacks and failures against a scripted FAKE endpoint ------------------------

Reply = Callable[[dict[str, Any]], tuple[int, dict[str, Any], dict[str, str]]]


def completion(text: str, finish: str = "stop") -> tuple[int, dict[str, Any], dict[str, str]]:
    return (
        200,
        {
            "model": "m",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": finish,
                }
            ],
            "usage": {"prompt_tokens": 11, "completion_tokens": 3},
        },
        {},
    )


class FakeEndpoint:
    """FAKE OpenAI-compatible endpoint on loopback: each chat request gets the next scripted
    reply; requests are recorded."""

    def __init__(self, replies: list[Reply], delay_s: float = 0.0) -> None:
        self.replies = replies
        self.delay_s = delay_s
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []

    def app(self) -> Any:
        from fastapi import FastAPI
        from fastapi.responses import JSONResponse

        app = FastAPI()

        @app.get("/v1/models")
        async def models() -> dict[str, Any]:
            return {"data": [{"id": "m"}]}

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Any:
            body = await request.json()
            self.requests.append(body)
            self.headers.append(dict(request.headers))
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            reply = self.replies[min(len(self.requests), len(self.replies)) - 1]
            status, payload, headers = reply(body)
            return JSONResponse(payload, status_code=status, headers=headers)

        return app


def fast_client(url: str, **kw: Any) -> OpenAIBackend:
    return OpenAIBackend(url, "m", backoff_s=0.01, **kw)


def test_429_retry_after_and_5xx_are_retried(
    store: ArtifactStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-key")
    fake = FakeEndpoint(
        [
            lambda b: (429, {"error": {"message": "slow down"}}, {"Retry-After": "0.3"}),
            lambda b: (503, {"error": {"message": "overloaded"}}, {}),
            lambda b: completion('{"label": "ok", "size_mm": 4}'),
        ]
    )
    with running_server(fake.app()) as url:
        t0 = time.perf_counter()
        backend = OpenAIBackend.from_spec(f"{url}#m")  # key from the environment
        backend.backoff_s = 0.01
        gen = asyncio.run(backend.generate(image_message(store), store=store, schema=Finding))
        elapsed = time.perf_counter() - t0
    assert gen.parsed == Finding(label="ok", size_mm=4)
    assert len(fake.requests) == 3 and elapsed >= 0.3  # Retry-After honoured
    assert fake.headers[0]["authorization"] == "Bearer sk-test-key"
    sent = fake.requests[0]
    assert sent["response_format"]["type"] == "json_schema"
    image = sent["messages"][0]["content"][0]
    assert image["type"] == "image_url" and image["image_url"]["url"].startswith("data:image/png")


def test_refused_response_format_falls_back_to_prompt_and_parse_with_repair(
    store: ArtifactStore,
) -> None:
    fake = FakeEndpoint(
        [
            lambda b: (400, {"error": {"message": "response_format is not supported"}}, {}),
            lambda b: completion("Here you go: {label: oops}"),
            lambda b: completion('```json\n{"label": "fixed", "size_mm": 9}\n```'),
        ]
    )
    with running_server(fake.app()) as url:
        backend = fast_client(url)
        gen = asyncio.run(backend.generate(image_message(store), store=store, schema=Finding))
    assert gen.parsed == Finding(label="fixed", size_mm=9) and gen.attempts == 2
    assert not backend.profile.supports_schema  # remembered for the next calls
    second, third = fake.requests[1], fake.requests[2]
    assert "response_format" not in second
    assert "JSON schema" in second["messages"][-1]["content"][-1]["text"]
    assert third["messages"][-1]["content"][0]["text"].startswith("That reply is not valid")
    assert gen.usage.prompt_tokens == 22  # both attempts counted


def test_unparseable_replies_end_in_a_model_reply_error(store: ArtifactStore) -> None:
    fake = FakeEndpoint([lambda b: completion('{"label": "x", "size_', finish="length")])
    with (
        running_server(fake.app()) as url,
        pytest.raises(ModelReplyError, match="cut off at max_tokens=16"),
    ):
        asyncio.run(
            fast_client(url).generate(
                image_message(store), store=store, schema=Finding, max_tokens=16
            )
        )
    assert len(fake.requests) == 2  # one repair round, then give up


@pytest.mark.slow
def test_persistent_5xx_and_timeouts_fail_after_the_retries(store: ArtifactStore) -> None:
    fake = FakeEndpoint([lambda b: (500, {"error": {"message": "CUDA out of memory"}}, {})])
    with (
        running_server(fake.app()) as url,
        pytest.raises(BackendUnavailableError, match=r"3 attempt\(s\): HTTP 500: CUDA out"),
    ):
        asyncio.run(fast_client(url, max_retries=2).generate(image_message(store), store=store))
    assert len(fake.requests) == 3
    slow = FakeEndpoint([lambda b: completion("late")], delay_s=2.0)
    with running_server(slow.app()) as url:
        t0 = time.perf_counter()
        with pytest.raises(BackendUnavailableError, match="timed out"):
            asyncio.run(
                fast_client(url, max_retries=1, read_timeout_s=0.3).generate(
                    image_message(store), store=store
                )
            )
        assert time.perf_counter() - t0 < 1.9


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_endpoint_down_fails_the_run_and_keeps_its_trace(chest_dcm: Path, tmp_path: Path) -> None:
    env = cli_env(tmp_path / "home")
    env["MEDLOUPE_VLM_RETRIES"] = "1"
    port = free_port()
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "medloupe",
            "ask",
            str(chest_dcm),
            "Is there a nodule?",
            "--vlm",
            f"openai:http://127.0.0.1:{port}/v1#m",
            "--out",
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert f"http://127.0.0.1:{port}/v1 failed after 2 attempt(s)" in proc.stderr
    doc = json.loads((out / "trace.json").read_text())
    assert doc["events"][-1]["kind"] == "run_error"
    assert not (out / "answer.json").exists()


# --- the full graph and the CLI server --------------------------------------------------------


@pytest.mark.slow
def test_full_graph_through_the_served_tiny_model(
    served: str, chest_dcm: Path, tmp_path: Path
) -> None:
    """Real HTTP, real model code: every role calls the model; whatever the random weights
    say, the run ends with a validated answer and every model call traced with tokens."""
    from medloupe.config import Settings
    from medloupe.graphs.context import ResourceSpec, load_resources
    from medloupe.io import load_image
    from medloupe.runner import create_run, execute
    from medloupe.tools import default_registry
    from medloupe.trace import TraceRecorder

    settings = Settings(home=tmp_path / "home")
    run = create_run(
        load_image(chest_dcm), "Is there a nodule?", settings=settings, out_dir=tmp_path / "run"
    )
    vlm = OpenAIBackend(served, "tiny")
    resources = load_resources(
        ResourceSpec(), registry=default_registry(plugins=False), backend=vlm
    )
    answer = asyncio.run(execute(run, settings=settings, resources=resources))
    trace = TraceRecorder(run.trace_path)
    events = trace.events()
    trace.close()
    calls = [e for e in events if e.kind == "model_call"]
    assert {"think", "plan", "rethink", "answer"} <= {e.node for e in calls}
    assert all(e.payload["prompt_tokens"] > 0 for e in calls)
    assert answer.provenance.vlm == f"openai:{served}#tiny"
    assert (run.dir / "answer.json").is_file()


@pytest.mark.slow
def test_serve_vlm_command(tiny_vlm_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    env = cli_env(tmp_path / "home")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "medloupe",
            "serve-vlm",
            str(tiny_vlm_dir),
            "--port",
            str(port),
            "--served-name",
            "tiny-cli",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1)
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.3)
        assert r.json()["data"][0]["id"] == "tiny-cli"
        r = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            json={
                "model": "tiny-cli",
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 4,
            },
            timeout=60,
        )
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    bad = subprocess.run(
        [sys.executable, "-m", "medloupe", "serve-vlm", str(tmp_path / "absent")],
        env={**env, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "does not exist" in bad.stderr
