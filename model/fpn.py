"""Feature Pyramid Network (P2..P5 + a max-pooled P6) and the backbone that wraps ResNet + FPN.

Key names follow torchvision: each lateral / output conv sits inside a
`Conv2dNormActivation`-like Sequential, so weights are `fpn.inner_blocks.0.0.weight`,
`fpn.layer_blocks.3.0.bias`, and the backbone is `backbone.body.*` + `backbone.fpn.*`.
"""
from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from maskrt.model.backbone import ResNet, make_norm


def conv_norm_act(in_channels: int, out_channels: int, kernel_size: int, norm: str | None = None,
                  relu: bool = False) -> nn.Sequential:
    """Conv (+ norm) (+ ReLU) as one Sequential, the layout of torchvision's
    `Conv2dNormActivation` (conv at index 0, so keys read `<name>.0.weight`). The conv has a
    bias only when there is no norm after it, as torchvision's."""
    layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, kernel_size,
                                         padding=(kernel_size - 1) // 2, bias=norm is None)]
    if norm is not None:
        layers.append(make_norm(norm, out_channels))  # type: ignore[arg-type]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class LastLevelMaxPool(nn.Module):
    """P6 = max_pool(P5, kernel 1, stride 2): an extra coarse level for the RPN's largest
    anchors only (the RoI poolers use P2..P5). Shapes: [N,C,H,W] -> [N,C,ceil(H/2),ceil(W/2)]."""

    def forward(self, p5: Tensor) -> Tensor:
        return F.max_pool2d(p5, kernel_size=1, stride=2, padding=0)


class FeaturePyramidNetwork(nn.Module):
    """Top-down pathway with lateral 1x1 convs and 3x3 output convs (Lin et al. 2017).

    Args:
        in_channels_list: channels of C2..C5.
        out_channels: channels of every P level (256 in torchvision).
        norm: None (torchvision's default) or a `make_norm` kind after each conv.

    Shapes: list of [N, C_i, H_i, W_i] (finest first) -> list of [N, out_channels, H_i, W_i]
    for P2..P5 followed by P6.
    """

    def __init__(self, in_channels_list: Sequence[int], out_channels: int, norm: str | None = None) -> None:
        super().__init__()
        self.inner_blocks = nn.ModuleList(conv_norm_act(c, out_channels, 1, norm) for c in in_channels_list)
        self.layer_blocks = nn.ModuleList(conv_norm_act(out_channels, out_channels, 3, norm)
                                          for _ in in_channels_list)
        self.extra_blocks = LastLevelMaxPool()
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                # torchvision's FPN init: kaiming_uniform with a=1, zero bias.
                nn.init.kaiming_uniform_(module.weight, a=1)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        last_inner = self.inner_blocks[-1](features[-1])
        results = [self.layer_blocks[-1](last_inner)]
        for index in range(len(features) - 2, -1, -1):
            lateral = self.inner_blocks[index](features[index])
            # Nearest upsampling to the lateral's exact size (odd sizes do not double evenly).
            top_down = F.interpolate(last_inner, size=lateral.shape[-2:], mode="nearest")
            last_inner = lateral + top_down
            results.insert(0, self.layer_blocks[index](last_inner))
        results.append(self.extra_blocks(results[-1]))
        return results


class BackboneWithFPN(nn.Module):
    """ResNet trunk (`body`) + FPN (`fpn`). Shapes: images [N,3,H,W] (H, W multiples of 32) ->
    5 maps [N, out_channels, H/s, W/s] for strides 4, 8, 16, 32, 64."""

    def __init__(self, body: ResNet, out_channels: int, fpn_norm: str | None = None) -> None:
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(body.out_channels, out_channels, fpn_norm)
        self.out_channels = out_channels

    def forward(self, images: Tensor) -> list[Tensor]:
        return self.fpn(self.body(images))
