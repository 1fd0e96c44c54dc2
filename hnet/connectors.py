"""Functional connectors: parameters in as tensors, batched over N encoders in one call (bmm, no Python loop).

Encoders of different widths share one call: image features are zero-padded to the widest width D_max. For
`image_to_text` the padded input rows meet zeros, so the extra weight rows contribute nothing; for
`text_to_image` the output columns past an encoder's width are masked to zero. Either way a padded encoder's
output equals its unpadded connector's output (tests/test_connectors.py proves it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

Params = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: W [N, in, out], b [N, out]


@dataclass(frozen=True)
class ConnectorShape:
    kind: str  # linear | mlp
    direction: str  # image_to_text | text_to_image
    image_width: int  # D_max, the widest encoder
    text_width: int  # T
    depth: int = 2
    hidden: int = 1024

    @property
    def dims(self) -> list[int]:
        """Layer boundary widths, padded: [in, (hidden, ...), out]."""
        src, dst = ((self.image_width, self.text_width) if self.direction == "image_to_text"
                    else (self.text_width, self.image_width))
        inner = [self.hidden] * (self.depth - 1) if self.kind == "mlp" else []
        return [src, *inner, dst]

    @property
    def layers(self) -> list[tuple[int, int]]:
        dims = self.dims
        return list(zip(dims[:-1], dims[1:]))

    def true_layers(self, width: int) -> list[tuple[int, int]]:
        """Layer shapes of the unpadded connector of an encoder of this width."""
        dims = list(self.dims)
        dims[0 if self.direction == "image_to_text" else -1] = width
        return list(zip(dims[:-1], dims[1:]))

    def num_params(self, width: int) -> int:
        return sum(i * o + o for i, o in self.true_layers(width))


def init_std(fan_in: int) -> float:
    """Std of PyTorch's default nn.Linear init (uniform +-1/sqrt(fan_in)), for weights and biases alike."""
    return 1.0 / math.sqrt(3.0 * fan_in)


def output_mask(shape: ConnectorShape, widths: torch.Tensor) -> torch.Tensor | None:
    """[N, D_max] 1/0 mask of each encoder's real feature columns (text_to_image only)."""
    if shape.direction == "image_to_text":
        return None
    cols = torch.arange(shape.image_width, device=widths.device)
    return (cols[None, :] < widths[:, None]).float()


def connector_forward(x: torch.Tensor, params: Params, mask: torch.Tensor | None = None) -> torch.Tensor:
    """x: [N, B, in] (or [B, in] shared by all N) -> [N, B, out]; GELU between layers."""
    n = params[0][0].shape[0]
    if x.dim() == 2:
        x = x.unsqueeze(0).expand(n, -1, -1)
    for i, (weight, bias) in enumerate(params):
        x = torch.baddbmm(bias.unsqueeze(1), x, weight)
        if i < len(params) - 1:
            x = F.gelu(x)
    if mask is not None:
        x = x * mask.unsqueeze(1)
    return x


class SeparateConnectors(nn.Module):
    """APE baseline: one independent connector per encoder, stored stacked so all train in one batched call.

    Each encoder's connector is drawn at its TRUE size from its own seed (PyTorch's nn.Linear init) and
    zero-padded: padded entries get zero gradients and stay zero, so a connector trained beside others equals
    one trained alone."""

    def __init__(self, shape: ConnectorShape, widths: list[int], seeds: list[int] | None = None):
        super().__init__()
        self.shape = shape
        seeds = list(range(len(widths))) if seeds is None else seeds
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for layer, (fan_in, fan_out) in enumerate(shape.layers):
            weight, bias = torch.zeros(len(widths), fan_in, fan_out), torch.zeros(len(widths), fan_out)
            for i, (width, gen) in enumerate(zip(widths, gens)):
                true_in, true_out = shape.true_layers(width)[layer]
                bound = 1.0 / math.sqrt(true_in)
                weight[i, :true_in, :true_out] = (torch.rand(true_in, true_out, generator=gen) * 2 - 1) * bound
                bias[i, :true_out] = (torch.rand(true_out, generator=gen) * 2 - 1) * bound
            self.weights.append(nn.Parameter(weight))
            self.biases.append(nn.Parameter(bias))

    def forward(self, index: torch.Tensor) -> Params:
        if len(index) == len(self.weights[0]) and bool((index == torch.arange(len(index), device=index.device)).all()):
            return [(w, b) for w, b in zip(self.weights, self.biases)]  # all encoders: no gather/scatter copies
        return [(w[index], b[index]) for w, b in zip(self.weights, self.biases)]


class Connector(nn.Module):
    """A plain, unpadded connector for one encoder: what `connector_for(name)` hands to users."""

    def __init__(self, layers: list[tuple[int, int]], direction: str):
        super().__init__()
        self.direction = direction
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in layers)

    @classmethod
    def from_params(cls, shape: ConnectorShape, params: Params, width: int) -> "Connector":
        """Slice the padded parameters of one encoder (N = 1) down to its true width."""
        layers = shape.true_layers(width)
        module = cls(layers, shape.direction)
        with torch.no_grad():
            for linear, (i, o), (weight, bias) in zip(module.layers, layers, params):
                linear.weight.copy_(weight[0, :i, :o].T)
                linear.bias.copy_(bias[0, :o])
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, linear in enumerate(self.layers):
            x = linear(x)
            if i < len(self.layers) - 1:
                x = F.gelu(x)
        return x
