"""The trainable stitch: a parameter source (hypernetwork or separate connectors) + logit scale, and its files.

A run's trained state is `model.safetensors` (hypernetwork or connector weights, logit scale),
`cond_embeddings.safetensors` (one vector per image encoder keyed by its name, and per text encoder keyed
`text:NAME` when there are several; hypernetwork runs) and `model.json` (method, pair names, image and text
encoders with their widths, the pairs, connector shape). `connector_for(run_dir, image, text)` rebuilds a plain
nn.Module from those files, with no training code involved.
"""
from __future__ import annotations

import dataclasses
import math
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file
from torch import nn

from hnet import io
from hnet.config import Config, HypernetConfig
from hnet.connectors import Connector, ConnectorShape, Params, SeparateConnectors, connector_forward, width_mask
from hnet.hypernet import HyperNetwork
from hnet.pairs import Pairs, resolve_pairs

MAX_LOGIT_SCALE = 100.0
TEXT_COND = "text:"  # key prefix of text encoders' cond embeddings


def project(shape: ConnectorShape, params: Params, widths: torch.Tensor, text_widths: torch.Tensor,
            image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Map one side through the connectors; return L2-normalised (image side [n,B,E], text side [B,E]|[n,B,E]).
    Inputs are zero-padded (image to D_max, text to T_max); `widths`/`text_widths` [n] are each pair's true widths,
    and the mapped side is masked to its own, so padded pairs equal unpadded ones."""
    mask = width_mask(shape.dims[-1], shape.out_widths(widths, text_widths))
    if shape.direction == "image_to_text":
        return F.normalize(connector_forward(image, params, mask), dim=-1), text
    return image, F.normalize(connector_forward(text, params, mask), dim=-1)


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
        self.method, self.shape = method, shape
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

    def forward(self, index: torch.Tensor, image: torch.Tensor, text: torch.Tensor,
                image_slot: torch.Tensor | None = None, text_slot: torch.Tensor | None = None):
        """Pairs `index`; `image` [n_image, B, D_max] and `text` [n_text, B, T_max] hold the encoders those pairs use,
        pair p reading image[image_slot[p]] and text[text_slot[p]] (slots None: in order / the one text)."""
        params = self.source(index)
        if image_slot is not None:
            image = image[image_slot]
        if text.dim() == 3:  # (a [B, T_max] text is one text encoder's, shared by every pair, as it is)
            text = text[0] if text.shape[0] == 1 else text[text_slot]
        a, b = project(self.shape, params, self.widths[index], self.text_widths[index], image, text)
        return a, b, self.logit_scale(index)


def build_model(cfg: Config, images: list[str], widths: list[int], texts: list[str],
                text_widths: list[int]) -> StitchModel:
    """All pairs of `images` x `texts`, all but cfg.held_out_pairs training; a separate (APE) run has no connectors
    for the held-out pairs."""
    c = cfg.connector
    shape = ConnectorShape(c.kind, c.direction, max(widths), max(text_widths), c.depth, c.hidden)
    pairs, trained = resolve_pairs(images, texts, cfg.held_out_pairs)
    if cfg.method == "separate":
        pairs, trained = Pairs.from_list([pairs.as_list()[p] for p in trained]), None
    # init independent of the zoo: seeded by the pair's name (the image encoder's, with one text encoder)
    seeds = [zlib.crc32(f"{cfg.train.seed}:{label}".encode()) for label in pairs.labels(images, texts)]
    return StitchModel(cfg.method, shape, widths, cfg.hypernet, cfg.train.logit_scale == "learnable",
                       cfg.train.logit_scale_init, seeds, text_widths, pairs, (images, texts), trained)


NO_DECAY = ("log_scale", "bias", "norm", "cond", "layer_emb", "chunk_emb")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups as open_clip makes them: weight decay on weight matrices only, never on logit scales,
    biases, norms or embeddings (cond, layer, chunk)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or any(part in name for part in NO_DECAY)
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ---------------------------------------------------------------- files

def save_model(run_dir: str | Path, model: StitchModel, hypernet: HypernetConfig, weights: dict[str, str]) -> None:
    """Write the trained state; `weights` maps image encoder name -> how to load it (pretrained | random | file)."""
    run_dir = Path(run_dir)
    images, texts = model.image_names, model.text_names
    skip = ("source.cond", "source.text_cond")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k not in skip}
    state["log_scale"] = model.log_scale.detach().cpu().contiguous()
    io.write_safetensors(run_dir / "model.safetensors", state)
    if model.method == "hypernet":
        conds = {name: model.source.cond[i].detach().cpu().clone() for i, name in enumerate(images)}
        if model.source.text_cond is not None:
            conds |= {TEXT_COND + name: model.source.text_cond[j].detach().cpu().clone() for j, name in enumerate(texts)}
        io.write_safetensors(run_dir / "cond_embeddings.safetensors", conds)
    names = model.labels()
    trained = [names[p] for p in model.trained]
    meta = {"method": model.method, "names": names, "widths": model.widths.tolist(),
            "image_encoders": images, "image_widths": model.encoder_widths,
            "text_encoders": texts, "text_widths": model.text_encoder_widths, "pairs": model.pairs.as_list(),
            "shape": dataclasses.asdict(model.shape), "hypernet": dataclasses.asdict(hypernet), "weights": weights,
            "learnable_scale": isinstance(model.log_scale, nn.Parameter)}
    if trained != names:
        meta["trained"] = trained
    io.write_json(run_dir / "model.json", meta)


def run_encoders(run_dir: str | Path, meta: dict) -> tuple[list[str], list[int], list[str], list[int], Pairs]:
    """(image encoders, their widths, text encoders, their widths, pairs) of a run's model.json (runs from
    before text_encoders: every encoder with the text encoder of its config.yaml)."""
    if "pairs" in meta:
        return (meta["image_encoders"], meta["image_widths"], meta["text_encoders"], meta["text_widths"],
                Pairs.from_list(meta["pairs"]))
    config = Path(run_dir) / "config.yaml"
    text = (yaml.safe_load(config.read_text()) or {}).get("text_encoder", "") if config.exists() else ""
    return (meta["names"], meta["widths"], [text], [meta["shape"]["text_width"]],
            Pairs.grid(len(meta["names"]), 1))


def load_model(run_dir: str | Path) -> tuple[StitchModel, list[str]]:
    """The run's model and its pair names (image encoder names when the run has one text encoder)."""
    run_dir = Path(run_dir)
    meta_path = run_dir / "model.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{meta_path}: no trained model in this run dir (train it first)")
    meta = io.read_json(meta_path)
    shape = ConnectorShape(**meta["shape"])
    images, widths, texts, text_widths, pairs = run_encoders(run_dir, meta)
    model = StitchModel(meta["method"], shape, widths, HypernetConfig(**meta["hypernet"]), meta["learnable_scale"],
                        text_widths=text_widths, pairs=pairs, names=(images, texts))
    state = load_file(str(run_dir / "model.safetensors"))
    with torch.no_grad():
        model.log_scale.copy_(state.pop("log_scale"))
        if meta["method"] == "hypernet":
            conds = load_file(str(run_dir / "cond_embeddings.safetensors"))
            model.source.cond.copy_(torch.stack([conds[n] for n in images]))
            if model.source.text_cond is not None:
                model.source.text_cond.copy_(torch.stack([conds[TEXT_COND + n] for n in texts]))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in ("source.cond", "source.text_cond", "log_scale")]
    if missing or unexpected:
        raise ValueError(f"{run_dir / 'model.safetensors'}: missing {missing}, unexpected {unexpected}")
    return model.eval(), meta["names"]


