"""A whole training run: make sure the cache holds every encoder's features (the embedding phase), train, and
record what the one-time embedding pass cost."""
from __future__ import annotations

from hnet.config import Config
from hnet.data.embed import build_cache
from hnet.data.sources import first_samples_units, prepare_shards, shard_units
from hnet.distributed import make_accelerator
from hnet.flops import FlopsLedger, embedding_flops, record_cache_flops
from hnet.models.encoders import read_encoder_list
from hnet.train.loop import train


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
        stats["manifest"] = record_cache_flops(cfg.cache_path, stats["manifest"], units, [s.name for s in specs],
                                               cfg.texts)
    return stats


def train_run(cfg: Config) -> dict:
    accelerator = make_accelerator(cfg)
    stats = embed_training_data(cfg, accelerator)
    result = train(cfg, accelerator)
    if accelerator.is_main_process:
        ledger = FlopsLedger(cfg.run_dir)
        flops, samples, parts = embedding_flops(stats["manifest"], cfg)
        ledger.set("embed", flops, samples=samples, parts=parts)
        ledger.save()
    return result
