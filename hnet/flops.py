"""FLOPs: fvcore counting for encoders (plus the op handles it lacks), exact per-op formulas for training steps,
and the per-run ledger (RUN_DIR/flops.json).

Convention (DESIGN.md): 1 multiply-add = 2 FLOPs; `gmacs` is reported too, since timm and fvcore publish MACs.
Backward is counted per op for what actually needs gradients: a weight gradient always, an input gradient only
when the input itself requires grad (frozen encoder features and frozen text embeddings never do).
"""
from __future__ import annotations

import functools
import itertools
from pathlib import Path
from typing import Any

import torch
from fvcore.nn import FlopCountAnalysis
from fvcore.nn.jit_handles import get_shape
from torch.utils.flop_counter import FlopCounterMode

from hnet import files, runs
from hnet.config import Config, HypernetConfig
from hnet.data.cache import Unit, cached_name
from hnet.files import MANIFEST
from hnet.models.connectors import ConnectorShape
from hnet.models.encoders import (
    ImageEncoder,
    TextEncoder,
    parse_spec,
    read_encoder_list,
    text_key,
)
from hnet.models.moe import moe_macs
from hnet.models.pairs import Pairs
from hnet.models.stitch import StitchModel

PHASES = ("embed", "train", "autodecode", "eval")


# ---------------------------------------------------------------- fvcore, with the handles it lacks

def _sdpa_handle(inputs: list[Any], outputs: list[Any]) -> int:
    """scaled_dot_product_attention: q k^T and attn v, [.., L, d] x [.., S, d] -> L*S*d MACs each."""
    q, k, v = (get_shape(x) for x in inputs[:3])
    batch = 1
    for dim in q[:-2]:
        batch *= dim
    length, depth = q[-2], q[-1]
    return batch * length * k[-2] * depth + batch * length * k[-2] * v[-1]


def _baddbmm_handle(inputs: list[Any], outputs: list[Any]) -> int:
    """baddbmm(bias, x [n,b,i], w [n,i,o]): n*b*i*o MACs (the bias add is not a multiply-add)."""
    n, b, i = get_shape(inputs[1])
    o = get_shape(inputs[2])[-1]
    return n * b * i * o


EXTRA_HANDLES = {"aten::scaled_dot_product_attention": _sdpa_handle, "aten::baddbmm": _baddbmm_handle}
# Ops fvcore does not count, with why they may stay at zero: elementwise work, a negligible share of a forward.
NEGLIGIBLE_OPS = {"aten::add", "aten::add_", "aten::mul", "aten::mul_", "aten::div", "aten::gelu", "aten::softmax",
                  "aten::sub", "aten::rsub", "aten::sigmoid", "aten::silu", "aten::hardswish", "aten::hardsigmoid",
                  "aten::relu", "aten::relu_", "aten::mean", "aten::sum", "aten::pow", "aten::sqrt", "aten::exp",
                  "aten::max_pool2d", "aten::avg_pool2d", "aten::tanh", "aten::clamp", "aten::neg", "aten::erf",
                  "aten::log", "aten::rsqrt", "aten::abs", "aten::reciprocal", "aten::fill_", "aten::sin",
                  "aten::cos", "aten::gelu_", "aten::scatter_add", "aten::upsample_bicubic2d", "aten::sign",
                  # F.normalize of the pooled feature: O(width) work
                  "aten::clamp_min", "aten::expand_as", "aten::linalg_vector_norm",
                  # data movement, no multiply-adds (Swin/MaxViT window padding, VOLO unfold/fold, XCiT repeat)
                  "aten::pad", "aten::im2col", "aten::col2im", "aten::repeat", "aten::ceil",
                  # elementwise: MaxViT's in-place SiLU, ConvNeXt-V2's GRN
                  "aten::silu_", "aten::addcmul"}


