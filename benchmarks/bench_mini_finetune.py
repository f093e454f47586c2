"""Does fine-tuning EfficientNet-Lite0 help medloupe-mini's yes/no questions? 5 folds by
training image (VQA-RAD train split, and SLAKE's English train split; dev.jsonl images left
out), an MLP over ``[pooled image features, question embedding, source]`` trained with the
backbone frozen, with its last stages (blocks 11-15 + head conv) fine-tuned, or all of it
fine-tuned (lr 1e-4, batch-norm statistics kept, mild crop/rotation/contrast augmentation,
no flips), for VQA-RAD alone and with SLAKE's images added. Out-of-fold accuracy per epoch,
against a question-only MLP, to BENCHMARKS.md.

Fine-tuning on two CPU cores would not fit the 30-minute training budget, so this is a GPU
benchmark (it runs on the CPU too, slowly). The data travel as a small folder:

    .venv/bin/python benchmarks/bench_mini_finetune.py --prepare DIR   # here, from ../shared
    python benchmarks/bench_mini_finetune.py --data DIR                # on the GPU machine
"""

from __future__ import annotations

import argparse
import copy
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "datasets"
SOURCES = ("vqa_rad", "slake")
TOP = (*(f"_blocks.{i}." for i in range(11, 16)), "_conv_head", "_bn1")


def prepare(out: Path) -> None:
    """Write ``{source}.npz`` (images 256x256 RGB uint8, question embeddings, yes, image index,
    fold) and ``lite0.pth`` (the ImageNet weights) into ``out``."""
    from PIL import Image

    from medloupe.knowledge_base.backbone import weights_path
    from medloupe.knowledge_base.embedders import TextEmbedder
    from medloupe.mini.answerer import plain_yes_no
    from medloupe.mini.data import fold, training_examples

    out.mkdir(parents=True, exist_ok=True)
    text = TextEmbedder()
    examples = training_examples(DATA)
    for src in SOURCES:
        ex = [e for e in examples if e.source == src and plain_yes_no(e.question, e.answer)]
        images = sorted({e.image for e in ex})
        where = {p: i for i, p in enumerate(images)}
        pixels = np.stack(
            [
                np.asarray(
                    Image.open(p).convert("RGB").resize((256, 256), Image.Resampling.BILINEAR)
                )
                for p in images
            ]
        )
        np.savez_compressed(
            out / f"{src}.npz",
            imgs=pixels,
            q=text.encode([e.question for e in ex]).astype(np.float16),
            yes=np.array([e.answer == "yes" for e in ex]),
            img_of=np.array([where[e.image] for e in ex]),
            folds=np.array([fold(e.image, 5) for e in ex]),
        )
        print(f"{src}: {len(ex)} yes/no questions on {len(images)} images")
    shutil.copy(weights_path(), out / "lite0.pth")


