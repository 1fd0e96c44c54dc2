"""The embedding phase of a run: data -> shards -> cache, and what that one-time pass costs in FLOPs."""
from __future__ import annotations

import itertools

from torch.utils.flop_counter import FlopCounterMode

from hnet import io
from hnet.cache import MANIFEST, Unit, cached_name, text_key
from hnet.embed_pass import build_cache
from hnet.config import Config
from hnet.data.sources import first_samples_units, prepare_shards, shard_units
from hnet.flops import forward_flops
from hnet.zoo import TextEncoder, read_encoder_list

FLOPS_SAMPLE = 256  # captions used to measure the text encoder's FLOPs per caption


def embed_training_data(cfg: Config, accelerator=None, extra_specs=()) -> dict:
    """Make sure cfg's cache holds features of every configured image encoder (plus `extra_specs`) and the captions'
    embeddings of every text encoder."""
    specs = read_encoder_list(cfg.encoders, cfg.image_weights) + list(extra_specs)
    main = accelerator is None or accelerator.is_main_process
    pattern = prepare_shards(cfg) if main else None
    if accelerator is not None:
        accelerator.wait_for_everyone()
        pattern = pattern or prepare_shards(cfg)
    units = (first_samples_units(pattern, cfg.data.samples_per_encoder) if cfg.data.samples_per_encoder > 0
             else shard_units(pattern))  # a search budget: only the first N pairs are embedded at all
    stats = build_cache(cfg.cache_path, units, specs, cfg.texts, batch_size=cfg.data.embed_batch_size,
                        num_workers=cfg.data.num_workers, accelerator=accelerator)
    if main:
        stats["manifest"] = record_flops(cfg, stats["manifest"], units, [s.name for s in specs])
    return stats


def caption_sample(units: list[Unit]) -> list[str]:
    """The captions a text encoder's FLOPs per caption are measured on: the first FLOPS_SAMPLE of the data."""
    return [s["caption"] for s in itertools.islice(units[0].samples(), FLOPS_SAMPLE)]


def text_flops_per_caption(text_encoder: str, captions: list[str]) -> float:
    """Forward FLOPs of one caption through a text encoder (torch's counter over a sample of captions)."""
    text = TextEncoder(text_encoder)
    with FlopCounterMode(display=False) as counter:
        text.encode(captions)
    return counter.get_total_flops() / len(captions)


def record_flops(cfg: Config, manifest: dict, units: list[Unit], names: list[str]) -> dict:
    """Store per-sample forward FLOPs of each cached image encoder (fvcore) and of each text encoder (per caption,
    under `text:NAME`) in the manifest."""
    per_sample = manifest.setdefault("flops_per_sample", {})
    for name in names:
        if name not in per_sample:
            per_sample[name] = forward_flops(name)
    captions = None
    for text in cfg.texts:
        key = text_key(text)
        if key not in per_sample and cached_name(manifest, key):
            captions = captions or caption_sample(units)
            per_sample[key] = text_flops_per_caption(text, captions)
    io.write_json(cfg.cache_path / MANIFEST, manifest)
    return manifest


def embedding_flops(manifest: dict, cfg: Config) -> tuple[float, int, dict]:
    """One-time embedding cost of this run's image encoders + every text encoder over the cached samples:
    (flops, samples, parts)."""
    names = [s.name for s in read_encoder_list(cfg.encoders, cfg.image_weights)] + [text_key(t) for t in cfg.texts]
    count = manifest["count"]
    parts = {name: manifest["flops_per_sample"][name] * count for name in names}
    return sum(parts.values()), count, parts
