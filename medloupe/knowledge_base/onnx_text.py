"""An int8 ONNX Runtime copy of a sentence-transformers text model, for fast CPU embedding.

The model's transformer is exported to ONNX (eager attention, so ONNX Runtime's BERT optimiser
fuses attention, embedding and layer norms), then dynamically quantised to int8 with
per-channel weights (VNNI on x86). Pooling (mean or CLS, as the model declares) and L2
normalisation run in NumPy. The export is cached under ``cache_dir`` keyed by the model's
weights, so it runs once per model (a few seconds for MiniLM). Each export is checked against
the PyTorch model on probe sentences before it is used.

Needs ``onnx`` and ``onnxruntime``; :func:`onnx_available` says whether both import.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from medloupe.config import env_name
from medloupe.errors import KnowledgeBaseError

log = logging.getLogger(__name__)

EXPORT_VERSION = 1
#: pooling modes the NumPy side implements
POOLING = ("mean", "cls")
#: an export is used only if every probe embedding has at least this cosine to PyTorch's
MIN_PROBE_COSINE = 0.97
#: architectures whose attention ONNX Runtime's BERT optimiser fuses
_FUSABLE = {"bert", "roberta", "xlm-roberta", "distilbert", "mpnet"}
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
        fused = optimizer.optimize_model(
            str(fp32),
            model_type="bert",
            num_heads=int(config.num_attention_heads),
            hidden_size=int(config.hidden_size),
            opt_level=1,
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


class OnnxTextModel:
    """Embeds text with the int8 ONNX export of a loaded SentenceTransformer ``st``.

    Args:
        st: the loaded model (its tokenizer, pooling and ``max_seq_length`` are used).
        cache_dir: where exports are kept (``<cache_dir>/<key>/model.int8.onnx``).
        threads: ONNX Runtime intra-op threads (default: the CPUs this process may use).

    Raises:
        KnowledgeBaseError: the model's layout is not one the backend handles, the export
            failed, or it disagrees with PyTorch on the probe sentences.
    """

    def __init__(self, st: Any, cache_dir: Path, *, threads: int | None = None) -> None:
        import onnxruntime as ort

        self.pooling = _pooling_mode(st)
        self.tokenizer = st.tokenizer
        self.max_tokens = int(st.max_seq_length)
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
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        reference = st.encode(_PROBES, normalize_embeddings=True, convert_to_numpy=True)
        cosine = float((self.encode_batch(_PROBES) * reference).sum(1).min())
        if cosine < MIN_PROBE_COSINE:
            raise KnowledgeBaseError(
                f"the int8 ONNX export disagrees with the PyTorch model (probe cosine "
                f"{cosine:.3f} < {MIN_PROBE_COSINE}); use the torch text backend"
            )
        self.probe_cosine = cosine

    def encode_batch(self, texts: list[str]) -> np.ndarray:
        """``(len(texts), dim)`` L2-normalised float32 vectors of one batch."""
        enc = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="np"
        )
        feeds = {n: enc[n].astype(np.int64) for n in self.inputs}
        hidden = self.session.run(None, feeds)[0].astype(np.float32)
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = enc["attention_mask"].astype(np.float32)[:, :, None]
            pooled = (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return (pooled / np.maximum(norms, 1e-12)).astype(np.float32)
