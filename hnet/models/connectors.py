"""Functional connectors: parameters in as tensors, batched over N encoders in one call (bmm, no Python loop).

Pairs of different widths share one call: image features are zero-padded to the widest image width D_max, text
features to the widest text width T_max. Padded input rows meet zeros, so the extra weight rows contribute
nothing, and the output columns past the pair's own output width (text for `image_to_text`, image for
`text_to_image`) are masked to zero. Either way a padded connector's output equals its unpadded connector's output
(tests/test_connectors.py proves it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hnet.models.moe import dense_forward, sparse_forward

Params = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: W [N, in, out], b [N, out]


@dataclass(frozen=True)
class ConnectorShape:
    kind: str  # linear | mlp | moe
    direction: str  # image_to_text | text_to_image
    image_width: int  # D_max, the widest image encoder
    text_width: int  # T_max, the widest text encoder
    depth: int = 2
    hidden: int = 1024
    experts: int = 4  # moe only (hnet/models/moe.py): E experts of kind expert_kind, top_k per sample
    top_k: int = 2
    expert_kind: str = "mlp"
    balance_alpha: float = 0.01
    z_loss: float = 0.0

    @classmethod
    def from_config(cls, c, image_width: int, text_width: int) -> "ConnectorShape":
        """From a ConnectorConfig and the widest widths."""
        return cls(c.kind, c.direction, image_width, text_width, c.depth, c.hidden, c.experts, c.top_k,
                   c.expert_kind, c.balance_alpha, c.z_loss)

    @property
    def expert(self) -> "ConnectorShape":
        """A moe connector's expert (a linear or mlp connector of the same widths)."""
        return ConnectorShape(self.expert_kind, self.direction, self.image_width, self.text_width, self.depth,
                              self.hidden)

    @property
    def dims(self) -> list[int]:
        """Layer boundary widths, padded: [in, (hidden, ...), out] (moe: of one expert)."""
        if self.kind == "moe":
            return self.expert.dims
        src, dst = ((self.image_width, self.text_width) if self.direction == "image_to_text"
                    else (self.text_width, self.image_width))
        inner = [self.hidden] * (self.depth - 1) if self.kind == "mlp" else []
        return [src, *inner, dst]

    @property
    def layers(self) -> list[tuple[int, int]]:
        """Padded (in, out) per layer; moe: the gate [in, E], then each expert's layers."""
        if self.kind == "moe":
            return [(self.dims[0], self.experts)] + self.expert.layers * self.experts
        dims = self.dims
        return list(zip(dims[:-1], dims[1:]))

    def true_layers(self, width: int, text_width: int | None = None) -> list[tuple[int, int]]:
        """Layer shapes of the unpadded connector of a pair of these widths (text: T_max when not given)."""
        if self.kind == "moe":
            expert = self.expert.true_layers(width, text_width)
            return [(expert[0][0], self.experts)] + expert * self.experts
        dims = list(self.dims)
        image_end, text_end = (0, -1) if self.direction == "image_to_text" else (-1, 0)
        dims[image_end] = width
        dims[text_end] = text_width or self.text_width
        return list(zip(dims[:-1], dims[1:]))

    def has_bias(self, layer: int) -> bool:
        """Every layer has a bias but a moe connector's gate (layer 0)."""
        return not (self.kind == "moe" and layer == 0)

    def num_params(self, width: int, text_width: int | None = None) -> int:
        return sum(i * o + o * self.has_bias(k) for k, (i, o) in enumerate(self.true_layers(width, text_width)))

    def out_widths(self, widths: torch.Tensor, text_widths: torch.Tensor) -> torch.Tensor:
        """Each connector's true output width (the side it maps into)."""
        return text_widths if self.direction == "image_to_text" else widths


def init_std(fan_in: int) -> float:
    """Std of PyTorch's default nn.Linear init (uniform +-1/sqrt(fan_in)), for weights and biases alike."""
    return 1.0 / math.sqrt(3.0 * fan_in)


def width_mask(padded: int, widths: torch.Tensor) -> torch.Tensor:
    """[n, padded] 1/0 mask of each connector's real output columns."""
    cols = torch.arange(padded, device=widths.device)
    return (cols[None, :] < widths[:, None]).float()


