"""A VLM backend for OpenAI-compatible chat-completions endpoints (vLLM, SGLang, Ollama, TGI,
``medloupe serve-vlm``), over ``httpx.AsyncClient``.

Spec: ``openai:BASE_URL#MODEL``, e.g. ``openai:http://127.0.0.1:8000/v1#Qwen/Qwen2.5-VL-7B-Instruct``.
Without ``#MODEL`` the endpoint's only served model is used (``/v1/models``).

Settings (:class:`~medloupe.config.Settings`, read when the backend is built):

``openai_api_key``
    bearer token, if the endpoint wants one.
``vlm_timeout_s``
    read timeout in seconds (default 120); the connect timeout is 5 s.
``vlm_retries``
    retries on transport errors, 5xx and 429 (default 3), with exponential backoff and
    ``Retry-After`` honoured.
``vlm_concurrency``
    requests in flight at most, per event loop (default 4).
``vlm_max_image_pixels``
    images are downscaled to at most this many pixels before sending (default ~1 MP).
``redact_text``
    burned-in text is painted over before images go to a non-loopback endpoint.

Structured output is requested with ``response_format`` (JSON schema); a server that refuses
it (HTTP 400/422 naming the field) or ignores it (a reply not shaped by the schema) is
remembered, and from then on the schema is spelled out in the prompt and the reply parsed,
with a bounded repair round that states the schema again.

What a server states about its limits is learnt and kept: the context length (``max_model_len``
of ``/models``, or a "maximum context length" refusal: :class:`~medloupe.errors.ContextLengthError`,
on which the roles send a shorter prompt) and the images it takes per request (a
"At most N image(s)" refusal: the request is sent again with the images beyond the first N - 1
tiled into one picture). Any other 4xx is a :class:`~medloupe.errors.ModelRefusedError` (the run
degrades); only an unreachable endpoint ends it.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import re
import time
import weakref
from typing import Any

import httpx

from medloupe.agents.images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    artifact_data_uri,
    decode_data_uri,
    encode_png_data_uri,
    grid,
    tile_images,
)
from medloupe.agents.messages import ChatMessage, Completion, ImagePart, TextPart, Usage
from medloupe.agents.protocol import ModelProfile, VLMBackend
from medloupe.artifacts import ArtifactStore
from medloupe.config import Settings, env_name, redaction_wanted
from medloupe.errors import (
    BackendError,
    BackendSpecError,
    BackendUnavailableError,
    ContextLengthError,
    ModelNotFoundError,
    ModelRefusedError,
    SchemaUnsupportedError,
)

log = logging.getLogger(__name__)

_RETRY_STATUS = {429, 500, 502, 503, 504}
_CONTEXT_LIMIT = re.compile(r"maximum context length is (\d+)", re.I)
_CONTEXT_WORDS = ("context length", "context window", "too many tokens", "prompt is too long")
_IMAGE_LIMIT = re.compile(r"at most (\d+) image", re.I)


def parse_spec(rest: str) -> tuple[str, str | None]:
    """``BASE_URL#MODEL`` -> (base URL without a trailing slash, model or None)."""
    url, _, model = rest.partition("#")
    if not url.startswith(("http://", "https://")):
        raise BackendSpecError(
            f"openai backend spec needs an http(s) base URL, got {url!r} "
            "(e.g. openai:http://127.0.0.1:8000/v1#Qwen/Qwen2.5-VL-7B-Instruct)"
        )
    return url.rstrip("/"), model or None


def retry_after_s(response: httpx.Response) -> float | None:
    """Seconds from a ``Retry-After`` header (delta seconds or an HTTP date), if any."""
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class _LoopState:
    def __init__(self, client: httpx.AsyncClient, limit: int) -> None:
        self.client = client
        self.semaphore = asyncio.Semaphore(limit)


