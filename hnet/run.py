"""A whole training run: make sure the cache exists (embedding phase), train, record the one-time cost."""
from __future__ import annotations

from hnet.config import Config
from hnet.embedding import embed_training_data, embedding_flops
from hnet.flops import FlopsLedger
from hnet.train import make_accelerator, train


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
