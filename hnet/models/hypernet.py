"""Hypernetwork: a cond embedding per (image encoder, text encoder) pair -> that pair's connector parameters.

The pair's embedding joins a learned vector per image encoder with one per text encoder (concatenated; the text
part exists when the run has several text encoders: with one it would be a constant, i.e. a bias). So a new image
encoder, or a new text encoder, is auto-decoded by learning one new vector, and a combination of seen encoders
that never trained together is generated as it is.

Generation is layer-wise and chunked: every connector layer's flat parameter vector (weights then bias) is cut
into chunks of `chunk_size`; one small MLP maps [cond embedding, layer embedding, chunk embedding] to a chunk.
The MLP's output head is shared by all chunks, so its size is set by the chunk size, not the connector size:
a 0.8M-parameter connector needs about 1M hypernetwork parameters, not 400M.

Initialisation (the hyperfan-in idea of Chang et al. 2020, done explicitly): the trunk ends in a LayerNorm
without affine, so each hidden unit has unit variance; the head is N(0, 1/hidden), so raw outputs have unit
variance; each generated layer is then multiplied by a fixed per-encoder, per-layer scale equal to the std of
PyTorch's default nn.Linear init for that layer's TRUE fan-in (the pair's own widths, not the padded ones).
Generated connectors therefore start where a standard init would, whatever the encoder's width.

Only the chunks a pair needs are generated: those covering a parameter that exists at the pair's TRUE widths
(a weight row < its fan-in and column < its fan-out, a bias column < its fan-out). The others stay zero: they meet
zero-padded inputs or masked outputs, so a connector's outputs, and every gradient, equal all-chunks generation's.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hnet.config import HypernetConfig
from hnet.models.connectors import ConnectorShape, Params, init_std
from hnet.models.pairs import Pairs


class HyperNetwork(nn.Module):
    """`widths`: per image encoder; `text_widths`: per text encoder (default: one, of T_max); `pairs`: which
    (image, text) pairs `forward(index)` generates (default: every image encoder with the one text encoder)."""

    def __init__(self, shape: ConnectorShape, widths: list[int], cfg: HypernetConfig,
                 text_widths: list[int] | None = None, pairs: Pairs | None = None, all_chunks: bool = False):
        super().__init__()
        text_widths = text_widths or [shape.text_width]
        pairs = pairs or Pairs.grid(len(widths), len(text_widths))
        self.shape, self.chunk_size = shape, cfg.chunk_size
        self.cond = nn.Parameter(torch.randn(len(widths), cfg.cond_dim))
        multi_text = len(text_widths) > 1
        self.text_cond = nn.Parameter(torch.randn(len(text_widths), cfg.text_cond_dim)) if multi_text else None
        sizes = [i * o + o for i, o in shape.layers]
        self.chunks_per_layer = [math.ceil(s / cfg.chunk_size) for s in sizes]
        total_chunks = sum(self.chunks_per_layer)
        self.layer_emb = nn.Parameter(torch.randn(len(sizes), cfg.layer_emb_dim))
        self.chunk_emb = nn.Parameter(torch.randn(total_chunks, cfg.chunk_emb_dim))
        chunk_layer = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(self.chunks_per_layer))
        self.register_buffer("chunk_layer", chunk_layer, persistent=False)
        in_dim = cfg.cond_dim + (cfg.text_cond_dim if multi_text else 0) + cfg.layer_emb_dim + cfg.chunk_emb_dim
        self.trunk = nn.Sequential(nn.Linear(in_dim, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, cfg.hidden),
                                   nn.GELU(), nn.LayerNorm(cfg.hidden, elementwise_affine=False))
        self.head = nn.Linear(cfg.hidden, cfg.chunk_size)
        nn.init.normal_(self.head.weight, std=1.0 / math.sqrt(cfg.hidden))
        nn.init.zeros_(self.head.bias)
        scales = torch.cat([self.scales_for(widths[i], text_widths[j]) for i, j in zip(pairs.image, pairs.text)])
        self.register_buffer("scales", scales, persistent=False)  # [pairs, n_layers]
        self.register_buffer("pair_image", torch.tensor(pairs.image), persistent=False)
        self.register_buffer("pair_text", torch.tensor(pairs.text), persistent=False)
        self.pair_widths = [(widths[i], text_widths[j]) for i, j in zip(pairs.image, pairs.text)]
        self.all_chunks = all_chunks  # generate every chunk at the padded widths (the reference for tests)
        self._needed: dict[tuple[int, int], torch.Tensor] = {}

    def combine(self, image_cond: torch.Tensor, text_cond: torch.Tensor | None) -> torch.Tensor:
        """Per-pair cond inputs [n, c (+ c_text)] from an image encoder's and a text encoder's vectors."""
        return image_cond if text_cond is None else torch.cat([image_cond, text_cond], dim=-1)

    def pair_cond(self, index: torch.Tensor) -> torch.Tensor:
        text = None if self.text_cond is None else self.text_cond[self.pair_text[index]]
        return self.combine(self.cond[self.pair_image[index]], text)

    def needed_chunks(self, width: int, text_width: int | None = None) -> torch.Tensor:
        """Indices (CPU, long) of the chunks a pair of these widths needs, computed once per pair of widths."""
        key = (width, text_width or self.shape.text_width)
        if self.all_chunks:
            key = (self.shape.image_width, self.shape.text_width)
        if key not in self._needed:
            self._needed[key] = self._needed_mask(*key).nonzero().flatten()
        return self._needed[key]

    def _needed_mask(self, width: int, text_width: int) -> torch.Tensor:
        """[total_chunks] bool. A layer's flat layout read as [fan_in + 1, fan_out]: weight rows, then the bias."""
        masks = []
        for layer, ((fan_in, fan_out), (true_in, true_out), count) in enumerate(zip(
                self.shape.layers, self.shape.true_layers(width, text_width), self.chunks_per_layer)):
            rows = torch.arange(fan_in + 1, device="cpu")
            cols = torch.arange(fan_out, device="cpu")
            bias = (rows == fan_in) & self.shape.has_bias(layer)  # (a moe gate has none)
            exists = ((rows < true_in) | bias)[:, None] & (cols < true_out)[None, :]
            flat = F.pad(exists.flatten(), (0, count * self.chunk_size - exists.numel()))
            masks.append(flat.view(count, self.chunk_size).any(dim=1))
        return torch.cat(masks)

    def chunk_rows(self, widths: list[tuple[int, int]]) -> int:
        """Chunk rows trunk and head run to generate pairs of these (image, text) widths."""
        return sum(len(self.needed_chunks(w, t)) for w, t in widths)

    def _rows(self, widths: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(pair row, chunk) of every chunk generated for pairs of `widths`, grouped by widths."""
        groups: dict[tuple[int, int], list[int]] = {}
        for row, key in enumerate(widths):
            groups.setdefault(tuple(key), []).append(row)
        pair_rows, chunks = [], []
        for key, members in groups.items():
            needed = self.needed_chunks(*key)
            pair_rows.append(torch.tensor(members).repeat_interleave(len(needed)))
            chunks.append(needed.repeat(len(members)))
        device = self.chunk_emb.device
        return torch.cat(pair_rows).to(device), torch.cat(chunks).to(device)

    def generate(self, cond: torch.Tensor, scales: torch.Tensor,
                 widths: list[tuple[int, int]] | None = None) -> Params:
        """cond [n, c (+ c_text)], scales [n, n_layers], widths: per row, the pair's (image, text) widths (default:
        the padded ones, i.e. every chunk) -> per-layer (W [n, in, out], b [n, out])."""
        n, chunks = cond.shape[0], self.chunk_emb.shape[0]
        widths = widths or [(self.shape.image_width, self.shape.text_width)] * n
        pair_rows, chunk_ids = self._rows(widths)
        inputs = torch.cat([cond[pair_rows], self.layer_emb[self.chunk_layer[chunk_ids]], self.chunk_emb[chunk_ids]],
                           dim=-1)
        generated = self.head(self.trunk(inputs))  # [rows, chunk_size]
        flat = generated.new_zeros(n, chunks, self.chunk_size).index_put((pair_rows, chunk_ids), generated)
        params, start = [], 0
        for layer, ((fan_in, fan_out), count) in enumerate(zip(self.shape.layers, self.chunks_per_layer)):
            vec = flat[:, start:start + count].reshape(n, -1)[:, : fan_in * fan_out + fan_out]
            vec = vec * scales[:, layer: layer + 1]
            params.append((vec[:, : fan_in * fan_out].view(n, fan_in, fan_out), vec[:, fan_in * fan_out:]))
            start += count
        return params

    def forward(self, index: torch.Tensor) -> Params:
        widths = [self.pair_widths[p] for p in index.tolist()]
        return self.generate(self.pair_cond(index), self.scales[index], widths)

    def scales_for(self, width: int, text_width: int | None = None) -> torch.Tensor:
        """Per-layer init scales of a (possibly new) pair of these widths: [1, n_layers]."""
        layers = self.shape.true_layers(width, text_width)
        return torch.tensor([[init_std(i) for i, _ in layers]], device=self.cond.device)

    def hypernet_params(self) -> int:
        return sum(p.numel() for name, p in self.named_parameters() if name not in ("cond", "text_cond"))
