"""2-D U-Net for tissue/background segmentation of wafer overviews.

The method (seed ch. 2) uses 5 blocks, 64 initial filters, ReLU and batch
normalisation.  Both are parameters here: the shipped model uses fewer filters
so that it trains and runs on a CPU (see models/sections_unet.json).  All
convolutions are same-padded, so any input whose sides are divisible by
2**(depth-1) gives an output of exactly the input size.
"""
from __future__ import annotations

import torch
from torch import nn


def _block(cin: int, cout: int) -> nn.Sequential:
    """Two 3x3 conv - batch norm - ReLU stages (no conv bias: BN supplies it)."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """U-Net with `depth` resolution levels (blocks) and `start_filters` at the top level.

    depth=5, start_filters=64 is the seed's configuration (~31 M parameters).
    Output: (N, n_classes, H, W) logits.
    """

    def __init__(self, in_channels: int = 1, n_classes: int = 2, depth: int = 5, start_filters: int = 64):
        super().__init__()
        if depth < 1 or start_filters < 1:
            raise ValueError("depth and start_filters must be >= 1")
        self.config = {"in_channels": in_channels, "n_classes": n_classes, "depth": depth,
                       "start_filters": start_filters}
        ch = [start_filters * 2 ** i for i in range(depth)]
        self.down = nn.ModuleList()
        cin = in_channels
        for c in ch:
            self.down.append(_block(cin, c))
            cin = c
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for c_hi, c_lo in zip(reversed(ch[1:]), reversed(ch[:-1])):
            self.up.append(nn.ConvTranspose2d(c_hi, c_lo, 2, stride=2))
            self.dec.append(_block(2 * c_lo, c_lo))
        self.head = nn.Conv2d(ch[0], n_classes, 1)

    @property
    def multiple(self) -> int:
        """Input sides must be divisible by this."""
        return 2 ** (self.config["depth"] - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h % self.multiple or w % self.multiple:
            raise ValueError(f"input {h}x{w} not divisible by {self.multiple}")
        skips = []
        for i, blk in enumerate(self.down):
            if i:
                x = self.pool(x)
            x = blk(x)
            skips.append(x)
        skips.pop()
        for up, dec in zip(self.up, self.dec):
            x = dec(torch.cat([skips.pop(), up(x)], 1))
        return self.head(x)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_from_config(cfg: dict) -> UNet:
    return UNet(in_channels=cfg.get("in_channels", 1), n_classes=cfg.get("n_classes", 2),
                depth=cfg.get("depth", 5), start_filters=cfg.get("start_filters", 64))


@torch.no_grad()
def fold_batchnorm(model: UNet) -> UNet:
    """Inference copy with every BatchNorm folded into the preceding conv: one memory
    pass less per layer, which matters on a CPU where thin convs are bandwidth bound."""
    import copy
    m = copy.deepcopy(model).eval()
    for seq in list(m.down) + list(m.dec):
        layers = list(seq)
        for i, layer in enumerate(layers):
            if isinstance(layer, nn.BatchNorm2d):
                conv = layers[i - 1]
                scale = layer.weight / torch.sqrt(layer.running_var + layer.eps)
                fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size,
                                  padding=conv.padding, bias=True)
                fused.weight.copy_(conv.weight * scale[:, None, None, None])
                bias = conv.bias if conv.bias is not None else torch.zeros_like(layer.running_mean)
                fused.bias.copy_((bias - layer.running_mean) * scale + layer.bias)
                seq[i - 1] = fused
                seq[i] = nn.Identity()
    return m
