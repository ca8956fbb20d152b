"""ResNet backbones (BasicBlock / Bottleneck) with a choice of normalisation.

Parameter names follow torchvision's `resnet*` (`conv1`, `bn1`, `layer1.0.conv1`,
`layer1.0.downsample.0`, ...) so torchvision and detectron2 weights load 1:1 (the latter via
`maskrt.model.convert`). The classifier (`avgpool`, `fc`) is not built: the detector only
needs the four stages, as torchvision's `IntermediateLayerGetter` keeps them.
"""
from __future__ import annotations

from typing import Literal, Sequence

import torch
from torch import Tensor, nn

from maskrt.errors import MaskrtError

NormKind = Literal["frozen_bn", "bn", "group"]
NORM_KINDS = ("frozen_bn", "bn", "group")


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d whose statistics and affine parameters are fixed buffers.

    Pretrained detection backbones are fine-tuned with batches of 1-2 images, far too few for
    batch statistics, so torchvision freezes BN: y = (x - mean) / sqrt(var + eps) * w + b.
    The four tensors are buffers, not parameters (they do not count as parameters and get
    no gradient). eps = 1e-5 as torchvision's `FrozenBatchNorm2d`.

    Shapes: x [N, C, H, W] -> [N, C, H, W].
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):  # noqa: D401 - torch hook signature
        # A BatchNorm2d state dict carries `num_batches_tracked`, which a frozen BN has no use for.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def scale_shift(self) -> tuple[Tensor, Tensor]:
        """The affine map this layer is: y = x * scale + shift, scale and shift [C]
        (the same arithmetic order as torchvision's)."""
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return scale, self.bias - self.running_mean * scale

    def forward(self, x: Tensor) -> Tensor:
        scale, shift = self.scale_shift()
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def group_norm_groups(num_channels: int) -> int:
    """Number of GroupNorm groups for `num_channels`: 32 as in the GN paper, fewer for the
    narrow edge backbone so that every group keeps at least 4 channels."""
    groups = min(32, max(1, num_channels // 4))
    while num_channels % groups:
        groups -= 1
    return groups


def make_norm(kind: NormKind, num_channels: int) -> nn.Module:
    """The normalisation layer after a conv: frozen BN, trainable BN, or GroupNorm."""
    if kind == "frozen_bn":
        return FrozenBatchNorm2d(num_channels)
    if kind == "bn":
        return nn.BatchNorm2d(num_channels)
    if kind == "group":
        return nn.GroupNorm(group_norm_groups(num_channels), num_channels)
    raise MaskrtError(f"unknown norm {kind!r}: choose one of {', '.join(NORM_KINDS)}")


# Fold frozen BN into the preceding conv (bench/eager.py switches it off to measure the gain).
FOLD_FROZEN_BN = True


def _observed(*modules: nn.Module) -> bool:
    """Whether a forward hook watches one of the modules: folding would skip their calls."""
    from torch.nn.modules import module as module_hooks

    if module_hooks._global_forward_hooks or module_hooks._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def conv_norm(conv: nn.Conv2d, norm: nn.Module, x: Tensor) -> Tensor:
    """norm(conv(x)). A frozen BN is folded into the conv: weight * scale per output channel and
    a bias, so the activations are written once instead of three times (conv, mul, add); this was
    ~14 % of an r50_fpn eager forward at 512 px (docs/performance.md). Differentiable w.r.t. the
    conv's weight, so trainable convs before a frozen BN train as before. Where a forward hook
    watches the conv or the BN, both run as modules (the hook sees the conv's own output)."""
    if FOLD_FROZEN_BN and isinstance(norm, FrozenBatchNorm2d) and not _observed(conv, norm):
        scale, shift = norm.scale_shift()
        bias = shift if conv.bias is None else conv.bias * scale + shift
        return conv._conv_forward(x, conv.weight * scale.reshape(-1, 1, 1, 1), bias)
    return norm(conv(x))


# Eager CPU inference fuses conv + (folded frozen BN) + ReLU, and conv + residual add, into one
# oneDNN call each (bench/eager.py switches it off to measure the gain).
FUSED_CPU_INFERENCE = True
_POINTWISE = getattr(torch.ops.mkldnn, "_convolution_pointwise", None)


def _fused_weights(conv: nn.Conv2d, norm: nn.Module | None) -> tuple[Tensor, Tensor | None] | None:
    """(weight, bias) of conv then norm as one conv, or None where norm is not a frozen BN (or none)."""
    if norm is None or isinstance(norm, nn.Identity):
        return conv.weight, conv.bias
    if isinstance(norm, FrozenBatchNorm2d):
        scale, shift = norm.scale_shift()
        bias = shift if conv.bias is None else conv.bias * scale + shift
        return conv.weight * scale.reshape(-1, 1, 1, 1), bias
    return None


def fused_conv(conv: nn.Conv2d, norm: nn.Module | None, x: Tensor, relu: bool = False,
               add: Tensor | None = None) -> Tensor | None:
    """relu(norm(conv(x)) [+ add]) as one oneDNN convolution with the ReLU or the addition fused
    into it (`torch.ops.mkldnn._convolution_pointwise`, the op torch.compile's CPU backend emits),
    or None where that path does not apply: it runs only for eager float32 CPU inference on
    channels-last activations (`MaskRCNN.forward_eval`) without autograd, tracing or hooks, and
    only for a frozen BN (folded) or no norm. The activations are written once instead of two or
    three times; the numbers are those of the separate ops (to float32 rounding).

    x [N, C, H, W] channels-last, add [N, C_out, H_out, W_out] -> [N, C_out, H_out, W_out]."""
    if not (FUSED_CPU_INFERENCE and _POINTWISE is not None and not torch.is_grad_enabled()
            and x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4
            and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
            and isinstance(conv, nn.Conv2d) and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple)
            and not torch.compiler.is_compiling() and torch.backends.mkldnn.is_available()):
        return None
    if _observed(conv, *(m for m in (norm,) if m is not None)):
        return None
    weights = _fused_weights(conv, norm)
    if weights is None:
        return None
    weight, bias = weights
    geometry = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
    if add is None:
        return _POINTWISE(x, weight, bias, *geometry, "relu" if relu else "none", [], "")
    out = _POINTWISE.binary(x, add, weight, bias, *geometry, "add", None, None, [], None)
    return out.relu_() if relu else out


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False)