def connector_forward(x: torch.Tensor, params: Params, mask: torch.Tensor | None = None) -> torch.Tensor:
    """x: [N, B, in] (or [B, in] shared by all N) -> [N, B, out]; GELU between layers."""
    n = params[0][0].shape[0]
    if x.dim() == 2:
        x = x.unsqueeze(0).expand(n, -1, -1)
    x = dense_forward(x, params)
    if mask is not None:
        x = x * mask.unsqueeze(1).to(x.dtype)
    return x


class SeparateConnectors(nn.Module):
    """APE baseline: one independent connector per encoder, stored stacked so all train in one batched call.

    Each connector (one per pair) is drawn at its TRUE size from its own seed (PyTorch's nn.Linear init) and
    zero-padded: padded entries get zero gradients and stay zero, so a connector trained beside others equals
    one trained alone. `widths`, `text_widths`: per connector."""

    def __init__(self, shape: ConnectorShape, widths: list[int], seeds: list[int] | None = None,
                 text_widths: list[int] | None = None):
        super().__init__()
        self.shape = shape
        seeds = list(range(len(widths))) if seeds is None else seeds
        text_widths = text_widths or [shape.text_width] * len(widths)
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for layer, (fan_in, fan_out) in enumerate(shape.layers):
            weight, bias = torch.zeros(len(widths), fan_in, fan_out), torch.zeros(len(widths), fan_out)
            for i, (width, text_width, gen) in enumerate(zip(widths, text_widths, gens)):
                true_in, true_out = shape.true_layers(width, text_width)[layer]
                bound = 1.0 / math.sqrt(true_in)
                weight[i, :true_in, :true_out] = (torch.rand(true_in, true_out, generator=gen) * 2 - 1) * bound
                if shape.has_bias(layer):
                    bias[i, :true_out] = (torch.rand(true_out, generator=gen) * 2 - 1) * bound
            self.weights.append(nn.Parameter(weight))
            self.biases.append(nn.Parameter(bias, requires_grad=shape.has_bias(layer)))  # moe gate: none, frozen 0

    def forward(self, index: torch.Tensor) -> Params:
        if len(index) == len(self.weights[0]) and bool((index == torch.arange(len(index), device=index.device)).all()):
            return [(w, b) for w, b in zip(self.weights, self.biases)]  # all encoders: no gather/scatter copies
        return [(w[index], b[index]) for w, b in zip(self.weights, self.biases)]


class Connector(nn.Module):
    """A plain, unpadded connector for one encoder: what `connector_for(name)` hands to users. A moe connector
    (`experts` > 0) holds the bias-free gate in `gate` and each expert's layers in `experts`; each expert runs only
    on the samples routed to it."""

    def __init__(self, layers: list[tuple[int, int]], direction: str, experts: int = 0, top_k: int = 0):
        super().__init__()
        self.direction, self.top_k = direction, top_k
        if experts:
            self.gate = nn.Linear(*layers[0], bias=False)
            per = (len(layers) - 1) // experts
            self.experts = nn.ModuleList(Connector(layers[1 + e * per: 1 + (e + 1) * per], direction)
                                         for e in range(experts))
            layers = []
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in layers)

    @classmethod
    def from_params(cls, shape: ConnectorShape, params: Params, width: int,
                    text_width: int | None = None) -> "Connector":
        """Slice the padded parameters of one connector (N = 1) down to its pair's true widths."""
        layers = shape.true_layers(width, text_width)
        moe = shape.kind == "moe"
        module = cls(layers, shape.direction, shape.experts if moe else 0, shape.top_k if moe else 0)
        linears = [module.gate, *(m for e in module.experts for m in e.layers)] if moe else list(module.layers)
        with torch.no_grad():
            for linear, (i, o), (weight, bias) in zip(linears, layers, params):
                linear.weight.copy_(weight[0, :i, :o].T)
                if linear.bias is not None:
                    linear.bias.copy_(bias[0, :o])
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.top_k:
            return sparse_forward(x, self.gate(x), list(self.experts), self.top_k)
        for i, linear in enumerate(self.layers):
            x = linear(x)
            if i < len(self.layers) - 1:
                x = F.gelu(x)
        return x
