"""Visual extractor: a torchvision ResNet without its last two children (avgpool, fc).

R2Gen runs the same ResNet on each view in its own forward call (so BatchNorm statistics are per
view in training), turns the last feature map into patch tokens ``(B, h*w, C)`` and average-pools it
into one vector per view. For IU X-Ray the two views' patch tokens are concatenated: at 224 px that
is ``(B, 2*49, 2048)`` with ResNet101.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.utils.checkpoint import checkpoint
from torchvision.models.resnet import BasicBlock, Bottleneck

from r2gen.errors import CheckpointError

# name -> (block, blocks per stage); resnet10 is the same family with one block per stage.
_RESNETS: dict[str, tuple[type[nn.Module], list[int]]] = {
    "resnet10": (BasicBlock, [1, 1, 1, 1]),
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
    "resnet101": (Bottleneck, [3, 4, 23, 3]),
    "resnet152": (Bottleneck, [3, 8, 36, 3]),
}
_IMAGENET_WEIGHTS = {  # torchvision's IMAGENET1K_V1 files, the weights R2Gen's `pretrained=True` loads
    "resnet18": torchvision.models.ResNet18_Weights.IMAGENET1K_V1,
    "resnet34": torchvision.models.ResNet34_Weights.IMAGENET1K_V1,
    "resnet50": torchvision.models.ResNet50_Weights.IMAGENET1K_V1,
    "resnet101": torchvision.models.ResNet101_Weights.IMAGENET1K_V1,
    "resnet152": torchvision.models.ResNet152_Weights.IMAGENET1K_V1,
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_resnet_trunk(name: str, width: int = 64) -> nn.Sequential:
    """The ResNet ``name`` with base width ``width`` (64 = torchvision's), minus avgpool and fc.

    Module names match torchvision's (``0`` = conv1 ... ``7`` = layer4 inside the Sequential), so an
    ImageNet state dict of the full ResNet loads after dropping its ``fc.`` keys.
    """
    block, layers = _RESNETS[name]
    stem = [
        nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
    ]
    stages, inplanes = [], width
    for i, n in enumerate(layers):
        planes, stride = width * 2**i, 1 if i == 0 else 2
        downsample = None
        if stride != 1 or inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        blocks = [block(inplanes, planes, stride, downsample)]
        inplanes = planes * block.expansion
        blocks += [block(inplanes, planes) for _ in range(1, n)]
        stages.append(nn.Sequential(*blocks))
    trunk = nn.Sequential(*stem, *stages)
    # torchvision's ResNet initialisation (kaiming for convs, BN weight 1 / bias 0)
    for m in trunk.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    trunk.out_channels = inplanes  # d_vf: 512 for resnet10/18/34 at width 64, 2048 for resnet50+
    return trunk


def feature_map_side(image_size: int) -> int:
    """Side of the trunk's last feature map for ``image_size`` px inputs (7 at R2Gen's 224).

    The stem's stride-2 conv and max-pool and the three stride-2 stages each give ceil(s / 2), so
    five halvings give ceil(s / 32): an input of 32 px or less ends in a 1x1 map.
    """
    return -(-image_size // 32)


def feature_size(name: str, width: int = 64) -> int:
    block, _ = _RESNETS[name]
    return width * 8 * block.expansion


def imagenet_weights_path(name: str) -> Path:
    """Where torch's hub cache keeps the ImageNet weights of ``name`` (nothing is downloaded)."""
    url = _IMAGENET_WEIGHTS[name].url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def load_pretrained(trunk: nn.Sequential, name: str, width: int, pretrained: str) -> str:
    """Load ImageNet weights into ``trunk``; returns the file used.

    ``pretrained`` is ``"imagenet"`` (torch hub cache only) or a path to a torchvision ResNet
    state dict. A missing file is an error that says where to put it; nothing is downloaded.
    """
    if name not in _IMAGENET_WEIGHTS or width != 64:
        raise CheckpointError(
            f"model.pretrained is set but {name} with visual_width {width} has no ImageNet weights; "
            "use a torchvision ResNet (resnet18..152) with visual_width 64, or set model.pretrained: null"
        )
    path = imagenet_weights_path(name) if pretrained == "imagenet" else Path(pretrained)
    if not path.is_file():
        url = _IMAGENET_WEIGHTS[name].url
        raise CheckpointError(
            f"ImageNet weights not found: {path}; download {url} on a machine with internet and "
            f"put it there (or point model.pretrained at the file), or set model.pretrained: null"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling/IO failure is a bad file for the user
        raise CheckpointError(f"cannot read ImageNet weights {path}: {exc.__class__.__name__}; re-download the file") from None
    # torchvision names (conv1, bn1, layer1..4) -> positions in our Sequential
    rename = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6", "layer4": "7"}
    mapped = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head == "fc":
            continue
        if head not in rename:
            raise CheckpointError(f"{path} is not a torchvision {name} state dict (unexpected key '{key}')")
        mapped[f"{rename[head]}.{rest}"] = value
    missing, unexpected = trunk.load_state_dict(mapped, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match {name}: {len(missing)} missing and {len(unexpected)} unexpected keys; "
            "check model.visual_extractor"
        )
    return str(path)


@contextlib.contextmanager
def _batch_norm_stats_frozen(module: nn.Module):
    """BatchNorm layers of ``module`` normalise with batch statistics and leave their running ones alone.

    For the re-run of a recomputed stage in the backward pass (the forward already updated them):
    momentum 0 makes the update ``0 * batch + 1 * running``, which is ``running`` exactly, and the
    batch counter is put back. The layers keep their running-stat tensors, so the re-run saves the
    same tensors for the backward as the forward did (checkpoint checks that).
    """
    norms = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d) and m.track_running_stats]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, count) in zip(norms, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)