class OpenAIBackend(VLMBackend):
    """Chat completions against an OpenAI-compatible endpoint.

    Args:
        base_url: the API root, e.g. ``http://127.0.0.1:8000/v1``.
        model: the served model name; ``None``: the endpoint's only model.
        api_key: bearer token (:meth:`from_spec`: ``Settings.openai_api_key``).
        connect_timeout_s, read_timeout_s: httpx timeouts.
        max_retries: retries on transport errors, 5xx and 429.
        backoff_s, max_backoff_s: first and largest wait between attempts.
        max_concurrency: requests in flight at most (per event loop).
        max_image_pixels: cap on each image's pixels (downscaled above it).
        redact_text: paint over burned-in text (OCR-detected) in every image before it is sent.
        transport: an ``httpx.AsyncBaseTransport`` (tests, proxies).
    """

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        *,
        api_key: str | None = None,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 120.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        max_concurrency: int = 4,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        redact_text: bool = False,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key = api_key
        self.timeout = httpx.Timeout(read_timeout_s, connect=connect_timeout_s)
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.max_concurrency = max_concurrency
        self.max_image_pixels = max_image_pixels
        self.redact_text = redact_text
        self._ocr: Any = None
        self._redacted: dict[tuple[str, str], str] = {}
        self._transport = transport
        self._schema_ok = True
        self._probed = False
        self._max_images: int | None = None  # learnt from the server's refusals
        self._context_tokens: int | None = None  # from /models max_model_len or a refusal
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopState] = (
            weakref.WeakKeyDictionary()
        )

    @classmethod
    def from_spec(cls, rest: str) -> OpenAIBackend:
        """Build from the part of a spec after ``openai:``, with :class:`Settings` from the
        environment."""
        url, model = parse_spec(rest)
        settings = Settings.from_env()
        return cls(
            url,
            model,
            api_key=settings.openai_api_key,
            read_timeout_s=settings.vlm_timeout_s,
            max_retries=settings.vlm_retries,
            max_concurrency=settings.vlm_concurrency,
            max_image_pixels=settings.vlm_max_image_pixels or DEFAULT_MAX_IMAGE_PIXELS,
            redact_text=redaction_wanted(url, settings.redact_text),
        )

    @property
    def spec(self) -> str:
        return f"openai:{self.base_url}#{self.model or ''}"

    @property
    def profile(self) -> ModelProfile:
        """Schema-constrained until the server refuses or ignores it; crops zoomed to the side
        of a square image at the pixel cap; the context length and images per request the
        server stated."""
        return ModelProfile(
            supports_schema=self._schema_ok,
            preferred_image_side=int(self.max_image_pixels**0.5),
            max_images=self._max_images,
            context_tokens=self._context_tokens,
        )

    def distrust_schema(self) -> None:
        """The server ignores ``response_format``: spell schemas out from now on."""
        self._schema_ok = False

    def _state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        state = self._loops.get(loop)
        if state is None:
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            client = httpx.AsyncClient(
                base_url=self.base_url,
                timeout=self.timeout,
                headers=headers,
                transport=self._transport,
                limits=httpx.Limits(max_connections=self.max_concurrency),
            )
            state = _LoopState(client, self.max_concurrency)
            self._loops[loop] = state
        return state

    async def aclose(self) -> None:
        """Close this event loop's HTTP client."""
        state = self._loops.pop(asyncio.get_running_loop(), None)
        if state is not None:
            await state.client.aclose()

    async def _request(self, method: str, path: str, payload: Any = None) -> httpx.Response:
        """One request with retries on transport errors, 5xx and 429.

        Raises:
            BackendUnavailableError: still failing after the retries.
        """
        state = self._state()
        attempts = self.max_retries + 1
        last = ""
        for attempt in range(attempts):
            wait = min(self.max_backoff_s, self.backoff_s * 2**attempt) * (
                0.5 + random.random() / 2
            )
            try:
                async with state.semaphore:
                    response = await state.client.request(method, path, json=payload)
            except httpx.TimeoutException as exc:
                last = (
                    f"timed out ({type(exc).__name__}; read timeout "
                    f"{self.timeout.read:.0f} s, set {env_name('vlm_timeout_s')} to change it)"
                )
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {exc or 'transport error'}"
            else:
                if response.status_code not in _RETRY_STATUS:
                    return response
                last = f"HTTP {response.status_code}: {_error_text(response)}"
                hinted = retry_after_s(response)
                if hinted is not None:
                    wait = min(self.max_backoff_s, hinted)
            if attempt + 1 < attempts:
                log.warning(
                    "%s %s%s failed (%s); retry %d/%d in %.1f s",
                    method,
                    self.base_url,
                    path,
                    last,
                    attempt + 1,
                    self.max_retries,
                    wait,
                )
                await asyncio.sleep(wait)
        raise BackendUnavailableError(
            f"VLM endpoint {self.base_url} failed after {attempts} attempt(s): {last}. "
            "Is the server running and reachable? (vLLM: `vllm serve MODEL`; "
            "or `medloupe serve-vlm MODEL`)"
        )

    async def served_models(self) -> list[str]:
        """Model ids the endpoint serves (``GET /models``)."""
        return [str(m["id"]) for m in await self._model_entries()]

    async def _model_entries(self) -> list[dict[str, Any]]:
        response = await self._request("GET", "/models")
        if response.status_code != 200:
            raise BackendError(
                f"{self.base_url}/models answered HTTP {response.status_code}: "
                f"{_error_text(response)}"
            )
        try:
            entries = [dict(m) for m in response.json().get("data", [])]
            for m in entries:
                str(m["id"])
            return entries
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise BackendError(
                f"{self.base_url}/models returned an unexpected body: {exc}"
            ) from None

    async def probe(self) -> str:
        """Check that the model is served (choosing the only one when none was named).

        Raises:
            ModelNotFoundError: the model is not among the served ones.
            BackendUnavailableError: the endpoint is down.
        """
        entries = await self._model_entries()
        models = [str(m["id"]) for m in entries]
        if self.model is None:
            if len(models) != 1:
                raise ModelNotFoundError(
                    f"{self.base_url} serves {models or 'no models right now'}; name one in "
                    f"the spec: openai:{self.base_url}#MODEL"
                    + (
                        ""
                        if models
                        else " (a server that loads models on demand, such as "
                        "`transformers serve`, needs the name)"
                    )
                )
            self.model = models[0]
        elif not models:
            log.warning(
                "%s/models lists no models; going on with %r (servers such as `transformers "
                "serve` load a model on its first request)",
                self.base_url,
                self.model,
            )
        elif self.model not in models:
            import difflib

            close = difflib.get_close_matches(self.model, models, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ModelNotFoundError(
                f"model {self.model!r} is not served at {self.base_url}; it serves {models}.{hint}"
            )
        for m in entries:
            if str(m["id"]) == self.model and isinstance(m.get("max_model_len"), int):
                self._context_tokens = int(m["max_model_len"])  # vLLM states its context
        self._probed = True
        return self.model

    async def _payload_messages(
        self, messages: list[ChatMessage], store: ArtifactStore
    ) -> list[dict[str, Any]]:
        """The messages as OpenAI content parts; images beyond the server's per-request limit
        are tiled into one picture (said in a text part), none sent to a server taking none."""
        images = [p.artifact for m in messages for p in m.content if isinstance(p, ImagePart)]
        limit = self._max_images
        keep, tiled = (
            (images, [])
            if limit is None or len(images) <= limit
            else (
                images[: max(0, limit - 1)],
                images[max(0, limit - 1) :] if limit > 0 else [],
            )
        )
        out = []
        for m in messages:
            parts: list[dict[str, Any]] = []
            for part in m.content:
                if isinstance(part, TextPart):
                    parts.append({"type": "text", "text": part.text})
                elif part.artifact in keep:
                    uri = await asyncio.to_thread(self.encode_image, store, part.artifact)
                    parts.append({"type": "image_url", "image_url": {"url": uri}})
                elif tiled and part.artifact == tiled[0]:
                    uri = await asyncio.to_thread(self._tiled_uri, store, tiled)
                    parts.append({"type": "image_url", "image_url": {"url": uri}})
                    parts.append(
                        {
                            "type": "text",
                            "text": f"(the server takes {limit} image(s) per request: images "
                            f"{len(keep) + 1}-{len(images)} are shown side by side in that "
                            "one picture, left to right, top to bottom)",
                        }
                    )
                elif limit == 0 and part.artifact == images[0]:
                    parts.append(
                        {"type": "text", "text": "(the server takes no images: none shown)"}
                    )
            out.append({"role": m.role, "content": parts})
        return out

    def _tiled_uri(self, store: ArtifactStore, artifact_ids: list[str]) -> str:
        if self.redact_text:  # each picture redacted first, then tiled
            cells = [decode_data_uri(self.encode_image(store, a)) for a in artifact_ids]
            return encode_png_data_uri(grid(cells, self.max_image_pixels))
        return encode_png_data_uri(tile_images(store, artifact_ids, self.max_image_pixels))

    def encode_image(self, store: ArtifactStore, artifact_id: str) -> str:
        """A PNG data URI of an artifact, downscaled to the pixel cap (and with burned-in text
        painted over when ``redact_text``)."""
        if not self.redact_text:
            return artifact_data_uri(store, artifact_id, self.max_image_pixels)
        key = (str(store.dir), artifact_id)
        if key not in self._redacted:
            import numpy as np
            from PIL import Image

            from medloupe.agents.images import encode_png_data_uri, model_image
            from medloupe.tools.ocr import OcrEngine, redact_burned_in_text

            if self._ocr is None:
                self._ocr = OcrEngine()
            rgb = np.asarray(model_image(store, artifact_id, self.max_image_pixels))
            clean, n = redact_burned_in_text(rgb, self._ocr)
            log.info("redacted %d burned-in text box(es) of %s before sending", n, artifact_id)
            if len(self._redacted) >= 64:
                self._redacted.pop(next(iter(self._redacted)))
            self._redacted[key] = encode_png_data_uri(Image.fromarray(clean))
        return self._redacted[key]

    async def complete(
        self,
        messages: list[ChatMessage],
        *,
        store: ArtifactStore,
        json_schema: dict[str, Any] | None = None,
        max_tokens: int = 512,
        temperature: float = 0.0,
    ) -> Completion:
        """One chat completion.

        Raises:
            SchemaUnsupportedError: the server refused ``response_format``.
            ModelNotFoundError: the model is not served.
            BackendUnavailableError: endpoint down, 5xx or 429 after the retries, timeout.
            BackendError: any other refusal (the server's message included).
        """
        if not self._probed:
            await self.probe()
        n_images = sum(isinstance(p, ImagePart) for m in messages for p in m.content)
        while True:
            payload: dict[str, Any] = {
                "model": self.model,
                "messages": await self._payload_messages(messages, store),
                "max_tokens": max_tokens,
                "temperature": temperature,
            }
            if json_schema is not None:
                payload["response_format"] = {
                    "type": "json_schema",
                    "json_schema": {
                        "name": str(json_schema.get("title", "reply")),
                        "schema": json_schema,
                    },
                }
            response = await self._request("POST", "/chat/completions", payload)
            if response.status_code == 200:
                break
            text = _error_text(response)
            limit = _IMAGE_LIMIT.search(text)
            sent = n_images if self._max_images is None else min(n_images, self._max_images)
            if response.status_code in (400, 413, 422) and limit and int(limit[1]) < sent:
                self._max_images = int(limit[1])
                log.warning(
                    "%s takes at most %d image(s) per request; sending %d image(s) with the "
                    "rest tiled",
                    self.base_url,
                    self._max_images,
                    self._max_images,
                )
                continue
            self._refused(response.status_code, text, json_schema is not None)
            if response.status_code == 404:
                self._probed = False
                await self.probe()
            raise BackendError(f"{self.base_url} answered HTTP {response.status_code}: {text}")
        try:
            body = response.json()
            choice = body["choices"][0]
            text = choice["message"].get("content") or ""
            usage = body.get("usage") or {}
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise BackendError(
                f"{self.base_url} returned a body that is not a chat completion: {exc}"
            ) from None
        finish = choice.get("finish_reason") or "stop"
        return Completion(
            text=text,
            usage=Usage(
                prompt_tokens=int(usage.get("prompt_tokens") or 0),
                completion_tokens=int(usage.get("completion_tokens") or 0),
            ),
            finish_reason="length" if finish == "length" else "stop",
            model=str(body.get("model") or self.model or ""),
            constrained=json_schema is not None,
        )

    def _refused(self, status: int, text: str, with_schema: bool) -> None:
        """Raise the error a refusal means (schema refused, context too long, credentials,
        any other 4xx); return for a 404 (the model may be gone: probed again)."""
        lower = text.lower()
        if (
            with_schema
            and status in (400, 422)
            and any(k in lower for k in ("response_format", "json_schema", "guided", "grammar"))
        ):
            self._schema_ok = False
            raise SchemaUnsupportedError(
                f"{self.base_url} refused response_format ({text}); "
                "falling back to prompt-and-parse"
            )
        if status in (401, 403):
            raise BackendError(
                f"{self.base_url} refused the request (HTTP {status}: {text}); "
                f"set {env_name('openai_api_key')} or OPENAI_API_KEY"
            )
        stated = _CONTEXT_LIMIT.search(text)
        if status in (400, 413, 422) and (stated or any(w in lower for w in _CONTEXT_WORDS)):
            if stated:
                self._context_tokens = int(stated[1])
            raise ContextLengthError(
                f"{self.base_url}: the prompt does not fit the model's context "
                f"(HTTP {status}: {text})",
                limit=self._context_tokens,
            )
        if status != 404 and 400 <= status < 500:
            raise ModelRefusedError(f"{self.base_url} refused the request (HTTP {status}: {text})")


def _error_text(response: httpx.Response) -> str:
    """The error message of a response body (OpenAI ``{"error": {"message"}}`` or text)."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:500]
    if isinstance(body, dict):
        err = body.get("error", body.get("detail", body))
        if isinstance(err, dict):
            return str(err.get("message") or err)[:500]
        return str(err)[:500]
    return str(body)[:500]


def from_spec(rest: str) -> OpenAIBackend:
    """Entry point of the ``openai`` scheme (``medloupe.vlm_backends``)."""
    return OpenAIBackend.from_spec(rest)
