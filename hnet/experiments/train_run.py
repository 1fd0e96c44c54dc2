"""A whole training run: make sure the cache holds every encoder's features (the embedding phase), train, and
record what the one-time embedding pass cost; and a finished, evaluated run of a config, reused when it exists."""
from __future__ import annotations

import time

from hnet import runs
from hnet.config import Config
from hnet.data.embed import build_cache
from hnet.data.sources import first_samples_units, prepare_shards, shard_units
from hnet.distributed import make_accelerator
from hnet.eval.evaluate import evaluate_run
from hnet.flops import FlopsLedger, embedding_flops, record_cache_flops
from hnet.models.encoders import read_encoder_list
from hnet.provenance import config_digest
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


def trained_and_evaluated(cfg: Config, datasets: list[str]) -> float:
    """Make cfg.run_dir a trained run of exactly this config, evaluated on `datasets`: a finished run with the same
    config digest is reused (a run of other settings under the same name is not). Returns the seconds spent training
    (0.0 when reused)."""
    if runs.finished(cfg.run_dir, config_digest(cfg)):
        return 0.0
    (cfg.run_dir / runs.EVAL).unlink(missing_ok=True)  # another config's: never to be read as this one's
    start = time.perf_counter()
    train_run(cfg)
    seconds = time.perf_counter() - start
    evaluate_run(cfg, cfg.run_dir, datasets)
    return seconds
