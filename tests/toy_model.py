"""The smallest model NerVE can tap: a residual stack of two-layer ReLU FFN blocks (pre = w1's output, post =
w2's input), shared by the monitor and budget tests."""

import torch
from torch import nn

from nerve_plugin.taps import TapPoint, TapSpec

SPEC = TapSpec(blocks="layers", pre=TapPoint("w1", "output"), post=TapPoint("w2", "input"))


class Block(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1, self.w2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        h = self.w2(torch.relu(self.w1(x)))
        # keep the residual stream finite when a test poisons one FFN, so only that layer's statistics are hit
        return x + torch.where(torch.isfinite(h), h, torch.zeros_like(h))


class ToyModel(nn.Module):
    def __init__(self, dim: int, hidden: int, layers: int):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(Block(dim, hidden) for _ in range(layers))

    def forward(self, x):
        for block in self.layers:
            x = block(x)
        return x