class Runner:
    def __init__(self, data: Path, epochs: int) -> None:
        import torch

        from medloupe.knowledge_base import backbone

        if (data / "lite0.pth").exists():
            backbone.weights_path = lambda: str(data / "lite0.pth")  # type: ignore[assignment]
        self.torch = torch
        self.dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.epochs = epochs
        self.base = backbone.build_backbone()
        self.data: dict[str, dict[str, Any]] = {}
        for i, src in enumerate(SOURCES):
            d = np.load(data / f"{src}.npz")
            t = {k: torch.from_numpy(d[k]).to(self.dev) for k in ("imgs", "img_of")}
            t["q"] = torch.from_numpy(d["q"].astype(np.float32)).to(self.dev)
            t["yes"] = torch.from_numpy(d["yes"].astype(np.float32)).to(self.dev)
            self.data[src] = t | {"folds": d["folds"], "src": i}

    def inputs(self, u8: Any, train: bool, gen: Any) -> Any:
        """``(B, 256, 256, 3)`` uint8 -> ``(B, 3, 224, 224)`` scaled as the backbone wants;
        for training a random crop (80-100 %), rotation (+-8 degrees) and contrast."""
        torch = self.torch
        from torch.nn import functional as F

        x = (u8.permute(0, 3, 1, 2).float() - 127.0) / 128.0
        if not train:
            return F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)
        b = x.shape[0]

        def uniform(lo: float, hi: float, *shape: int) -> Any:
            return torch.empty(*shape, device=self.dev).uniform_(lo, hi, generator=gen)

        scale, angle = uniform(0.8, 1.0, b), uniform(-8.0, 8.0, b) * math.pi / 180
        theta = torch.zeros(b, 2, 3, device=self.dev)
        theta[:, 0, 0] = theta[:, 1, 1] = scale * torch.cos(angle)
        theta[:, 0, 1], theta[:, 1, 0] = -scale * torch.sin(angle), scale * torch.sin(angle)
        theta[:, 0, 2], theta[:, 1, 2] = (
            uniform(-1, 1, b) * (1 - scale),
            uniform(-1, 1, b) * (1 - scale),
        )
        grid = F.affine_grid(theta, [b, 3, 224, 224], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return x * uniform(0.9, 1.1, b, 1, 1, 1) + uniform(-0.1, 0.1, b, 1, 1, 1)

    def model(self, mode: str) -> Any:
        torch = self.torch
        from torch import nn

        class Model(nn.Module):
            def __init__(self, net: Any) -> None:
                super().__init__()
                self.net = net
                self.mlp = nn.Sequential(
                    nn.Linear(1280 + 384 + 2, 256), nn.ReLU(), nn.Dropout(0.3), nn.Linear(256, 1)
                )

            def forward(self, x: Any, q: Any, src: Any) -> Any:
                one_hot = nn.functional.one_hot(src, 2).float()
                return self.mlp(torch.cat([self.net.features(x), q, one_hot], 1))[:, 0]

        m = Model(copy.deepcopy(self.base))
        for name, p in m.net.named_parameters():
            p.requires_grad = mode == "full" or (mode == "top" and name.startswith(TOP))
        return m.to(self.dev)

    def cross_validate(self, src: str, mode: str, joint: bool) -> np.ndarray:
        """Out-of-fold logits ``(epochs, N)`` for ``src``'s yes/no questions."""
        torch = self.torch
        from torch import nn
        from torch.nn import functional as F

        d = self.data[src]
        oof = np.zeros((self.epochs, len(d["yes"])), np.float32)
        for f in range(5):
            torch.manual_seed(f)
            gen = torch.Generator(device=self.dev)
            gen.manual_seed(f)
            pools = [(d, np.flatnonzero(d["folds"] != f))]
            if joint:
                other = self.data[SOURCES[1 - d["src"]]]
                pools.append((other, np.arange(len(other["yes"]))))
            items = [(k, i) for k, (_, idx) in enumerate(pools) for i in idx]
            model = self.model(mode)
            groups = [{"params": list(model.mlp.parameters()), "lr": 1e-3}]
            trainable = [p for p in model.net.parameters() if p.requires_grad]
            if trainable:
                groups.append({"params": trainable, "lr": 1e-4})
            opt = torch.optim.AdamW(groups, weight_decay=1e-4)
            sched = torch.optim.lr_scheduler.OneCycleLR(
                opt,
                max_lr=[g["lr"] for g in groups],
                total_steps=self.epochs * math.ceil(len(items) / 32),
                pct_start=0.1,
            )
            rng = np.random.default_rng(f)
            test = np.flatnonzero(d["folds"] == f)
            for epoch in range(self.epochs):
                model.train()
                for m in model.modules():
                    if isinstance(m, nn.BatchNorm2d):
                        m.eval()  # keep the ImageNet statistics
                order = rng.permutation(len(items))
                for start in range(0, len(order), 32):
                    batch = [items[j] for j in order[start : start + 32]]
                    xs, qs, ys, ss = [], [], [], []
                    for k, (pool, _) in enumerate(pools):
                        ii = torch.tensor([i for kk, i in batch if kk == k], device=self.dev)
                        if len(ii):
                            xs.append(self.inputs(pool["imgs"][pool["img_of"][ii]], True, gen))
                            qs.append(pool["q"][ii])
                            ys.append(pool["yes"][ii])
                            ss.append(torch.full((len(ii),), pool["src"], device=self.dev))
                    logit = model(torch.cat(xs), torch.cat(qs), torch.cat(ss))
                    loss = F.binary_cross_entropy_with_logits(logit, torch.cat(ys))
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    sched.step()
                model.eval()
                with torch.inference_mode():
                    for start in range(0, len(test), 128):
                        ii = torch.from_numpy(test[start : start + 128]).to(self.dev)
                        x = self.inputs(d["imgs"][d["img_of"][ii]], False, None)
                        src_t = torch.full((len(ii),), d["src"], device=self.dev)
                        out = model(x, d["q"][ii], src_t).float().cpu().numpy()
                        oof[epoch, test[start : start + 128]] = out
        return oof

    def question_only(self, src: str) -> np.ndarray:
        torch = self.torch
        from torch import nn
        from torch.nn import functional as F

        d = self.data[src]
        oof = np.zeros(len(d["yes"]), np.float32)
        for f in range(5):
            torch.manual_seed(f)
            tr = torch.from_numpy(np.flatnonzero(d["folds"] != f)).to(self.dev)
            te = np.flatnonzero(d["folds"] == f)
            mlp = nn.Sequential(
                nn.Linear(384, 256), nn.ReLU(), nn.Dropout(0.3), nn.Linear(256, 1)
            ).to(self.dev)
            opt = torch.optim.AdamW(mlp.parameters(), lr=1e-3, weight_decay=1e-4)
            for _ in range(40):
                mlp.train()
                perm = tr[torch.randperm(len(tr), device=self.dev)]
                for start in range(0, len(perm), 32):
                    b = perm[start : start + 32]
                    loss = F.binary_cross_entropy_with_logits(mlp(d["q"][b])[:, 0], d["yes"][b])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
            mlp.eval()
            with torch.no_grad():
                q = d["q"][torch.from_numpy(te).to(self.dev)]
                oof[te] = mlp(q)[:, 0].cpu().numpy()
        return oof


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prepare", type=Path, help="write the data folder from ../shared")
    parser.add_argument("--data", type=Path, help="a folder --prepare wrote")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--sources", default="vqa_rad,slake")
    args = parser.parse_args()
    if args.prepare:
        prepare(args.prepare)
        return
    if not args.data:
        parser.error("give --prepare DIR (here) or --data DIR (a prepared folder)")
    from bench_report import append_section, machine

    run = Runner(args.data, args.epochs)
    rows = []
    for src in args.sources.split(","):
        yes = run.data[src]["yes"].cpu().numpy().astype(bool)
        acc = float(((run.question_only(src) > 0) == yes).mean())
        rows.append((f"{src}: question only", f"{acc:.3f}", "MLP on the question embedding"))
        print(rows[-1], flush=True)
        for mode, joint in (("frozen", False), ("top", False), ("full", False), ("full", True)):
            t = time.time()
            oof = run.cross_validate(src, mode, joint)
            per_epoch = [float(((o > 0) == yes).mean()) for o in oof]
            name = f"{src}: backbone {mode}" + (" + the other source's images" if joint else "")
            rows.append(
                (
                    name,
                    f"{per_epoch[-1]:.3f} (best epoch {max(per_epoch):.3f})",
                    "per epoch " + " ".join(f"{a:.3f}" for a in per_epoch)
                    + f"; {time.time() - t:.0f} s",
                )
            )  # fmt: skip
            print(rows[-1], flush=True)
    gpu = run.torch.cuda.get_device_name() if run.dev.type == "cuda" else "CPU"
    append_section(
        "medloupe-mini yes/no: frozen vs fine-tuned EfficientNet-Lite0 (5 folds by image)",
        rows,
        columns=("model", "out-of-fold accuracy, last epoch", "notes"),
        context=machine(f"{gpu}, torch {run.torch.__version__}"),
        note=(
            f"Yes/no questions of the training splits (dev.jsonl images left out), {args.epochs} "
            "epochs, one-cycle lr (1e-3 MLP, 1e-4 backbone), batch 32, seed = fold; the best "
            "epoch is chosen on the test folds themselves, so it is an optimistic bound."
        ),
    )


if __name__ == "__main__":
    main()
