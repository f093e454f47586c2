"""A VLM backend that runs a transformers image-text-to-text model in process.

Spec: ``hf:HUB_ID`` or ``hf:/path/to/model`` — any checkpoint that ``AutoProcessor`` and
``AutoModelForImageTextToText`` load and whose processor has a chat template (Qwen2.5-VL,
Qwen3-VL, MedGemma, SmolVLM, LLaVA families).

- Weights load lazily, on the first request, never at construction or import.
- CUDA in bfloat16 when a GPU is present, else CPU in float32 (``Settings.hf_device``
  overrides: ``cpu``, ``cuda``, ``cuda:1``).
- Images are downscaled to the processor's ``max_pixels`` (or
  ``Settings.vlm_max_image_pixels``).
- Generation is serialised per model: every ``generate`` runs on the model's one generation
  thread (requests queue), whichever thread or event loop asked. On CUDA, generating from
  a different thread per request cost 2-4x the time of one thread (tiny model on an H100:
  5.9 vs 9.5 requests/s with 4 concurrent callers); preparing the inputs stays in the caller's
  thread.
- JSON-schema-constrained decoding through xgrammar when it is installed; otherwise the
  schema is spelled out in the prompt and the reply parsed (see :mod:`.structured`).
- Offline (``HF_HUB_OFFLINE=1``) or without network, a hub id whose weights are not in the
  local cache fails with :class:`~medloupe.errors.ModelNotFoundError` saying how to provide it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from medloupe.agents.images import DEFAULT_MAX_IMAGE_PIXELS, model_image
from medloupe.agents.messages import ChatMessage, Completion, ImagePart, Usage
from medloupe.agents.protocol import ModelProfile, VLMBackend
from medloupe.artifacts import ArtifactStore
from medloupe.config import Settings, hub_offline
from medloupe.device import torch_device
from medloupe.errors import BackendError, BackendSpecError, ModelNotFoundError
from medloupe.progress import silence_hub_progress

log = logging.getLogger(__name__)


def xgrammar_available() -> bool:
    """Whether xgrammar (JSON-schema-constrained decoding) can be imported."""
    try:
        import xgrammar  # noqa: F401
    except ImportError:
        return False
    return True


class TransformersBackend(VLMBackend):
    """A transformers vision-language model, loaded on first use.

    Args:
        model: a hub id or a local folder.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``; default CUDA when available.
        max_image_pixels: cap on each image (default: the processor's ``max_pixels``, else
            about 1 MP).
        constrained: use xgrammar for schema-constrained decoding when installed.
    """

    def __init__(
        self,
        model: str,
        *,
        device: str | None = None,
        max_image_pixels: int | None = None,
        constrained: bool = True,
    ) -> None:
        if not model:
            raise BackendSpecError("hf backend spec needs a model: hf:HUB_ID or hf:/path")
        self.model_id = model
        self.device_name = device
        self._max_image_pixels = max_image_pixels
        self._constrained = constrained and xgrammar_available()
        self._load_lock = threading.Lock()
        # one thread generates (a thread is started on the first request, not here)
        self._generator = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"medloupe-generate-{Path(model).name}"
        )
        self._model: Any = None
        self._processor: Any = None
        self._grammar_compiler: Any = None
        self._grammars: dict[str, Any] = {}

    @classmethod
    def from_spec(cls, rest: str) -> TransformersBackend:
        """Build from the part of a spec after ``hf:``; checks (without loading) that the
        weights can be found: a local folder exists, or offline, the hub id is cached."""
        settings = Settings.from_env()
        backend = cls(
            rest, device=settings.hf_device, max_image_pixels=settings.vlm_max_image_pixels
        )
        backend.check()
        return backend

    def check(self) -> None:
        """Cheap early check that the weights can be found (nothing is loaded).

        Raises:
            ModelNotFoundError: a path that is not a folder, or offline and not in the cache.
        """
        local = Path(self.model_id).expanduser()
        if local.is_dir():
            if not (local / "config.json").is_file():
                raise ModelNotFoundError(
                    f"{self.model_id!r} has no config.json; pass the folder a transformers "
                    "model was saved to (save_pretrained) or a hub id"
                )
            return
        if self.model_id.startswith(("/", ".", "~")) or local.exists():
            raise ModelNotFoundError(
                f"model folder {self.model_id!r} does not exist; pass a folder holding "
                "config.json, the weights and the processor files, or a hub id"
            )
        if hub_offline():
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(self.model_id, "config.json")
            if not isinstance(cached, str):
                raise ModelNotFoundError(self._missing_message("not in the local cache"))

    @property
    def spec(self) -> str:
        return f"hf:{self.model_id}"

    @property
    def profile(self) -> ModelProfile:
        """Schema-constrained with xgrammar; crops zoomed to the side of a square image at
        the processor's pixel cap."""
        return ModelProfile(
            supports_schema=self._constrained,
            preferred_image_side=int(self.max_image_pixels**0.5),
        )

    @property
    def loaded(self) -> bool:
        return self._model is not None

    @property
    def max_image_pixels(self) -> int:
        if self._max_image_pixels:
            return self._max_image_pixels
        proc = getattr(self._processor, "image_processor", None)
        cap = getattr(proc, "max_pixels", None) or (getattr(proc, "size", None) or {}).get(
            "longest_edge"
        )
        return int(cap) if cap else DEFAULT_MAX_IMAGE_PIXELS

    # --- loading --------------------------------------------------------------------------

    def load(self) -> None:
        """Load processor and weights now (thread-safe; a no-op when loaded)."""
        with self._load_lock:
            if self._model is not None:
                return
            import torch
            from transformers import AutoModelForImageTextToText, AutoProcessor

            self.check()
            silence_hub_progress()
            local = Path(self.model_id).expanduser()
            source = str(local) if local.is_dir() else self.model_id
            device = torch_device(self.device_name)
            dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
            kwargs: dict[str, Any] = {"local_files_only": hub_offline() or local.is_dir()}
            try:
                processor = AutoProcessor.from_pretrained(source, **kwargs)
                model = AutoModelForImageTextToText.from_pretrained(source, dtype=dtype, **kwargs)
            except OSError as exc:
                raise ModelNotFoundError(self._missing_message(exc)) from None
            model = model.to(device).eval()  # type: ignore[arg-type]
            if getattr(processor, "chat_template", None) is None:
                raise BackendError(
                    f"{self.model_id}: the processor has no chat template; medloupe renders "
                    "prompts with the model's own template (use an instruction-tuned checkpoint)"
                )
            self._processor, self._model = processor, model
            log.info("loaded %s on %s (%s)", self.model_id, device, dtype)

    def _missing_message(self, exc: object) -> str:
        where = (
            "HF_HUB_OFFLINE=1 is set, so only the local cache is searched"
            if hub_offline()
            else "the hub could not be reached or does not have it"
        )
        return (
            f"weights for {self.model_id!r} are not available ({where}; {exc}). Provide them: "
            f"on a machine with network run `hf download {self.model_id}` and copy the cache "
            "(HF_HOME) here, or save the model to a folder and use hf:/path/to/folder"
        )

    def _grammar(self, json_schema: dict[str, Any]) -> Any:
        import xgrammar as xgr

        key = json.dumps(json_schema, sort_keys=True)
        if key not in self._grammars:
            if self._grammar_compiler is None:
                vocab = self._model.get_output_embeddings().weight.shape[0]
                info = xgr.TokenizerInfo.from_huggingface(
                    self._processor.tokenizer, vocab_size=vocab
                )
                self._grammar_compiler = xgr.GrammarCompiler(info)
            self._grammars[key] = self._grammar_compiler.compile_json_schema(
                key, any_whitespace=False
            )
        return self._grammars[key]

    # --- generation -----------------------------------------------------------------------

    def _chat(self, messages: list[ChatMessage], store: ArtifactStore) -> list[dict[str, Any]]:
        out = []
        for m in messages:
            parts: list[dict[str, Any]] = []
            for p in m.content:
                if isinstance(p, ImagePart):
                    img = model_image(store, p.artifact, self.max_image_pixels)
                    parts.append({"type": "image", "image": img})
                else:
                    parts.append({"type": "text", "text": p.text})
            out.append({"role": m.role, "content": parts})
        return out

    def complete_sync(
        self,
        messages: list[ChatMessage],
        *,
        store: ArtifactStore,
        json_schema: dict[str, Any] | None = None,
        max_tokens: int = 512,
        temperature: float = 0.0,
    ) -> Completion:
        """Blocking generation (loads the model on first use); see :meth:`complete`."""
        import torch

        self.load()
        chat = self._chat(messages, store)
        processor, model = self._processor, self._model
        inputs = processor.apply_chat_template(
            chat,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
        )
        kwargs: dict[str, Any] = {"max_new_tokens": max_tokens, "do_sample": temperature > 0}
        if temperature > 0:
            kwargs["temperature"] = temperature
        constrained = json_schema is not None and self._constrained

        def generate() -> Any:
            # on the generation thread: tensors move to the device there, one request at a time
            on_device = inputs.to(model.device)
            for key, value in on_device.items():
                if torch.is_floating_point(value):
                    on_device[key] = value.to(model.dtype)
            if constrained:
                from xgrammar.contrib.hf import LogitsProcessor

                assert json_schema is not None
                kwargs["logits_processor"] = [LogitsProcessor(self._grammar(json_schema))]
            with torch.inference_mode():
                return model.generate(**on_device, **kwargs).cpu()

        out = self._generator.submit(generate).result()
        prompt_len = int(inputs["input_ids"].shape[1])
        new = out[0, prompt_len:]
        eos = model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
        ended = len(new) > 0 and int(new[-1]) in eos_ids
        text = processor.decode(new, skip_special_tokens=True)
        return Completion(
            text=text,
            usage=Usage(prompt_tokens=prompt_len, completion_tokens=len(new)),
            finish_reason="stop" if ended or len(new) < max_tokens else "length",
            model=self.model_id,
            constrained=constrained,
        )

    async def complete(
        self,
        messages: list[ChatMessage],
        *,
        store: ArtifactStore,
        json_schema: dict[str, Any] | None = None,
        max_tokens: int = 512,
        temperature: float = 0.0,
    ) -> Completion:
        """Generate in a worker thread (the event loop stays free)."""
        return await asyncio.to_thread(
            self.complete_sync,
            messages,
            store=store,
            json_schema=json_schema,
            max_tokens=max_tokens,
            temperature=temperature,
        )


def from_spec(rest: str) -> TransformersBackend:
    """Entry point of the ``hf`` scheme (``medloupe.vlm_backends``)."""
    return TransformersBackend.from_spec(rest)