def fvcore_count(model: torch.nn.Module, inputs: tuple) -> tuple[int, dict[str, int]]:
    """(MACs, unsupported ops -> call count) of one forward, with our extra handles."""
    analysis = FlopCountAnalysis(model, inputs)
    for op, handle in EXTRA_HANDLES.items():
        analysis.set_op_handle(op, handle)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    return int(analysis.total()), dict(analysis.unsupported_ops())


@functools.lru_cache(maxsize=None)
def encoder_flops(name: str, img_size: int | None = None) -> dict:
    """Forward FLOPs of one image through a zoo encoder (random init; weights do not change the count)."""
    spec = parse_spec(name, "random")
    if img_size:
        spec = parse_spec(f"{name}{',' if '@' in name else '@'}img_size={img_size}", "random")
    encoder = ImageEncoder(spec)
    size = encoder.input_size
    macs, unsupported = fvcore_count(encoder, (torch.zeros(1, *size),))
    params = sum(p.numel() for p in encoder.parameters())
    return {"encoder": name, "img_size": size[-1], "gmacs": macs / 1e9, "gflops": 2 * macs / 1e9,
            "params_m": params / 1e6, "unsupported_ops": sorted(set(unsupported) - NEGLIGIBLE_OPS)}


def forward_flops(name: str, images: int = 1) -> float:
    """FLOPs of `images` forwards through a zoo encoder (the embedding passes' cost)."""
    return images * encoder_flops(name)["gflops"] * 1e9


# ---------------------------------------------------------------- training steps, per-op formulas

def connector_macs(layers: list[tuple[int, int]], n: int, batch: int) -> dict:
    """Forward and backward MACs of n batched connectors on `batch` rows (input to layer 0 is frozen)."""
    forward = sum(n * batch * i * o for i, o in layers)
    weight_grads = forward
    input_grads = sum(n * batch * i * o for i, o in layers[1:])
    return {"forward": forward, "backward": weight_grads + input_grads}


def shape_macs(shape: ConnectorShape, n: int, batch: int, layers: list[tuple[int, int]] | None = None) -> dict:
    """connector_macs of `layers` (default: the padded ones) of this shape; moe: the gate + the k active experts."""
    layers = layers or shape.layers
    if shape.kind == "moe":
        return moe_macs(layers, shape.experts, shape.top_k, n, batch)
    return connector_macs(layers, n, batch)


