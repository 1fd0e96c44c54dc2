"""Image <-> text retrieval R@1/5/10 through each encoder's connector, on any captioned shard set."""
from __future__ import annotations

import hashlib

import numpy as np
import torch
import torch.nn.functional as F

from hnet.cache import TEXT, CachedFeatures, build_cache
from hnet.config import Config
from hnet.data.sources import shard_units
from hnet.flops import FlopsLedger, connector_macs, encoder_flops
from hnet.model import StitchModel, project
from hnet.zoo import specs_for

KS = (1, 5, 10)


def recall_at_k(similarity: torch.Tensor, ks=KS) -> dict:
    """similarity[i, j] between query i and item j, the right item of query i being j = i."""
    target = similarity.diagonal().unsqueeze(1)
    rank = (similarity > target).sum(dim=1)  # 0 = the right item ranked first
    return {f"R@{k}": float((rank < k).float().mean()) * 100 for k in ks}


@torch.no_grad()
def retrieval_metrics(model: StitchModel, index: int, image: torch.Tensor, text: torch.Tensor) -> dict:
    width = int(model.widths[index])
    padded = F.pad(image.float(), (0, model.shape.image_width - width)).unsqueeze(0)
    params = model.source(torch.tensor([index], device=model.widths.device))
    a, b = project(model.shape, params, model.widths[index:index + 1], padded, text.float())
    b = b[0] if b.dim() == 3 else b
    sim = a[0] @ b.T
    return {"image_to_text": recall_at_k(sim), "text_to_image": recall_at_k(sim.T), "n": int(sim.shape[0])}


def evaluate_retrieval(cfg: Config, model: StitchModel, names: list[str], weights: dict[str, str],
                       accelerator=None, ledger: FlopsLedger | None = None) -> dict:
    """R@K of every encoder on cfg.eval.retrieval's shards. Every rank embeds its share of the shards; the main
    process (or the only one) scores on the model's device and charges the ledger's eval phase."""
    pattern = cfg.eval.retrieval
    root = cfg.cache_root / "eval" / f"retrieval_{hashlib.sha256(pattern.encode()).hexdigest()[:12]}"
    specs = specs_for(names, weights, cfg.image_weights)
    stats = build_cache(root, shard_units(pattern), specs, cfg.text_encoder, batch_size=cfg.eval.batch_size,
                        num_workers=cfg.data.num_workers, accelerator=accelerator)
    if accelerator is not None and not accelerator.is_main_process:
        return {}
    device = model.log_scale.device
    cache = CachedFeatures(root, names + [TEXT])
    text = torch.from_numpy(np.asarray(cache[TEXT], np.float32)).to(device)
    results = {n: retrieval_metrics(model, i, torch.from_numpy(np.asarray(cache[n], np.float32)).to(device), text)
               for i, n in enumerate(names)}
    if ledger is not None:
        _charge(ledger, model, names, root.name, len(text), stats["embedded"])
    return results


def _charge(ledger: FlopsLedger, model: StitchModel, names: list[str], key: str, n: int, embedded: list[str]) -> None:
    """Image encoders' forwards over the shard images (once per run, `cached` when reused), and per encoder the
    connector over n images plus the n x n similarity. The captions' text-encoder pass is not counted here."""
    for name in names:
        ledger.charge("eval", f"embed/{key}/{name}", n * encoder_flops(name)["gflops"] * 1e9, once=True,
                      images=n, cached=name not in embedded)
    per_encoder = 2 * (connector_macs(model.shape.layers, 1, n)["forward"] + n * n * _sim_width(model))
    ledger.charge("eval", f"heads/{key}", len(names) * per_encoder, steps=1, samples=n * len(names))


def _sim_width(model: StitchModel) -> int:
    shape = model.shape
    return shape.dims[-1] if shape.direction == "image_to_text" else shape.image_width
