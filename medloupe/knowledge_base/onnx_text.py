"""An int8 ONNX Runtime copy of a sentence-transformers text model, for fast CPU embedding.

The model's transformer is exported to ONNX (eager attention), its layer norms and GELUs fused
by ONNX Runtime's BERT optimiser, then dynamically quantised to int8 with per-channel weights
(VNNI on x86). Attention, residual + layer norm and bias + GELU are left unfused
(:data:`UNFUSED_OPS`): ONNX Runtime's fused CPU kernels for them (QAttention,
SkipLayerNormalization, BiasGelu) ran slower than the plain ops, so the unfused export embeds
about 1.27x as fast (interleaved runs, one text per run on one thread, 400 OpenStax
passages: 131 against 103 passages/s) with the same agreement with PyTorch (mean cosine 0.995).
Pooling (mean or CLS, as the model declares) and L2 normalisation run in NumPy. The export
is cached under ``cache_dir`` keyed by the model's weights, so it runs once per model (a few
seconds for MiniLM). Each export is checked against the PyTorch model on probe sentences before
it is used.

Texts are embedded one per run (:meth:`OnnxTextModel.encode`): many texts each on one thread,
as many runs at once as the process has CPUs; a lone text (a query) on every CPU. No padding,
and a text's vector does not depend on what it is embedded with (dynamic quantisation scales
activations per run). On 2 cores, one text per run embedded OpenStax passages (about 150
tokens) about 1.2x as fast as batches of 16 on two intra-op threads did, in interleaved runs.

Needs ``onnx`` and ``onnxruntime``; :func:`onnx_available` says whether both import.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from medloupe.config import env_name
from medloupe.errors import KnowledgeBaseError

log = logging.getLogger(__name__)

EXPORT_VERSION = 2  # 2: attention, skip layer norm and bias GELU left unfused
#: pooling modes the NumPy side implements
POOLING = ("mean", "cls")
#: an export is used only if every probe embedding has at least this cosine to PyTorch's
MIN_PROBE_COSINE = 0.97
#: architectures ONNX Runtime's BERT optimiser handles
_FUSABLE = {"bert", "roberta", "xlm-roberta", "distilbert", "mpnet"}
#: fused operators the export leaves out: their CPU kernels ran slower than the plain ops
UNFUSED_OPS = ("Attention", "QAttention", "SkipLayerNormalization", "BiasGelu")
_PROBES = [
    "The liver is the largest gland of the body.",
    "Pneumothorax: air in the pleural space, with collapse of the lung.",
    "A chest radiograph shows cardiomegaly and bilateral pleural effusions.",
    "The femur articulates with the acetabulum of the hip bone.",
]


def onnx_available() -> bool:
    """Whether ``onnx`` and ``onnxruntime`` can be imported."""
    return all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))


def _pooling_mode(st: Any) -> str:
    """The pooling of a [Transformer, Pooling, (Normalize)] model, else a KnowledgeBaseError."""
    kinds = [type(m).__name__ for m in st]
    if kinds not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
        raise KnowledgeBaseError(
            f"the ONNX text backend handles Transformer + Pooling models; this one is {kinds}"
        )
    mode = str(getattr(st[1], "pooling_mode", ""))
    if mode not in POOLING:
        raise KnowledgeBaseError(f"the ONNX text backend pools by {POOLING}, not {mode!r}")
    return mode


def _weights_key(st: Any) -> str:
    """A digest of the model's weights and config (the cache key of its export)."""
    import onnxruntime

    h = hashlib.sha256(f"{EXPORT_VERSION}:{onnxruntime.__version__}".encode())
    model = st[0].auto_model
    h.update(model.config.to_json_string().encode())
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().flatten()[:1024].float().numpy().tobytes())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(np.float64(tensor.double().sum().item()).tobytes())
    return h.hexdigest()[:16]


def _drop_quantiser_advice(record: logging.LogRecord) -> bool:
    return "pre-processing before quantization" not in record.getMessage()


