"""The trainable stitch: a parameter source (hypernetwork or separate connectors) + logit scale, over a run's
(image encoder, text encoder) pairs. Its files are hnet/runs.py's."""
from __future__ import annotations

import math
import zlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hnet.config import Config, HypernetConfig
from hnet.models.connectors import (
    ConnectorShape,
    Params,
    SeparateConnectors,
    connector_forward,
    width_mask,
)
from hnet.models.hypernet import HyperNetwork
from hnet.models.moe import moe_forward
from hnet.models.pairs import Pairs, resolve_pairs

MAX_LOGIT_SCALE = 100.0


def project(shape: ConnectorShape, params: Params, widths: torch.Tensor, text_widths: torch.Tensor,
            image: torch.Tensor, text: torch.Tensor, aux: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Map one side through the connectors; return L2-normalised (image side [n,B,E], text side [B,E]|[n,B,E]).
    Inputs are zero-padded (image to D_max, text to T_max); `widths`/`text_widths` [n] are each pair's true widths,
    and the mapped side is masked to its own, so padded pairs equal unpadded ones. A moe connector's gate logits
    [n, B, E] go to aux["router_logits"] when `aux` is given."""
    mask = width_mask(shape.dims[-1], shape.out_widths(widths, text_widths))
    source = image if shape.direction == "image_to_text" else text
    if shape.kind == "moe":
        mapped, logits = moe_forward(source, params, shape.experts, shape.top_k, mask)
        if aux is not None:
            aux["router_logits"] = logits
    else:
        mapped = connector_forward(source, params, mask)
    if shape.direction == "image_to_text":
        return F.normalize(mapped, dim=-1), text
    return image, F.normalize(mapped, dim=-1)


def padded_pair(model: "StitchModel", image: torch.Tensor, text: torch.Tensor):
    """One pair's features at their true widths -> (image [1, M, D_max], text [K, T_max], widths [1], text widths
    [1]) as the padded connectors take them."""
    device = image.device
    widths = torch.tensor([image.shape[-1]], device=device)
    text_widths = torch.tensor([text.shape[-1]], device=device)
    image = F.pad(image.float(), (0, model.shape.image_width - image.shape[-1])).unsqueeze(0)
    text = F.pad(text.float(), (0, model.shape.text_width - text.shape[-1]))
    return image, text, widths, text_widths


class StitchModel(nn.Module):
    """Connectors for (image encoder, text encoder) pairs. The hypernetwork shares one logit scale over all pairs;
    the separate (APE) baseline keeps one per connector, so its connectors train exactly as single-pair runs would
    (when all train every step; with k per step, Adam's step count and the learning-rate schedule stay shared).

    `widths`: per image encoder; `text_widths`: per text encoder (default: one, of T_max); `pairs`: the model's
    connectors (default: every image encoder with the one text encoder). Buffers `widths` and `text_widths` hold
    each pair's widths."""

    def __init__(self, method: str, shape: ConnectorShape, widths: list[int], hypernet: HypernetConfig,
                 learnable_scale: bool = True, scale_init: float = 1 / 0.07, init_seeds: list[int] | None = None,
                 text_widths: list[int] | None = None, pairs: Pairs | None = None,
                 names: tuple[list[str], list[str]] | None = None, trained: list[int] | None = None):
        super().__init__()
        text_widths = text_widths or [shape.text_width]
        # the encoders' names (image, text), for whoever needs a pair's names: evaluation, probes
        self.image_names, self.text_names = names or ([str(i) for i in range(len(widths))], [""] * len(text_widths))
        self.pairs = pairs or Pairs.grid(len(widths), len(text_widths))
        self.trained = np.arange(len(self.pairs)) if trained is None else np.asarray(trained)  # positions that train
        self.method, self.shape, self.hypernet = method, shape, hypernet
        self.encoder_widths, self.text_encoder_widths = list(widths), list(text_widths)
        pair_widths = [widths[i] for i in self.pairs.image]
        pair_text_widths = [text_widths[j] for j in self.pairs.text]
        self.source = (HyperNetwork(shape, widths, hypernet, text_widths, self.pairs) if method == "hypernet"
                       else SeparateConnectors(shape, pair_widths, init_seeds, pair_text_widths))
        log_scale = torch.full(() if method == "hypernet" else (len(self.pairs),), math.log(scale_init))
        if learnable_scale:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)
        self.register_buffer("widths", torch.tensor(pair_widths), persistent=False)
        self.register_buffer("text_widths", torch.tensor(pair_text_widths), persistent=False)
        self.router_logits: torch.Tensor | None = None  # moe: the last forward's gate logits [n, B, E]

    def pair_names(self, p: int) -> tuple[str, str]:
        """(image encoder, text encoder) of pair p."""
        return self.image_names[self.pairs.image[p]], self.text_names[self.pairs.text[p]]

    def labels(self) -> list[str]:
        return self.pairs.labels(self.image_names, self.text_names)

    def logit_scale(self, index: torch.Tensor | None = None) -> torch.Tensor:
        """The shared scalar (hypernetwork), or the selected connectors' scales as [n, 1, 1] (separate)."""
        scale = self.log_scale.exp().clamp(max=MAX_LOGIT_SCALE)
        if scale.dim() == 0 or index is None:
            return scale
        return scale[index].view(-1, 1, 1)

    def per_pair_parameters(self) -> list[nn.Parameter]:
        """APE: trainable tensors whose first dimension indexes connectors (row p belongs to pair p alone)."""
        rows = list(self.source.weights) + list(self.source.biases)
        return rows + ([self.log_scale] if isinstance(self.log_scale, nn.Parameter) else [])

    def untouched(self, drawn: np.ndarray) -> list[tuple[nn.Parameter, np.ndarray]]:
        """(tensor, rows) that training the pairs `drawn` leaves alone: the other pairs' connectors (APE), the
        cond embeddings of encoders in no drawn pair (hypernetwork)."""
        if self.method == "separate":
            rows = np.setdiff1d(np.arange(len(self.pairs)), drawn)
            return [(p, rows) for p in self.per_pair_parameters()]
        image, text, _, _ = self.pairs.members(drawn)
        out = [(self.source.cond, np.setdiff1d(np.arange(len(self.source.cond)), image))]
        if self.source.text_cond is not None:
            out.append((self.source.text_cond, np.setdiff1d(np.arange(len(self.source.text_cond)), text)))
        return out

    def encoder_row(self, name: str, text: bool = False) -> int:
        """Position of image (or text) encoder `name` in the model's encoders, and so in its cond vectors."""
        return (self.text_names if text else self.image_names).index(name)

    def with_encoder(self, name: str, width: int, text: bool, vector: torch.Tensor,
                     partners: list[int]) -> tuple["StitchModel", np.ndarray]:
        """A hypernetwork model with image (or `text`) encoder `name` added (or, if present, kept) with cond vector
        `vector` and a pair with every encoder of the other side; returns it and the positions of its pairs with the
        other side's encoders `partners`. Everything else is a copy of this model's state."""
        images, texts = list(self.image_names), list(self.text_names)
        widths, text_widths = list(self.encoder_widths), list(self.text_encoder_widths)
        cells = self.pairs.as_list()
        if name not in (texts if text else images):
            side, side_widths = (texts, text_widths) if text else (images, widths)
            side.append(name)
            side_widths.append(width)
            cells += [[i, len(texts) - 1] for i in range(len(images))] if text else \
                [[len(images) - 1, j] for j in range(len(texts))]
        with torch.random.fork_rng(devices=[]):  # a fresh init is overwritten below: leave the global RNG alone
            out = StitchModel(self.method, self.shape, widths, self.hypernet, isinstance(self.log_scale, nn.Parameter),
                              text_widths=text_widths, pairs=Pairs.from_list(cells), names=(images, texts))
        out = out.to(self.log_scale.device)
        state = self.state_dict()
        key = "source.text_cond" if text else "source.cond"
        row = out.encoder_row(name, text)
        vectors = torch.cat([state[key], vector[None].to(state[key])]) if row == len(state[key]) else state[key].clone()
        vectors[row] = vector
        out.load_state_dict(state | {key: vectors})
        mine = out.pairs.text if text else out.pairs.image
        theirs = out.pairs.image if text else out.pairs.text
        return out, np.array([p for p in range(len(out.pairs)) if mine[p] == row and theirs[p] in partners])

    def separate_from(self, params, widths: list[int], text_widths: list[int], pairs: Pairs,
                      names: tuple[list[str], list[str]]) -> "StitchModel":
        """Separate connectors for `pairs` of the encoders `names` (their widths), started from connector `params`
        (one per pair, this model's padded shape) and scored with this model's logit scale, frozen."""
        with torch.random.fork_rng(devices=[]):
            out = StitchModel("separate", self.shape, widths, self.hypernet, learnable_scale=False,
                              text_widths=text_widths, pairs=pairs, names=names)
        out = out.to(self.log_scale.device)
        with torch.no_grad():
            for layer, (weight, bias) in enumerate(params):
                out.source.weights[layer].copy_(weight)
                out.source.biases[layer].copy_(bias)
            out.log_scale.copy_(self.log_scale.detach().expand_as(out.log_scale))
        return out

    def forward(self, index: torch.Tensor, image: torch.Tensor, text: torch.Tensor,
                image_slot: torch.Tensor | None = None, text_slot: torch.Tensor | None = None):
        """Pairs `index`; `image` [n_image, B, D_max] and `text` [n_text, B, T_max] hold the encoders those pairs use,
        pair p reading image[image_slot[p]] and text[text_slot[p]] (slots None: in order / the one text)."""
        params = self.source(index)
        if image_slot is not None:
            image = image[image_slot]
        if text.dim() == 3:  # (a [B, T_max] text is one text encoder's, shared by every pair, as it is)
            text = text[0] if text.shape[0] == 1 else text[text_slot]
        aux: dict = {}
        a, b = project(self.shape, params, self.widths[index], self.text_widths[index], image, text, aux)
        self.router_logits = aux.get("router_logits")  # moe: read by the training loop's balance loss
        return a, b, self.logit_scale(index)


def build_model(cfg: Config, images: list[str], widths: list[int], texts: list[str],
                text_widths: list[int]) -> StitchModel:
    """All pairs of `images` x `texts`, all but cfg.held_out_pairs training; a separate (APE) run has no connectors
    for the held-out pairs."""
    c = cfg.connector
    shape = ConnectorShape.from_config(c, max(widths), max(text_widths))
    pairs, trained = resolve_pairs(images, texts, cfg.held_out_pairs)
    if cfg.method == "separate":
        pairs, trained = Pairs.from_list([pairs.as_list()[p] for p in trained]), None
    # init independent of the zoo: seeded by the pair's name (the image encoder's, with one text encoder)
    seeds = [zlib.crc32(f"{cfg.train.seed}:{label}".encode()) for label in pairs.labels(images, texts)]
    return StitchModel(cfg.method, shape, widths, cfg.hypernet, cfg.train.logit_scale == "learnable",
                       cfg.train.logit_scale_init, seeds, text_widths, pairs, (images, texts), trained)
