"""The embedding phase of a run: data -> shards -> cache, with its FLOPs recorded in the ledger."""
from __future__ import annotations

from hnet.cache import build_cache
from hnet.config import Config
from hnet.data.sources import prepare_shards, shard_units
from hnet.zoo import read_encoder_list


def embed_training_data(cfg: Config, accelerator=None, extra_specs=()) -> dict:
    """Make sure cfg's cache holds features of every configured encoder (plus `extra_specs`) and the text."""
    specs = read_encoder_list(cfg.encoders, cfg.image_weights) + list(extra_specs)
    pattern = prepare_shards(cfg) if accelerator is None or accelerator.is_main_process else None
    if accelerator is not None:
        accelerator.wait_for_everyone()
        pattern = pattern or prepare_shards(cfg)
    return build_cache(cfg.cache_path, shard_units(pattern), specs, cfg.text_encoder,
                       batch_size=cfg.data.embed_batch_size, num_workers=cfg.data.num_workers,
                       accelerator=accelerator)
