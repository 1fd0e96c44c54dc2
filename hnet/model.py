"""The trainable stitch: a parameter source (hypernetwork or separate connectors) + logit scale, and its files.

A run's trained state is `model.safetensors` (hypernetwork or connector weights, logit scale),
`cond_embeddings.safetensors` (one vector per encoder, keyed by encoder name; hypernetwork runs) and
`model.json` (method, encoder names and widths, connector shape). `connector_for(run_dir, name)` rebuilds a plain
nn.Module from those files, with no training code involved.
"""
from __future__ import annotations

import dataclasses
import math
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from hnet import io
from hnet.config import Config, HypernetConfig
from hnet.connectors import Connector, ConnectorShape, Params, SeparateConnectors, connector_forward, output_mask
from hnet.hypernet import HyperNetwork

MAX_LOGIT_SCALE = 100.0


def project(shape: ConnectorShape, params: Params, widths: torch.Tensor, image: torch.Tensor,
            text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Map one side through the connectors; return L2-normalised (image side [n,B,E], text side [B,E]|[n,B,E])."""
    if shape.direction == "image_to_text":
        return F.normalize(connector_forward(image, params), dim=-1), text
    mapped = connector_forward(text, params, output_mask(shape, widths))
    return image, F.normalize(mapped, dim=-1)


class StitchModel(nn.Module):
    """The hypernetwork shares one logit scale over all encoders; the separate (APE) baseline keeps one per
    connector, so its N connectors train exactly as N single-encoder runs would (when all train every step; with
    k of N per step, Adam's step count and the learning-rate schedule stay shared)."""

    def __init__(self, method: str, shape: ConnectorShape, widths: list[int], hypernet: HypernetConfig,
                 learnable_scale: bool = True, scale_init: float = 1 / 0.07, init_seeds: list[int] | None = None):
        super().__init__()
        self.method, self.shape = method, shape
        self.source = (HyperNetwork(shape, widths, hypernet) if method == "hypernet"
                       else SeparateConnectors(shape, widths, init_seeds))
        log_scale = torch.full(() if method == "hypernet" else (len(widths),), math.log(scale_init))
        if learnable_scale:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)
        self.register_buffer("widths", torch.tensor(widths), persistent=False)

    def logit_scale(self, index: torch.Tensor | None = None) -> torch.Tensor:
        """The shared scalar (hypernetwork), or the selected connectors' scales as [n, 1, 1] (separate)."""
        scale = self.log_scale.exp().clamp(max=MAX_LOGIT_SCALE)
        if scale.dim() == 0 or index is None:
            return scale
        return scale[index].view(-1, 1, 1)

    def per_encoder_parameters(self) -> list[nn.Parameter]:
        """Trainable tensors whose first dimension indexes encoders (row i belongs to encoder i alone)."""
        if self.method == "hypernet":
            return [self.source.cond]
        rows = list(self.source.weights) + list(self.source.biases)
        return rows + ([self.log_scale] if isinstance(self.log_scale, nn.Parameter) else [])

    def forward(self, index: torch.Tensor, image: torch.Tensor, text: torch.Tensor):
        params = self.source(index)
        a, b = project(self.shape, params, self.widths[index], image, text)
        return a, b, self.logit_scale(index)


def build_model(cfg: Config, names: list[str], widths: list[int], text_width: int) -> StitchModel:
    c = cfg.connector
    shape = ConnectorShape(c.kind, c.direction, max(widths), text_width, c.depth, c.hidden)
    seeds = [zlib.crc32(f"{cfg.train.seed}:{name}".encode()) for name in names]  # init independent of the zoo
    return StitchModel(cfg.method, shape, widths, cfg.hypernet, cfg.train.logit_scale == "learnable",
                       cfg.train.logit_scale_init, seeds)


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

def save_model(run_dir: str | Path, model: StitchModel, names: list[str], hypernet: HypernetConfig,
               weights: dict[str, str]) -> None:
    """Write the trained state; `weights` maps encoder name -> how to load it (pretrained | random | file)."""
    run_dir = Path(run_dir)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k != "source.cond"}
    state["log_scale"] = model.log_scale.detach().cpu().contiguous()
    io.write_safetensors(run_dir / "model.safetensors", state)
    if model.method == "hypernet":
        conds = {name: model.source.cond[i].detach().cpu().clone() for i, name in enumerate(names)}
        io.write_safetensors(run_dir / "cond_embeddings.safetensors", conds)
    io.write_json(run_dir / "model.json", {"method": model.method, "names": names,
                                           "widths": model.widths.tolist(),
                                           "shape": dataclasses.asdict(model.shape),
                                           "hypernet": dataclasses.asdict(hypernet), "weights": weights,
                                           "learnable_scale": isinstance(model.log_scale, nn.Parameter)})


def load_model(run_dir: str | Path) -> tuple[StitchModel, list[str]]:
    run_dir = Path(run_dir)
    meta_path = run_dir / "model.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{meta_path}: no trained model in this run dir (train it first)")
    meta = io.read_json(meta_path)
    shape = ConnectorShape(**meta["shape"])
    model = StitchModel(meta["method"], shape, meta["widths"], HypernetConfig(**meta["hypernet"]),
                        meta["learnable_scale"])
    state = load_file(str(run_dir / "model.safetensors"))
    with torch.no_grad():
        model.log_scale.copy_(state.pop("log_scale"))
        if meta["method"] == "hypernet":
            conds = load_file(str(run_dir / "cond_embeddings.safetensors"))
            model.source.cond.copy_(torch.stack([conds[n] for n in meta["names"]]))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in ("source.cond", "log_scale")]
    if missing or unexpected:
        raise ValueError(f"{run_dir / 'model.safetensors'}: missing {missing}, unexpected {unexpected}")
    return model.eval(), meta["names"]


@torch.no_grad()
def connector_for(run_dir: str | Path, name: str) -> Connector:
    """A plain nn.Module connector for encoder `name` of a trained run (generated for hypernetwork runs)."""
    model, names = load_model(run_dir)
    if name not in names:
        raise KeyError(f"{run_dir}: no encoder '{name}' in this run (has: {', '.join(names)})")
    i = names.index(name)
    params = model.source(torch.tensor([i]))
    return Connector.from_params(model.shape, params, int(model.widths[i]))