@torch.no_grad()
def connector_for(run_dir: str | Path, image: str, text: str | None = None) -> Connector:
    """A plain nn.Module connector for the pair (image encoder `image`, text encoder `text`) of a trained run,
    generated for hypernetwork runs (any combination of the run's encoders). `text` may be left out when the run
    has one text encoder."""
    model, _ = load_model(run_dir)
    images, texts, pairs = model.image_names, model.text_names, model.pairs
    if image not in images:
        raise KeyError(f"{run_dir}: no image encoder '{image}' in this run (has: {', '.join(images)})")
    if text is None and len(texts) > 1:
        raise KeyError(f"{run_dir}: the run has {len(texts)} text encoders; name one (text=..., one of: "
                       f"{', '.join(texts)})")
    text = texts[0] if text is None else text
    if text not in texts:
        raise KeyError(f"{run_dir}: no text encoder '{text}' in this run (has: {', '.join(texts)})")
    cell = (images.index(image), texts.index(text))
    p = next((p for p, ij in enumerate(zip(pairs.image, pairs.text)) if ij == cell), None)
    if p is None:
        raise KeyError(f"{run_dir}: this separate run trained no connector for ({image}, {text})")
    params = model.source(torch.tensor([p]))
    return Connector.from_params(model.shape, params, int(model.widths[p]), int(model.text_widths[p]))