def _export(st: Any, target: Path) -> None:
    """Write ``model.int8.onnx`` into ``target`` (a fresh folder)."""
    import onnx  # noqa: F401  (quantisation needs it; import errors surface here)
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.fusion_options import FusionOptions

    model = copy.deepcopy(st[0].auto_model).eval().float().cpu()
    model.set_attn_implementation("eager")
    config = model.config
    enc = st.tokenizer(_PROBES[:2], padding=True, return_tensors="pt")
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in enc]

    class Hidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            return self.model(**dict(zip(names, inputs, strict=True))).last_hidden_state

    fp32 = target / "model.onnx"
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Hidden(),
            tuple(enc[n] for n in names),
            str(fp32),
            input_names=names,
            output_names=["hidden"],
            dynamic_axes={**{n: {0: "batch", 1: "tokens"} for n in names}, "hidden": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    source = fp32
    if config.model_type in _FUSABLE:
        fusions = FusionOptions("bert")  # layer norm and GELU fusions only (UNFUSED_OPS)
        fusions.enable_attention = False
        fusions.enable_skip_layer_norm = False
        fusions.enable_bias_skip_layer_norm = False
        fusions.enable_bias_gelu = False
        fused = optimizer.optimize_model(
            str(fp32),
            model_type="bert",
            num_heads=int(config.num_attention_heads),
            hidden_size=int(config.hidden_size),
            opt_level=1,
            optimization_options=fusions,
        )
        source = target / "model.fused.onnx"
        fused.save_model_to_file(str(source))
    root = logging.getLogger()  # the quantiser logs generic advice on the root logger
    root.addFilter(_drop_quantiser_advice)
    try:
        quantize_dynamic(
            str(source),
            str(target / "model.int8.onnx"),
            weight_type=QuantType.QInt8,
            per_channel=True,
            extra_options={"DefaultTensorType": 1},  # float, for the fused ops' outputs
        )
    finally:
        root.removeFilter(_drop_quantiser_advice)
    for f in (fp32, target / "model.fused.onnx"):
        f.unlink(missing_ok=True)


def _configured(tokenizer: Any, max_tokens: int | None, side: str = "right") -> Any:
    """A copy of a ``tokenizers.Tokenizer`` that pads nothing and truncates to ``max_tokens``
    (``None``: never) on ``side``, as sentence-transformers calls it."""
    from tokenizers import Tokenizer

    copy_ = Tokenizer.from_str(tokenizer.to_str())
    copy_.no_padding()
    if max_tokens is None:
        copy_.no_truncation()
    else:
        copy_.enable_truncation(max_tokens, direction=side)
    return copy_


#: the export's inputs -> the attribute of a ``tokenizers.Encoding`` that feeds each
_ENCODING = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}


def _tokenizer_file(source: Path) -> Any:
    """``source/tokenizer.json`` as a ``tokenizers.Tokenizer``; None if absent or unreadable."""
    from tokenizers import Tokenizer

    path = source / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001  (tokenizers raises a bare Exception on bad JSON)
        log.warning("ignoring %s: it does not load (%s)", path, exc)
        return None


def source_key(folder: Path) -> str:
    """A digest of a local model folder's files (names and bytes; hidden files and the
    ``onnx``/``openvino`` copies other backends use are left out), with the export version and
    ONNX Runtime's: the key of a verified export's record (:meth:`OnnxTextModel.from_folder`)."""
    import onnxruntime

    h = hashlib.sha256(f"{EXPORT_VERSION}:{onnxruntime.__version__}".encode())
    for f in sorted(folder.rglob("*")):
        rel = f.relative_to(folder)
        if (
            not f.is_file()
            or rel.parts[0] in ("onnx", "openvino")
            or any(part.startswith(".") for part in rel.parts)
        ):
            continue
        h.update(rel.as_posix().encode())
        with f.open("rb") as fh:
            h.update(hashlib.file_digest(fh, "sha256").digest())
    return h.hexdigest()[:16]


