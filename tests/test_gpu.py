"""The CUDA paths: the transformers backend in bf16, SAM on the GPU, a CLIP image embedder and the
FAISS index moved to the GPU, each against the same computation on the CPU.

Marked ``gpu``; each test skips with the reason where torch sees no CUDA device (or, for FAISS,
where the installed faiss build sees no GPU: ``pip install 'medloupe[gpu]'``)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from medloupe.knowledge_base.index import faiss_gpus

pytestmark = pytest.mark.gpu


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


needs_cuda = pytest.mark.skipif(not _cuda(), reason="torch sees no CUDA device")


@needs_cuda
def test_transformers_backend_runs_in_bf16_on_cuda(tmp_path: Path) -> None:
    import torch

    from medloupe.agents.hf_backend import TransformersBackend
    from medloupe.agents.protocol import ChatMessage, ImagePart, TextPart
    from medloupe.artifacts import ArtifactStore
    from medloupe.testing.tiny_model import build_tiny_qwen2_5_vl

    backend = TransformersBackend(str(build_tiny_qwen2_5_vl(tmp_path / "tiny")))
    assert not backend.loaded
    store = ArtifactStore(tmp_path / "store")
    rng = np.random.default_rng(0)
    aid = store.put_png(rng.integers(0, 255, (300, 240, 3), dtype=np.uint8))
    msgs = [ChatMessage(role="user", content=[ImagePart(artifact=aid), TextPart(text="Look.")])]
    comp = asyncio.run(backend.complete(msgs, store=store, max_tokens=8))
    model = backend._model
    assert model.device.type == "cuda" and model.dtype == torch.bfloat16
    assert comp.usage.prompt_tokens > 0 and 1 <= comp.usage.completion_tokens <= 8


@needs_cuda
def test_sam_masks_on_cuda_match_the_cpu(tmp_path: Path) -> None:
    import torch

    from medloupe.tools.sam import SamEngine, SamModelSpec, build_sam_model

    spec = SamModelSpec("sam_tiny", 32, 2, 2, (1,), None)
    torch.manual_seed(0)
    ckpt = tmp_path / "sam_tiny.pth"
    torch.save(build_sam_model(spec).state_dict(), ckpt)
    yy, xx = np.mgrid[:120, :160]
    img = np.full((120, 160, 3), 40, np.uint8)
    img[(yy - 60) ** 2 + (xx - 80) ** 2 <= 900] = 200
    box = (40, 20, 120, 100)
    gpu = SamEngine(spec, checkpoint=ckpt, device="cuda").set_image(img).predict(boxes=[box])[0]
    cpu = SamEngine(spec, checkpoint=ckpt, device="cpu").set_image(img).predict(boxes=[box])[0]
    inter = np.logical_and(gpu.mask, cpu.mask).sum()
    union = max(int(np.logical_or(gpu.mask, cpu.mask).sum()), 1)
    assert inter / union >= 0.98
    assert abs(gpu.score - cpu.score) < 1e-3


@needs_cuda
def test_clip_image_embedder_on_cuda_matches_the_cpu(tmp_path: Path) -> None:
    from medloupe.knowledge_base.image_embedders import ClipImageEmbedder
    from tests.kb_docs import write_tiny_clip

    write_tiny_clip(tmp_path)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(5)]
    on_gpu = ClipImageEmbedder(str(tmp_path))
    vg = on_gpu.encode_images(images)
    assert on_gpu._model.device.type == "cuda"
    vc = ClipImageEmbedder(str(tmp_path), device="cpu").encode_images(images)
    assert vg.shape == vc.shape == (5, 24)
    np.testing.assert_allclose(vg, vc, atol=1e-4)


@needs_cuda
def test_backbone_image_embedder_on_cuda_matches_the_cpu() -> None:
    from medloupe.knowledge_base.image_embedders import BackboneImageEmbedder

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (90 + 20 * i, 120, 3), dtype=np.uint8) for i in range(4)]
    on_gpu = BackboneImageEmbedder()
    vg = on_gpu.encode_images(images)
    assert next(on_gpu._net.parameters()).device.type == "cuda"
    vc = BackboneImageEmbedder(device="cpu").encode_images(images)
    assert vg.shape == vc.shape == (4, 1280)
    np.testing.assert_allclose(vg, vc, atol=2e-3)  # TF32 convolutions on the GPU


@pytest.mark.skipif(
    not faiss_gpus(), reason="the installed faiss sees no GPU (pip install 'medloupe[gpu]')"
)
@pytest.mark.parametrize("n", [5_000, 60_000])
def test_faiss_index_on_the_gpu_finds_what_the_cpu_finds(n: int) -> None:
    import faiss

    from medloupe.knowledge_base.index import APPROX_MIN_VECTORS, build_faiss_index, to_device

    rng = np.random.default_rng(n)
    dim = 64
    centers = rng.standard_normal((200, dim)).astype(np.float32)
    vecs = centers[rng.integers(0, 200, n)] + 0.3 * rng.standard_normal((n, dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    queries = vecs[rng.choice(n, 100, replace=False)] + 0.05 * rng.standard_normal(
        (100, dim)
    ).astype(np.float32)
    cpu = build_faiss_index(vecs).index
    gpu = to_device(cpu)
    assert "Gpu" in type(gpu).__name__ or "Gpu" in type(faiss.downcast_index(gpu)).__name__
    assert (n >= APPROX_MIN_VECTORS) == ("IVF" in type(cpu).__name__)
    dc, ic = cpu.search(queries, 10)
    dg, ig = gpu.search(queries, 10)
    same = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ic, ig, strict=True)])
    assert same >= 0.99, same
    np.testing.assert_allclose(dg, dc, atol=1e-4)