def logits_macs(n: int, batch: int, width: int, world: int = 1, local: bool = False) -> dict:
    """Logits of one step, summed over ranks; one side (the mapped one) needs a gradient, the frozen one not.
    Without local_loss every rank computes all [n, B, B] global logits; with it, each rank computes its
    B/world rows against all B columns, once per direction."""
    per_rank = 2 * n * (batch // world) * batch * width if local and world > 1 else n * batch * batch * width
    return {"forward": per_rank * world, "backward": per_rank * world}


def hypernet_macs(model, rows: float, frozen: bool = False, world: int = 1) -> dict:
    """Generating connectors, summed over ranks (every rank generates all of them): `rows` chunk rows (those the
    pairs need, HyperNetwork.chunk_rows) each through trunk + head. Backward always needs input gradients (to
    reach the cond embeddings); weight gradients only when the hypernetwork itself trains."""
    linears = [m for m in list(model.trunk) + [model.head] if isinstance(m, torch.nn.Linear)]
    forward = sum(rows * m.in_features * m.out_features for m in linears) * world
    return {"forward": forward, "backward": forward if frozen else 2 * forward}


def generated_rows(model, n: int, widths: list[tuple[int, int]] | None = None) -> float:
    """Chunk rows the hypernetwork runs for n pairs: those of the pairs of `widths` [(image, text)] when given,
    else n x the mean over the model's trained pairs (exact when they all train every step)."""
    if widths is not None:
        return model.source.chunk_rows(widths)
    trained = [model.source.pair_widths[p] for p in model.trained]
    return model.source.chunk_rows(trained) * n / len(trained)


def separate_macs(model, n: int, batch: int, world: int = 1, local: bool = False) -> dict:
    """APE: n of the model's P connectors, each at its pair's TRUE widths (what a grid search of single connectors
    runs; the batched code runs them padded): the mean connector x n, exact when all P train."""
    shape, pairs = model.shape, len(model.pairs)
    widths = [model.encoder_widths[i] for i in model.pairs.image]  # python ints: the model may live on "meta"
    text_widths = [model.text_encoder_widths[j] for j in model.pairs.text]
    out = text_widths if shape.direction == "image_to_text" else widths
    connectors = [shape_macs(shape, 1, batch, shape.true_layers(w, t)) for w, t in zip(widths, text_widths)]
    logits = [logits_macs(1, batch, o, world, local) for o in out]
    mean = lambda items, key: sum(m[key] for m in items) * n / pairs
    return {"connectors": {k: mean(connectors, k) for k in ("forward", "backward")},
            "logits_loss": {k: mean(logits, k) for k in ("forward", "backward")}}


def train_step_flops(model, n: int, batch: int, world: int = 1, frozen_hypernet: bool = False,
                     local: bool = False, widths: list[tuple[int, int]] | None = None) -> dict:
    """FLOPs of one optimizer step (forward + backward) over all ranks, split by part; `batch` is global. The
    hypernetwork's connectors are counted at the padded widths they run, its generation at the chunks the pairs
    need (`widths`: the n pairs' (image, text) widths, see generated_rows); separate connectors at their pairs'
    true widths."""
    shape = model.shape
    width = shape.dims[-1]  # the mapped side's width: text for image_to_text, image for text_to_image
    if model.method == "separate":
        parts = separate_macs(model, n, batch, world, local)
    else:
        parts = {"connectors": shape_macs(shape, n, batch),
                 "logits_loss": logits_macs(n, batch, width, world, local),
                 "hypernet": hypernet_macs(model.source, generated_rows(model, n, widths), frozen_hypernet, world)}
    out = {name: round(2 * (p["forward"] + p["backward"])) for name, p in parts.items()}
    out["total"] = sum(out.values())
    out["forward"] = round(2 * sum(p["forward"] for p in parts.values()))
    return out


def autodecode_step_flops(model, batch: int, pairs: int = 1, world: int = 1,
                          widths: list[tuple[int, int]] | None = None) -> int:
    """One auto-decoding step over all ranks: the new encoder's `pairs` connectors generated by the frozen
    hypernetwork (on every rank), trained through it. `widths`: those pairs' (image, text) widths; default the
    padded ones (every chunk), a bound for an encoder whose width is not known yet."""
    padded = [(model.shape.image_width, model.shape.text_width)] * pairs
    return train_step_flops(model, pairs, batch, world=world, frozen_hypernet=True,
                            widths=widths or padded)["total"]


def zeroshot_head_flops(shape, n_classes: int) -> float:
    """Per-image FLOPs of one pair's connector + its class logits (the class side is amortised and left out)."""
    return 2.0 * (shape_macs(shape, 1, 1)["forward"] + n_classes * shape.dims[-1])


def retrieval_head_flops(shape, images: int, texts: int) -> float:
    """One pair's retrieval: the connector over the images plus the images x captions similarity."""
    return 2.0 * (shape_macs(shape, 1, images)["forward"] + images * texts * shape.dims[-1])


def finetune_step_flops(shape, pairs: int, batch: int, world: int = 1) -> float:
    """One step of fine-tuning `pairs` connectors' weights directly (no hypernetwork) over all ranks: connectors +
    logits (every rank computes all the global logits)."""
    parts = (shape_macs(shape, pairs, batch), logits_macs(pairs, batch, shape.dims[-1], world))
    return 2.0 * sum(sum(p.values()) for p in parts)


def proxy_flops(name: str, n: int, d: int, t: int) -> float:
    """Multiply-adds x 2 of one training-free proxy (hnet/experiments/proxies.py) on n pairs of widths d (image)
    and t (text); elementwise work left out."""
    if name == "linear_cka":
        macs = n * d * t + n * d * d + n * t * t
    elif name == "mutual_knn":
        macs = n * n * d + n * n * t
    else:
        half = n // 2
        macs = half * d * d + half * d * t + d ** 3 / 3 + d * d * t + (n - half) * d * t + (n - half) * half * t
    return 2.0 * macs


def grid_search_cost(cfg: Config, meta: dict, count: int, text_flops_per_sample: float, steps: int,
                     world: int = 1, local: bool = False, captions: int | None = None) -> dict:
    """FLOPs of training one separate connector per encoder pair of `meta` (a model.json: image_encoders,
    image_widths, text_widths, pairs) for `steps` steps at cfg.train's settings (batch: search.grid_batch_size when
    set) over `count` samples on `world` ranks (`local`: local_loss), counted as the ledger counts a run, and of
    embedding those samples with every image encoder and every text encoder (`text_flops_per_sample`: all text
    encoders together, per caption; `captions`: how many the samples have, default one each)."""
    c, names, widths = cfg.connector, meta["image_encoders"], meta["image_widths"]
    shape = ConnectorShape.from_config(c, max(widths), max(meta["text_widths"]))
    pairs = Pairs.from_list(meta["pairs"])
    with torch.device("meta"):
        model = StitchModel("separate", shape, widths, HypernetConfig(), text_widths=meta["text_widths"], pairs=pairs)
    batch = grid_batch_size(cfg)
    per_step = train_step_flops(model, len(pairs), batch, world=world, local=local)["total"] * cfg.train.grad_accum
    embed = sum(forward_flops(n, count) for n in names) + (captions or count) * text_flops_per_sample
    return {"steps": steps, "batch": batch, "samples": count, "train": per_step * steps, "embed": embed}


def grid_batch_size(cfg: Config) -> int:
    return cfg.search.grid_batch_size or cfg.train.batch_size


# ---------------------------------------------------------------- the embedding pass

FLOPS_SAMPLE = 256  # captions used to measure a text encoder's FLOPs per caption


def caption_sample(units: list[Unit]) -> list[str]:
    """The captions a text encoder's FLOPs per caption are measured on: the first FLOPS_SAMPLE of the data."""
    return [s["caption"] for s in itertools.islice(units[0].samples(), FLOPS_SAMPLE)]


def text_flops_per_caption(text_encoder: str, captions: list[str]) -> float:
    """Forward FLOPs of one caption through a text encoder (torch's counter over a sample of captions)."""
    text = TextEncoder(text_encoder)
    with FlopCounterMode(display=False) as counter:
        text.encode(captions)
    return counter.get_total_flops() / len(captions)


def record_cache_flops(root: Path, manifest: dict, units: list[Unit], names: list[str], texts: list[str]) -> dict:
    """Store per-sample forward FLOPs of each cached image encoder `names` (fvcore) and of each text encoder
    `texts` (per caption, under `text:NAME`) in the cache's manifest."""
    per_sample = manifest.setdefault("flops_per_sample", {})
    for name in names:
        if name not in per_sample:
            per_sample[name] = forward_flops(name)
    captions = None
    for text in texts:
        key = text_key(text)
        if key not in per_sample and cached_name(manifest, key):
            captions = captions or caption_sample(units)
            per_sample[key] = text_flops_per_caption(text, captions)
    files.write_json(Path(root) / MANIFEST, manifest)
    return manifest


def charged_captions(cfg: Config, captions: int, images: int) -> int:
    """Captions a text encoder's forwards are charged for: all of the images' (data.captions=all), or one per
    image (first: the baseline that trains on the first caption needs no other)."""
    return captions if cfg.data.captions == "all" else images


def embedding_flops(manifest: dict, cfg: Config) -> tuple[float, int, dict]:
    """One-time embedding cost of this run's image encoders (per image) + every text encoder (per caption: all of an
    image's captions, or only its first with data.captions=first) over the cached samples: (flops, images, parts)."""
    images = manifest["count"]
    captions = charged_captions(cfg, int(manifest.get("caption_count", images)), images)
    parts = {s.name: manifest["flops_per_sample"][s.name] * images
             for s in read_encoder_list(cfg.encoders, cfg.image_weights)}
    parts |= {text_key(t): manifest["flops_per_sample"][text_key(t)] * captions for t in cfg.texts}
    return sum(parts.values()), images, parts


# ---------------------------------------------------------------- the ledger

class FlopsLedger:
    """Per-phase FLOPs of a run, saved atomically to RUN_DIR/flops.json (loaded back when it exists)."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / runs.FLOPS
        saved = files.read_json(self.path) if self.path.exists() else {}
        self.phases = {p: {"flops": 0, "steps": 0, "samples": 0, "parts": {}} for p in PHASES}
        self.phases.update(saved.get("phases", {}))

    def add(self, phase: str, flops: float, steps: int = 0, samples: int = 0, parts: dict | None = None) -> None:
        entry = self.phases[phase]
        entry["flops"] += int(flops)
        entry["steps"] += steps
        entry["samples"] += samples
        if parts:
            entry["parts"] = parts

    def charge(self, phase: str, key: str, flops: float, steps: int = 0, samples: int = 0, once: bool = False,
               **info) -> bool:
        """Add an itemised cost: parts[key] accumulates flops/steps/samples (the phase's totals too); `info` is
        stored on the part. `once`: nothing happens when the run already paid for `key` (returns False)."""
        entry = self.phases[phase]
        parts = entry.setdefault("parts", {})
        if once and key in parts:
            return False
        part = parts.setdefault(key, {"flops": 0, "steps": 0, "samples": 0})
        part.update(info)
        for field, value in (("flops", int(flops)), ("steps", steps), ("samples", samples)):
            part[field] += value
            entry[field] += value
        return True

    def charge_embedding(self, key: str, names, images: int, embedded) -> None:
        """Encoders' forwards over an evaluation set, once per run, `cached` when this call reused them: a run's
        evaluation costs the same whichever run filled the cache first."""
        for name in names:
            self.charge("eval", f"embed/{key}/{name}", forward_flops(name, images), once=True, images=images,
                        cached=name not in embedded)

    def set(self, phase: str, flops: float, samples: int = 0, parts: dict | None = None) -> None:
        self.phases[phase] = {"flops": int(flops), "steps": 0, "samples": samples, "parts": parts or {}}

    def total(self, with_embed: bool = True) -> int:
        return sum(v["flops"] for k, v in self.phases.items() if with_embed or k != "embed")

    def as_dict(self) -> dict:
        return {"convention": "1 multiply-add = 2 FLOPs; forward + backward where gradients are needed",
                "phases": self.phases, "total_flops": self.total(),
                "total_flops_without_embed": self.total(with_embed=False)}

    def save(self, main_process: bool = True) -> None:
        if main_process:
            files.write_json(self.path, self.as_dict())

    @staticmethod
    def rewind(run_dir: Path, checkpoint: Path) -> None:
        """On resume, the ledger goes back to what it was at the checkpoint."""
        saved = checkpoint / runs.FLOPS
        if saved.exists():
            files.write_bytes(Path(run_dir) / runs.FLOPS, saved.read_bytes())


def linear_probe_flops(rows: int, width: int, classes: int, passes: int = 1, backward: bool = True,
                       iterations: int = 0, history: int = 0) -> float:
    """A logistic-regression probe on frozen features [rows, width] -> `classes` logits: `passes` full-batch passes
    (rows x width x classes multiply-adds forward, as many for the weight gradient when `backward`; the features
    need none), plus `iterations` L-BFGS directions from `history` stored pairs (the two-loop recursion: about
    4 x history multiply-adds per parameter). Softmax and loss are elementwise and left out."""
    macs = passes * rows * width * classes * (2 if backward else 1)
    return 2.0 * (macs + iterations * 4 * history * (width + 1) * classes)