def _projection_shortcut(in_channels: int, out_channels: int, stride: int, norm: NormKind) -> nn.Module | None:
    """1x1 conv + norm where a block changes shape (keys `downsample.0`, `downsample.1`), else None."""
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(_conv1x1(in_channels, out_channels, stride), make_norm(norm, out_channels))


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual (ResNet-18/34). Shapes: [N, in, H, W] -> [N, out, H/s, W/s]."""

    expansion = 1

    def __init__(self, in_channels: int, width: int, stride: int, norm: NormKind,
                 stride_in_1x1: bool = False) -> None:
        super().__init__()
        del stride_in_1x1  # a BasicBlock has no 1x1 conv; accepted so both blocks share one signature
        out_channels = width * self.expansion
        self.conv1 = _conv3x3(in_channels, width, stride)
        self.bn1 = make_norm(norm, width)
        self.conv2 = _conv3x3(width, out_channels)
        self.bn2 = make_norm(norm, out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _projection_shortcut(in_channels, out_channels, stride, norm)

    def forward(self, x: Tensor) -> Tensor:
        fused = _fused_block(self, x, ((self.conv1, self.bn1),), (self.conv2, self.bn2))
        if fused is not None:
            return fused
        identity = x if self.downsample is None else conv_norm(self.downsample[0], self.downsample[1], x)
        out = self.relu(conv_norm(self.conv1, self.bn1, x))
        out = conv_norm(self.conv2, self.bn2, out)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 (x4 channels) with a residual (ResNet-50).

    torchvision (ResNet v1.5) strides in the 3x3 conv; detectron2's MSRA weights were trained
    with the stride in the first 1x1 conv (`stride_in_1x1=True`).
    Shapes: [N, in, H, W] -> [N, 4*width, H/s, W/s].
    """

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int, norm: NormKind,
                 stride_in_1x1: bool = False) -> None:
        super().__init__()
        out_channels = width * self.expansion
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = _conv1x1(in_channels, width, stride_1x1)
        self.bn1 = make_norm(norm, width)
        self.conv2 = _conv3x3(width, width, stride_3x3)
        self.bn2 = make_norm(norm, width)
        self.conv3 = _conv1x1(width, out_channels)
        self.bn3 = make_norm(norm, out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _projection_shortcut(in_channels, out_channels, stride, norm)

    def forward(self, x: Tensor) -> Tensor:
        fused = _fused_block(self, x, ((self.conv1, self.bn1), (self.conv2, self.bn2)), (self.conv3, self.bn3))
        if fused is not None:
            return fused
        identity = x if self.downsample is None else conv_norm(self.downsample[0], self.downsample[1], x)
        out = self.relu(conv_norm(self.conv1, self.bn1, x))
        out = self.relu(conv_norm(self.conv2, self.bn2, out))
        out = conv_norm(self.conv3, self.bn3, out)
        return self.relu(out + identity)


def _fused_block(block: nn.Module, x: Tensor, inner: Sequence[tuple[nn.Conv2d, nn.Module]],
                 last: tuple[nn.Conv2d, nn.Module]) -> Tensor | None:
    """A residual block on the fused path (`fused_conv`): conv + ReLU for each of `inner`, then the
    last conv with the shortcut added and the ReLU; None where the fused path does not apply."""
    if _observed(block, block.relu, *([block.downsample] if block.downsample is not None else [])):
        return None
    if block.downsample is None:
        identity = x
    else:
        identity = fused_conv(block.downsample[0], block.downsample[1], x)
        if identity is None:
            return None
    out = x
    for conv, norm in inner:
        out = fused_conv(conv, norm, out, relu=True)
        if out is None:
            return None
    return fused_conv(last[0], last[1], out, relu=True, add=identity)


RESNET_DEPTHS: dict[int, tuple[type[nn.Module], tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
}


class ResNet(nn.Module):
    """ResNet trunk returning the outputs of the four stages C2..C5 (strides 4, 8, 16, 32).

    Args:
        depth: 18, 34 or 50.
        norm: "frozen_bn" (pretrained-style weights), "bn" or "group" (training from scratch).
        base_width: channels of the stem and of layer1's 3x3 convs (64 in the paper; smaller
            for an edge backbone). Stage i has base_width * 2**i (times 4 for Bottleneck).
        stride_in_1x1: Bottleneck stride placement (see `Bottleneck`).
        trainable_layers: how many stages, counted from layer4 down, get gradients (0..5;
            5 also trains the stem), as torchvision's `resnet_fpn_backbone`.

    Shapes: x [N, 3, H, W] -> list of 4 tensors [N, C_i, H/2**(i+2), W/2**(i+2)].
    """

    def __init__(self, depth: int = 50, norm: NormKind = "frozen_bn", base_width: int = 64,
                 stride_in_1x1: bool = False, trainable_layers: int = 5) -> None:
        super().__init__()
        if depth not in RESNET_DEPTHS:
            raise MaskrtError(f"unsupported ResNet depth {depth}: choose one of {sorted(RESNET_DEPTHS)}")
        if not 0 <= trainable_layers <= 5:
            raise MaskrtError(f"trainable_layers must be in 0..5, got {trainable_layers}")
        if norm not in NORM_KINDS:
            raise MaskrtError(f"unknown norm {norm!r}: choose one of {', '.join(NORM_KINDS)}")
        block, counts = RESNET_DEPTHS[depth]
        self.conv1 = nn.Conv2d(3, base_width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = make_norm(norm, base_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_channels = base_width
        self.out_channels: list[int] = []
        for stage, count in enumerate(counts):
            width = base_width * 2**stage
            blocks = []
            for index in range(count):
                stride = 2 if (index == 0 and stage > 0) else 1
                blocks.append(block(in_channels, width, stride, norm, stride_in_1x1))
                in_channels = width * block.expansion
            self.add_module(f"layer{stage + 1}", nn.Sequential(*blocks))
            self.out_channels.append(in_channels)
        self._init_weights()
        self._freeze(trainable_layers)

    def _init_weights(self) -> None:
        # torchvision's ResNet init: He normal (fan_out) convs, norm scale 1 / shift 0.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def _freeze(self, trainable_layers: int) -> None:
        trainable = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
        if trainable_layers == 5:
            trainable.append("bn1")
        for name, parameter in self.named_parameters():
            if not any(name.startswith(prefix) for prefix in trainable):
                parameter.requires_grad_(False)

    def forward(self, x: Tensor) -> list[Tensor]:
        stem = fused_conv(self.conv1, self.bn1, x, relu=True) if not _observed(self.relu) else None
        x = self.maxpool(stem if stem is not None else self.relu(conv_norm(self.conv1, self.bn1, x)))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c2, c3, c4, c5]


__all__: Sequence[str] = ["FrozenBatchNorm2d", "conv_norm", "fused_conv", "BasicBlock", "Bottleneck", "ResNet", "make_norm",
                          "group_norm_groups", "NORM_KINDS"]