def _conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """``bn(conv(x))`` with BatchNorm's running statistics folded into the convolution's weight and bias.

    In eval mode BatchNorm is a per-channel affine map, so ``w * s`` and ``beta - mean * s`` with
    ``s = gamma / sqrt(var + eps)`` give the same values up to float rounding, without the separate
    pass over every feature map. Folded from the live parameters at each call (a few ms for a
    ResNet101), so nothing goes stale while training updates them.
    """
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    weight = conv.weight * scale.view(-1, 1, 1, 1)
    bias = bn.bias - bn.running_mean * scale
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def _folded_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """torchvision's BasicBlock / Bottleneck forward in eval mode, with folded BatchNorms."""
    out = _conv_bn(block.conv1, block.bn1, x).relu_()
    if isinstance(block, Bottleneck):
        out = _conv_bn(block.conv2, block.bn2, out).relu_()
        out = _conv_bn(block.conv3, block.bn3, out)
    else:
        out = _conv_bn(block.conv2, block.bn2, out)
    identity = x if block.downsample is None else _conv_bn(block.downsample[0], block.downsample[1], x)
    return out.add_(identity).relu_()


def folded_trunk_forward(trunk: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """``trunk(x)`` in eval mode with every BatchNorm folded into its convolution (inference only)."""
    conv, bn, _, pool = trunk[:4]
    x = pool(_conv_bn(conv, bn, x).relu_())
    for stage in trunk[4:]:
        for block in stage:
            x = _folded_block(block, x)
    return x


class VisualExtractor(nn.Module):
    """uint8 grayscale views ``(B, V, H, W)`` -> patch tokens ``(B, V*h*w, C)`` and pooled ``(B, V*C)``.

    ``recompute``: in training, the first that many stages of the trunk (1 = the stem, 2 = stem and
    layer1, ... 5 = all) keep only the input of each residual block (and of the stem) for the
    backward pass and re-run that block there, instead of storing its activations; the
    high-resolution stages come first because they take the most memory per FLOP. Same values and
    gradients (BatchNorm running statistics are updated once); the price is one more forward pass
    of those stages. In eval mode the BatchNorms are folded into the convolutions.
    """

    def __init__(self, name: str, width: int = 64, recompute: int = 0):
        super().__init__()
        # Channels-last: oneDNN's convolutions (above all the 1x1 ones at 56x56 and 28x28) and
        # BatchNorm run markedly faster on NHWC than on NCHW on CPU; the values are the same convolutions.
        self.trunk = build_resnet_trunk(name, width).to(memory_format=torch.channels_last)
        self.out_channels = self.trunk.out_channels
        self.recompute = recompute
        # Grayscale is replicated to RGB and ImageNet-normalised, as torchvision's transforms do in R2Gen.
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def _normalize(self, views: torch.Tensor) -> torch.Tensor:
        x = views.unsqueeze(1).float().div_(255.0)  # (N, 1, H, W)
        return ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)  # (N, 3, H, W)

    def _features(self, views: torch.Tensor) -> torch.Tensor:
        """uint8 views (N, H, W) -> last feature map (N, C, h, w)."""
        x = self._normalize(views)
        if not self.training:
            return folded_trunk_forward(self.trunk, x)
        if not (self.recompute and torch.is_grad_enabled()):
            return self.trunk(x)
        # One checkpoint per residual block (the stem, children 0-3, is one), so the backward
        # re-creates one block's activations at a time.
        end = 3 + self.recompute  # children 0-3 are the stem, 4-7 the residual stages
        segments = [self.trunk[:4]] + [block for stage in self.trunk[4:end] for block in stage]
        for part in segments:
            x = checkpoint(part, x, use_reentrant=False,
                           context_fn=lambda part=part: (contextlib.nullcontext(), _batch_norm_stats_frozen(part)))
        return self.trunk[end:](x)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, V = images.shape[:2]
        if self.training:
            # One call per view as in R2Gen, so BatchNorm batch statistics are per view.
            maps = [self._features(images[:, v]) for v in range(V)]
            fmap = torch.stack(maps, dim=1).flatten(0, 1)  # (B*V, C, h, w)
        else:
            fmap = self._features(images.flatten(0, 1))  # (B*V, C, h, w)
        C = fmap.shape[1]
        pooled = fmap.mean(dim=(2, 3)).reshape(B, V * C)  # (B, V*C)
        patches = fmap.flatten(2).transpose(1, 2)  # (B*V, h*w, C)
        patches = patches.reshape(B, V * patches.shape[1], C)  # views concatenated along tokens
        return patches, pooled