class OnnxTextModel:
    """Embeds text with the int8 ONNX export of a sentence-transformers model.

    Made by :meth:`from_sentence_transformer` (exports if needed and checks the export against
    PyTorch) or :meth:`from_folder` (a model folder whose export was checked before: neither
    PyTorch nor sentence-transformers is imported).

    Args:
        path: the export (``model.int8.onnx``).
        tokenizer: the model's ``tokenizers.Tokenizer`` (copied; padding and truncation set
            here).
        pooling: ``mean`` or ``cls``.
        max_tokens: the model's ``max_seq_length``; longer texts are truncated.
        truncation_side: the side longer texts lose (the tokenizer's ``truncation_side``).
        dim: the vector size.
        workers: texts embedded at once by :meth:`encode`, each run on one ONNX Runtime
            thread, and the threads of a lone text's run (default: the CPUs this process may
            use).
    """

    def __init__(
        self,
        path: Path,
        tokenizer: Any,
        *,
        pooling: str,
        max_tokens: int,
        dim: int,
        truncation_side: str = "right",
        workers: int | None = None,
    ) -> None:
        self.path = path
        self.tokenizer = _configured(tokenizer, max_tokens, truncation_side)
        self.truncation_side = truncation_side
        self._counter = _configured(tokenizer, None)
        self.pooling = pooling
        self.max_tokens = max_tokens
        self.dim = dim
        self.workers = workers or len(os.sched_getaffinity(0))
        self.session = self._session(self.workers)  # a lone text (a query): every CPU on it
        self.inputs = [i.name for i in self.session.get_inputs()]
        self._bulk: Any = None  # many texts: one thread a run, :attr:`workers` runs at once
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self.probe_cosine = float("nan")  # to PyTorch, set once checked
        self._probes: np.ndarray | None = None  # the probes' vectors, once checked

    @classmethod
    def from_sentence_transformer(
        cls, st: Any, cache_dir: Path, *, workers: int | None = None
    ) -> OnnxTextModel:
        """The export of a loaded SentenceTransformer ``st`` (made once into
        ``<cache_dir>/<weights key>/``), checked against ``st`` on probe sentences.

        Raises:
            KnowledgeBaseError: the model's layout is not one the backend handles, the export
                failed, or it disagrees with PyTorch on the probe sentences.
        """
        pooling = _pooling_mode(st)
        folder = cache_dir / _weights_key(st)
        path = folder / "model.int8.onnx"
        if not path.exists():
            log.info("exporting the text embedder to int8 ONNX (once, into %s)", folder)
            folder.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".export.", dir=folder.parent))
            try:
                _export(st, tmp)
                os.replace(tmp, folder)
            except OSError as exc:
                if not path.exists():  # a concurrent export that won the rename is fine
                    raise KnowledgeBaseError(
                        f"could not write the ONNX export into {folder} ({exc}); "
                        f"set {env_name('cache')} to a writable folder"
                    ) from None
            except (RuntimeError, ValueError, TypeError, AttributeError, ImportError) as exc:
                raise KnowledgeBaseError(
                    f"exporting the text embedder to ONNX failed ({type(exc).__name__}: {exc}); "
                    "use the torch text backend"
                ) from exc
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        model = cls(
            path,
            st.tokenizer.backend_tokenizer,
            pooling=pooling,
            max_tokens=int(st.max_seq_length),
            dim=int(st[0].auto_model.config.hidden_size),
            truncation_side=str(st.tokenizer.truncation_side),
            workers=workers,
        )
        reference = st.encode(_PROBES, normalize_embeddings=True, convert_to_numpy=True)
        probes = model._probe_vectors()
        cosine = float((probes * reference).sum(1).min())
        if cosine < MIN_PROBE_COSINE:
            raise KnowledgeBaseError(
                f"the int8 ONNX export disagrees with the PyTorch model (probe cosine "
                f"{cosine:.3f} < {MIN_PROBE_COSINE}); use the torch text backend"
            )
        model.probe_cosine, model._probes = cosine, probes
        return model

    def remember(self, source: Path, cache_dir: Path) -> bool:
        """Record that the model in the local folder ``source`` has this checked export, so
        :meth:`from_folder` can load it without PyTorch. Only where the folder's
        ``tokenizer.json`` is the tokenizer in use; returns whether it was recorded."""
        on_disk = _tokenizer_file(source)
        if self._probes is None:
            raise ValueError("only an export checked against PyTorch can be remembered")
        if on_disk is None or _configured(on_disk, None).to_str() != self._counter.to_str():
            log.debug("no fast start for %s: tokenizer.json differs from the tokenizer", source)
            return False
        record = {
            "export": self.path.parent.name,
            "pooling": self.pooling,
            "max_tokens": self.max_tokens,
            "dim": self.dim,
            "truncation_side": self.truncation_side,
            "probe_cosine": self.probe_cosine,
            "probes": self._probes.round(6).tolist(),
        }
        target = cache_dir / "sources" / f"{source_key(source)}.json"
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(record))
            os.replace(tmp, target)
        except OSError as exc:
            log.debug("could not record the fast start for %s (%s)", source, exc)
            return False
        return True

    @classmethod
    def from_folder(
        cls, source: Path, cache_dir: Path, *, workers: int | None = None
    ) -> OnnxTextModel | None:
        """The checked export of the model in the local folder ``source``, loaded with its
        ``tokenizer.json`` alone; ``None`` where none was recorded (:meth:`remember`) for
        these very files, or where the export no longer gives the recorded probe vectors."""
        target = cache_dir / "sources" / f"{source_key(source)}.json"
        try:
            record = json.loads(target.read_text())
            path = cache_dir / str(record["export"]) / "model.int8.onnx"
            tokenizer = _tokenizer_file(source)
            if not path.is_file() or tokenizer is None:
                return None
            model = cls(
                path,
                tokenizer,
                pooling=str(record["pooling"]),
                max_tokens=int(record["max_tokens"]),
                dim=int(record["dim"]),
                truncation_side=str(record["truncation_side"]),
                workers=workers,
            )
            expected = np.asarray(record["probes"], np.float32)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, KnowledgeBaseError) as exc:
            log.warning("ignoring the fast-start record %s (%s)", target, exc)
            return None
        probes = model._probe_vectors()
        if float((probes * expected).sum(1).min()) < 0.999:
            log.warning("the export in %s no longer gives its probe vectors", path.parent)
            return None
        model.probe_cosine, model._probes = float(record["probe_cosine"]), probes
        return model

    def _probe_vectors(self) -> np.ndarray:
        """The probe sentences' vectors, each embedded alone as a query is: a process that
        only queries starts no pool (a text's vector is the same whichever session runs it)."""
        return np.concatenate([self.encode([p]) for p in _PROBES])

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text``, special tokens included, untruncated."""
        return len(self._counter.encode(text).ids)

    def encode(self, texts: list[str]) -> np.ndarray:
        """``(len(texts), dim)`` L2-normalised float32 vectors, in order: the texts are
        tokenised together here, then run one per run, :attr:`workers` runs at once (ONNX
        Runtime releases the GIL while it runs; the tokenizer is used by this thread only).
        A lone text runs on every CPU."""
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        encodings = self.tokenizer.encode_batch(texts)
        feeds = [
            {n: np.asarray([getattr(e, _ENCODING[n])], np.int64) for n in self.inputs}
            for e in encodings
        ]
        if self.workers == 1 or len(texts) == 1:
            return np.concatenate([self._run(self.session, f) for f in feeds])
        with self._pool_lock:
            if self._pool is None:
                self._bulk = self._session(1)
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="onnx-text")
        bulk = self._bulk
        return np.concatenate(list(self._pool.map(lambda f: self._run(bulk, f), feeds)))

    def _session(self, threads: int) -> Any:
        """An ONNX Runtime session of the export whose runs use ``threads`` threads."""
        import onnxruntime as ort
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        try:
            return ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except (ort_errors.InvalidProtobuf, ort_errors.InvalidGraph, ort_errors.Fail) as exc:
            raise KnowledgeBaseError(
                f"the cached ONNX export {self.path} does not load ({exc}); delete "
                f"{self.path.parent} to export it again"
            ) from None

    def _run(self, session: Any, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """The ``(1, dim)`` pooled, normalised vector of one text's unpadded inputs."""
        hidden = session.run(None, feeds)[0].astype(np.float32)
        pooled = hidden[:, 0] if self.pooling == "cls" else hidden.mean(1)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return (pooled / np.maximum(norms, 1e-12)).astype(np.float32)
